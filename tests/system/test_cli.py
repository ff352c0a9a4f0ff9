"""`gft`, the one command line, without a Prefect server: a config error is one line (exit 2), a failed run says
whether a rerun can fix it, a prompt too long for the engine is refused before any model loads (naming the row and
the settings), and the removed `python -m` entry points stay removed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flows.cli import failure_advice, main, parser

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_run.toml"
TEACHER_BUDGET = "sampling = { temperature = 1.0, max_new_tokens = 24, seed = 3 }"


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("command", ["run", "experiment"])
def test_a_config_error_is_one_clear_line_and_exit_code_2(tmp_path, capsys, command):
    bad = _config(tmp_path, 'name = "x"\n[gft]\ntau = -1\n' if command == "run" else 'name = "e"\nbase = 3\n')
    assert main([command, str(bad), "--root", str(tmp_path / "root"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and "Traceback" not in err and "direct cause" not in err, err
    assert len(err.splitlines()) <= 5  # pydantic's message: the field, the rule, its link


def test_an_unknown_refresh_stage_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["run", str(TINY), "--root", str(tmp_path / "root"), "--refresh", "sfft"]) == 2
    assert "--refresh 'sfft': not a stage of this run" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("error, rerun", [
    (ValueError("/data.jsonl row 7: no 'answer' field"), False), (FileNotFoundError("no such file"), False),
    (ModuleNotFoundError("No module named 'my_reward'"), False), (KeyError("problem"), False),
    (RuntimeError("torchrun job exited with code -9"), True), (OSError(28, "No space left on device"), True),
    (TimeoutError("engine did not answer"), True), (None, True),
])
def test_failure_advice_says_rerun_only_when_a_rerun_can_fix_it(error, rerun):
    advice = failure_advice(error)
    assert advice.startswith("Rerun the same command") == rerun, advice
    assert ("A rerun will not fix this" in advice) == (not rerun), advice


def test_a_data_error_in_process_names_what_to_fix_not_a_rerun(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1 = ?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    cfg = _config(tmp_path, TINY.read_text().replace('source = "synthetic"', f'source = "{data}"'))
    assert main(["run", str(cfg), "--root", str(tmp_path / "root"), "--in-process", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "The run failed:" in err and str(data) in err and "data.prompt_column" in err, err
    assert "A rerun will not fix this" in err and "Rerun the same command" not in err, err


def test_a_prompt_too_long_for_the_engine_is_refused_before_a_model_loads(tmp_path, capsys):
    """engine.max_model_len 2048 with the teacher's max_new_tokens 2040 leaves 8 tokens for a prompt: refused
    after prepare_data and the bootstrap, before teacher_sample loads an engine, naming the row and both settings."""
    text = TINY.read_text()
    assert text.count(TEACHER_BUDGET) == 2 and text.index(TEACHER_BUDGET) > text.index("[teacher_sample]")
    cfg = _config(tmp_path, text.replace(TEACHER_BUDGET, TEACHER_BUDGET.replace("= 24", "= 2040"), 1))
    root = tmp_path / "root"
    assert main(["run", str(cfg), "--root", str(root), "--in-process", "--no-progress"]) == 1
    err = capsys.readouterr().err
    first = _first_train_row(root)
    assert f"prompt {first!r} has " in err and "train.parquet" in err, err
    assert "teacher_sample.sampling.max_new_tokens = 2040" in err and "> engine.max_model_len = 2048" in err, err
    assert "A rerun will not fix this" in err
    assert (root / "bootstrap_models").is_dir() and not (root / "teacher_sample").exists()


def _first_train_row(root: Path) -> str:
    import pyarrow.parquet as pq

    [manifest] = [m for m in (root / "prepare_data").glob("*/manifest.json") if not m.parent.name.startswith(".")]
    return str(pq.read_table(manifest.parent / "train.parquet", columns=["id"]).column("id")[0].as_py())


def test_prompt_lengths_pass_a_prompt_that_fits_exactly_and_refuse_one_token_more():
    from pipeline.data.chat import PromptTooLong, check_prompt_lengths, render_prompt

    tok = _char_tokenizer()
    n = len(render_prompt(tok, "abcd"))
    rows = [("r1", "ab"), ("r2", "abcd")]
    assert check_prompt_lengths(tok, rows, max_new_tokens=10, max_model_len=n + 10, where="f",
                                budget_setting="eval.sampling.max_new_tokens") == 2
    with pytest.raises(PromptTooLong, match=rf"f: prompt 'r2' has {n} tokens; with eval.sampling.max_new_tokens = 10 "
                                            rf"it needs {n + 10} > engine.max_model_len = {n + 9}"):
        check_prompt_lengths(tok, rows, max_new_tokens=10, max_model_len=n + 9, where="f",
                             budget_setting="eval.sampling.max_new_tokens")


def _char_tokenizer():
    """A character-level fast tokenizer with a chat template, built in code (one token per character)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<eos>", *"abcdefghijklmnopqrstuvwxyz:| "])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}|{% endfor %}assistant: "
    return tok


@pytest.mark.parametrize("argv, fn", [(["join", "/r/sft/.job/job.json"], "cmd_join"),
                                      (["follow", "/r"], "cmd_follow"),
                                      (["run", "c.toml", "--in-process"], "cmd_run"),
                                      (["experiment", "e.toml", "--in-process"], "cmd_experiment")])
def test_gft_is_the_one_front_door(argv, fn):
    """What `python -m pipeline.run`, `python -m pipeline.experiment` and the launcher's --join/--follow offered
    are gft subcommands; the module entry points are gone."""
    args = parser().parse_args(argv)
    assert args.fn.__name__ == fn
    assert importlib.util.find_spec("pipeline.experiment.__main__") is None
    import pipeline.experiment.trials as trials
    import pipeline.run as run

    assert not hasattr(run, "main") and not hasattr(trials, "main")
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("[")[0]
    assert [line.split("=")[0].strip() for line in scripts.strip().splitlines() if "=" in line] == ["gft"]


def test_the_join_and_follow_commands_call_the_launcher(monkeypatch, tmp_path):
    import pipeline.rounds.launch as launch

    seen = []
    monkeypatch.setattr(launch, "join", lambda spec: seen.append(("join", Path(spec))) or 3)
    monkeypatch.setattr(launch, "follow", lambda candidates, **kw: seen.append(("follow", list(candidates()))))
    job = tmp_path / "sft" / ".ckpt-abc" / "job" / "job.json"  # where a stage's training job writes its spec
    job.parent.mkdir(parents=True)
    job.write_text("{}")
    assert main(["join", str(tmp_path / "job.json")]) == 3
    assert main(["follow", str(tmp_path)]) == 0
    assert seen == [("join", tmp_path / "job.json"), ("follow", [job])]


def test_a_cached_rerun_keeps_the_plots_of_the_same_outputs(tmp_path):
    """The plots are redrawn only when what they show changed (an output's digest) or a file is gone."""
    import os

    from pipeline.config import apply_overrides, load_run_config
    from pipeline.report import write_plots
    from pipeline.store.artifacts import ArtifactRef

    cfg = apply_overrides(load_run_config(TINY), {"chain": []})
    metrics = {"base": {"greedy_accuracy": 0.5, "mean@2": 0.25, "pass@2": 0.75}}

    def draw(sha: str) -> float:
        """The plot's mtime after write_plots; then set an hour back, so a redraw shows as a newer file."""
        ref = ArtifactRef(kind="eval", uri=str(tmp_path / "eval"), sha256=sha * 64, schema_version=1)
        [png] = write_plots(cfg, {"eval/base": ref}, metrics, tmp_path / "out")
        mtime = png.stat().st_mtime
        os.utime(png, (mtime - 3600, mtime - 3600))
        return mtime

    first = draw("a")
    assert draw("a") == first - 3600  # the same outputs: kept, not written again
    assert draw("b") >= first  # another output's digest: redrawn
    (tmp_path / "out" / "accuracy.png").unlink()
    assert draw("b") >= first  # a plot gone: redrawn
