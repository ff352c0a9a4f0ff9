"""Launched training (`train.launch.processes`): a run whose SFT and GFT rounds train as torchrun jobs of 2 processes
(gloo, on CPU) ends with the parameters of the same run trained in process, in float64 to 1e-10; a failing job
process fails the stage with that process's error; GRPO refuses to launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import GRPOConfig, apply_overrides, load_run_config

TINY = Path(__file__).parent / "data" / "tiny_run.toml"
F64 = {"master_dtype": "float64", "save_dtype": "float64"}


def _config(processes: int):
    overrides = {"tracking.enabled": False}
    for section in ("sft", "gft"):
        overrides.update({f"{section}.train.{k}": v for k, v in F64.items()})
        overrides[f"{section}.train.launch.processes"] = processes
    return apply_overrides(load_run_config(TINY), overrides)


def _weights(ref) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ref.uri) / "model" / "model.safetensors"))


def test_grpo_rounds_refuse_a_launched_job():
    with pytest.raises(ValueError, match="GRPO rounds train in the stage's process"):
        GRPOConfig.model_validate({"train": {"launch": {"processes": 2}}})


@pytest.mark.slow
def test_two_processes_train_the_run_of_one(tmp_path):
    from pipeline.run import run

    one = run(_config(1), root=tmp_path, progress=False)
    two = run(_config(2), root=tmp_path, progress=False)  # same root: data, models, teacher served
    assert two.calls.get("prepare_data", 0) == 0 and one.refs["sft"].sha256 != two.refs["sft"].sha256
    for name in ("sft", "gft"):
        a, b = _weights(one.refs[name]), _weights(two.refs[name])
        assert a.keys() == b.keys() and all(t.dtype == torch.float64 for t in a.values())
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")
        print(f"{name}: max |2 processes - 1 process| = {max((b[k] - a[k]).abs().max().item() for k in a):.2e}")
    for result, world in ((one, 1), (two, 2)):  # the rounds did train on that many processes
        progress = json.loads((Path(result.refs["gft"].uri) / "state" / "progress.json").read_text())
        assert progress["processes"] == world
    moved = _weights(one.refs["gft"])["model.embed_tokens.weight"] - _weights(one.refs["sft"])["model.embed_tokens.weight"]
    assert moved.abs().max() > 1e-6  # the GFT rounds trained: the comparison is not of two untouched copies
    assert not list(tmp_path.glob("*/.ckpt-*"))  # job folders go with the work folder once published


@pytest.mark.slow
def test_a_failing_process_fails_the_stage_with_its_error(tmp_path):
    from pipeline.config import LaunchConfig, SFTConfig
    from pipeline.rounds.launch import TrainJob, TrainJobError, run_job

    job = TrainJob(stage="sft", config=SFTConfig().model_dump(mode="json"), model=str(tmp_path / "no-such-model"),
                   folder=str(tmp_path), out=str(tmp_path / "out"), save_dtype="float32")
    with pytest.raises(TrainJobError, match=r"failed in process [01]: .*no-such-model") as err:
        run_job(job, LaunchConfig(processes=2, timeout_s=300))
    assert "full traceback" in str(err.value) and not (tmp_path / "result.json").exists()
