"""Trustworthy at real scale: a bf16 checkpoint trains in float32 and is saved in the dtype the user chooses
(default: the source's); bad settings, paths, run names and prompts are refused when the config loads, naming them."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from pipeline.config import RunConfig, SamplingConfig, TrainConfig
from pipeline.model.batches import plan_step
from pipeline.model.loading import checkpoint_dtype, load_model, save_dtype
from pipeline.model.scoring import sft_objective
from pipeline.model.trainer import make_trainer, save_model, train_step
from tests.conftest import PAD, random_examples, tiny_lm


@pytest.fixture()
def bf16_checkpoint(tmp_path):
    folder = tmp_path / "bf16"
    tiny_lm("llama", seed=3).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _one_step(model, lr: float) -> float:
    """The fraction of weights one SFT step at `lr` (the paper's GFT setting is 1e-6) changes."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=lr, sequences_per_step=4, micro_batch_size=4, weight_decay=0.0)
    trainer = make_trainer(model, cfg, total_steps=1)
    examples = random_examples(4, seed=1)
    micro, totals = plan_step(examples, range(4), cfg, rank=0, world=1, pad_id=PAD)
    train_step(trainer, micro, sft_objective(), totals, max_grad_norm=None, step=0)
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in trainer.model.named_parameters())
    return changed / sum(p.numel() for p in before.values())


def test_a_bf16_checkpoint_trains_in_float32_and_moves_at_lr_1e_6(bf16_checkpoint):
    assert checkpoint_dtype(str(bf16_checkpoint)) == torch.bfloat16
    model = load_model(str(bf16_checkpoint), train=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert _one_step(model, 1e-6) > 0.9  # every weight with a gradient moves by about lr


def test_the_premise_a_bf16_weight_does_not_move_at_lr_1e_6(bf16_checkpoint):
    """Why the trainer loads float32: the same step on the checkpoint's own bf16 weights changes almost nothing."""
    model = load_model(str(bf16_checkpoint))  # the checkpoint's dtype, as scoring loads it
    assert next(model.parameters()).dtype == torch.bfloat16
    assert _one_step(model.train(), 1e-6) < 0.2  # a step of 1e-6 is below bf16's resolution for most weights


@pytest.mark.parametrize("setting,expected", [("source", torch.bfloat16), ("float32", torch.float32)])
def test_the_saved_checkpoint_has_the_chosen_dtype_and_the_live_weights_stay_float32(bf16_checkpoint, tmp_path,
                                                                                    setting, expected):
    model = load_model(str(bf16_checkpoint), train=True)
    trainer = make_trainer(model, TrainConfig(lr=1e-6), total_steps=1)
    dtype = save_dtype(setting, str(bf16_checkpoint))
    save_model(trainer, tmp_path / "out", dtype=dtype)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {expected}
    assert checkpoint_dtype(str(tmp_path / "out")) == expected
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # saving did not cast the master weights
    reloaded = load_model(str(tmp_path / "out"), train=True)
    for name, p in reloaded.named_parameters():
        live = dict(trainer.model.named_parameters())[name]
        assert torch.equal(p, live.detach().to(expected).float()), name


@pytest.mark.parametrize("field,value", [("temperature", float("inf")), ("top_p", float("nan"))])
def test_non_finite_sampling_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "a\\b", "..", "."])
def test_a_run_name_that_is_not_one_folder_is_refused(name):
    with pytest.raises(ValidationError, match="name"):
        RunConfig(name=name)
    RunConfig(name="paper_table_ci.gft.s0")  # experiment trial names stay valid


# ---------------------------------------------------------------------------------------------------------
# Path fields resolve against the config's folder; a missing path fails at load, naming the field
# ---------------------------------------------------------------------------------------------------------


def _config(folder, body: str):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.toml"
    path.write_text(body)
    return path


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline.config import load_run_config

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online: a hub id need not be cached

    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "rows.jsonl").write_text("{}\n")
    tiny_lm().save_pretrained(folder / "models" / "base")
    path = _config(folder, '[data]\nsource = "data/rows.jsonl"\n[models]\nbase = "models/base"\nteacher = "org/name"\n')
    monkeypatch.chdir(tmp_path)  # elsewhere: the old rule would look for ./data/rows.jsonl here
    cfg = load_run_config(path)
    assert cfg.data.source == str(folder / "data" / "rows.jsonl")
    assert cfg.models.base == str(folder / "models" / "base")
    assert cfg.models.teacher == "org/name"  # a hub id stays a hub id


@pytest.mark.parametrize("field,line", [
    ("models.base", '[models]\nbase = "./models/bsae"\n'),
    ("data.source", '[data]\nsource = "data/rows.jsnl.jsonl"\n'),
    ("models.teacher", '[models]\nteacher = "checkpoints/run1/teacher"\n'),
])
def test_a_mistyped_path_fails_at_load_naming_the_field(tmp_path, field, line):
    from pipeline.config import load_run_config

    with pytest.raises(ValueError, match=f"{field} = .*no such file or folder"):
        load_run_config(_config(tmp_path, line))


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE as the loaders read it, over an empty HF cache of this test's own (returned)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("field,line", [
    ("models.base", '[models]\nbase = "smollm2-135m-instruct"\n'),  # a folder name without ./ (issue 24)
    ("models.teacher", '[models]\nteacher = "HuggingFaceTB/SmolLM2-135M-Instruct"\n'),  # a hub id not cached
    ("models.base", '[models]\nbase = "two words"\n'),  # not even a valid hub id
])
def test_a_model_neither_a_folder_nor_cached_fails_at_load_when_offline(tmp_path, offline_hub, field, line):
    from pipeline.config import load_run_config

    value = line.split('"')[1]
    with pytest.raises(ValueError, match=rf"{field} = '{value}': no such folder .*as a hub id .*"
                                         rf"A folder is written \./{value}"):
        load_run_config(_config(tmp_path / "project", line))


def test_the_dry_run_names_the_model_field_that_cannot_load(tmp_path, offline_hub, capsys):
    from flows.cli import main

    path = _config(tmp_path / "project", '[models]\nbase = "smollm2-135m-instruct"\n')
    assert main(["run", str(path), "--root", str(tmp_path / "root"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "models.base = 'smollm2-135m-instruct'" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "root").exists()


def test_overrides_given_at_load_are_resolved_and_checked_like_the_file(tmp_path, offline_hub):
    from pipeline.config import load_run_config

    folder = tmp_path / "project"
    tiny_lm().save_pretrained(folder / "models" / "base")
    path = _config(folder, "")
    assert load_run_config(path, {"models.base": "models/base"}).models.base == str(folder / "models" / "base")
    with pytest.raises(ValueError, match=r"models.teacher = 'smollm2-135m-instruct': no such folder"):
        load_run_config(path, {"models.teacher": "smollm2-135m-instruct"})


def _cache_model(cache, repo_id: str) -> None:
    """A model in the HF cache's layout: refs/main names a snapshot holding config.json."""
    repo, commit = cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_cached_hub_id_loads_offline_and_any_hub_id_loads_online(tmp_path, offline_hub, monkeypatch):
    from huggingface_hub import constants

    from pipeline.config import load_run_config

    _cache_model(offline_hub, "org/cached")
    cfg = load_run_config(_config(tmp_path / "a", '[models]\nbase = "org/cached"\nteacher = "org/cached"\n'))
    assert (cfg.models.base, cfg.models.teacher) == ("org/cached", "org/cached")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cfg = load_run_config(_config(tmp_path / "b", '[models]\nbase = "smollm2-135m-instruct"\n'))
    assert cfg.models.base == "smollm2-135m-instruct"  # online a bare name is a hub id, as before


def test_no_held_out_prompts_is_refused_at_load():
    from pipeline.config import DataConfig

    with pytest.raises(ValidationError, match="data.eval_fraction = 0 holds out no prompts"):
        RunConfig(data=DataConfig(eval_fraction=0.0))


def test_an_overlong_prompt_is_a_bad_row_named_before_any_model_sees_it(tmp_path):
    import json

    from pipeline.config import DataConfig
    from pipeline.data.prompts import DataError, load_prompts

    rows = [{"id": "ok", "prompt": "1+1?", "solution": "\\boxed{2}", "answer": "2"},
            {"id": "huge", "prompt": "x" * 1_000_000, "solution": "\\boxed{2}", "answer": "2"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"huge.*prompt.*too long.*1000000 characters > data.max_prompt_chars"):
        load_prompts(DataConfig(source=str(path)))
    assert [r["id"] for r in load_prompts(DataConfig(source=str(path), on_bad_row="skip")).rows] == ["ok"]


def test_an_engine_refuses_a_prompt_that_does_not_fit_its_context(tmp_path):
    from pipeline.config import EngineConfig
    from pipeline.rollout.engines import HFEngine
    from tests.integration.test_engines import save_tiny_checkpoint

    engine = HFEngine(save_tiny_checkpoint(tmp_path / "m", seed=0), EngineConfig(max_model_len=64), progress=False)
    long = [1] + [5] * 60
    with pytest.raises(ValueError, match=r"prompt 1 has 61 tokens; with max_new_tokens = 8 it needs 69 > "
                                         r"engine.max_model_len = 64"):
        engine.generate([[1, 5], long], 2, SamplingConfig(max_new_tokens=8))
    assert len(engine.generate([long], 1, SamplingConfig(max_new_tokens=3))[0]) == 1
