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


def _config(processes: int, strategy: str = "ddp"):
    overrides = {"tracking.enabled": False}
    for section in ("sft", "gft"):
        overrides.update({f"{section}.train.{k}": v for k, v in F64.items()})
        overrides[f"{section}.train.launch.processes"] = processes
        overrides[f"{section}.train.launch.strategy"] = strategy
    return apply_overrides(load_run_config(TINY), overrides)


def _weights(ref) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ref.uri) / "model" / "model.safetensors"))


@pytest.mark.parametrize("launch", [{"processes": 2}, {"job": True}])
def test_grpo_rounds_refuse_a_launched_job(launch):
    with pytest.raises(ValueError, match="GRPO rounds train in the stage's process"):
        GRPOConfig.model_validate({"train": {"launch": launch}})


def test_one_process_launches_only_when_asked():
    from pipeline.config import LaunchConfig

    assert [LaunchConfig(**kw).launched for kw in ({}, {"job": True}, {"processes": 2})] == [False, True, True]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_run_of_one(tmp_path, strategy):
    from pipeline.run import run

    one = run(_config(1), root=tmp_path, progress=False)
    two = run(_config(2, strategy), root=tmp_path, progress=False)  # same root: data, models, teacher served
    assert two.calls.get("prepare_data", 0) == 0 and one.refs["sft"].sha256 != two.refs["sft"].sha256
    for name in ("sft", "gft"):
        a, b = _weights(one.refs[name]), _weights(two.refs[name])
        assert a.keys() == b.keys() and all(t.dtype == torch.float64 for t in a.values())
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")
        print(f"{name} ({strategy}): max |2 processes - 1 process| = "
              f"{max((b[k] - a[k]).abs().max().item() for k in a):.2e}")
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


def _workers(spec_part: str) -> list[int]:
    """Pids of the job's training processes (not torchrun itself), found by their command line in /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if entry.name.isdigit() and any(spec_part in c for c in cmd) and "torch.distributed.run" not in cmd:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_killed_worker_fails_the_stage_and_the_rerun_resumes_exactly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.run import run
    from pipeline.store.outputs import read_output

    text = TINY.read_text().replace('chain = ["sft", "gft"]', 'chain = ["sft"]').replace(
        "train = { lr = 1e-3, num_steps = 2, sequences_per_step = 8, micro_batch_size = 8 }",
        'train = { lr = 1e-3, num_steps = 12, sequences_per_step = 8, micro_batch_size = 8, save_every = 1, '
        'master_dtype = "float64", save_dtype = "float64", launch = { processes = 2 } }') + "\n[tracking]\nenabled = false\n"
    config = tmp_path / "sft2.toml"
    config.write_text(text)
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "pipeline.run", str(config), "--root", str(root), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # keep_checkpoints = 1: step-2 goes when step-3 is written, so any step from 2 on will do
        while not [p for p in root.glob("sft/.ckpt-*/step-*") if 2 <= int(p.name.split("-")[1]) < 12]:
            assert proc.poll() is None and time.monotonic() < deadline, "the job wrote no checkpoint from step 2 on"
            time.sleep(0.05)
        victim = _workers(str(root / "sft"))[-1]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "TrainJobError" in err and "sft training job (2 processes)" in err, err[-2000:]
    assert not list(root.glob("sft/[!.]*")) and not _workers(str(root / "sft"))  # nothing published, none left
    done = [int(p.name.split("-")[1]) for p in root.glob("sft/.ckpt-*/step-*")]
    (steps,) = root.glob("sft/.ckpt-*/job/steps.jsonl")  # what the stage's progress bar followed: rank 0's steps
    reported = [json.loads(line) for line in steps.read_text().splitlines()]
    assert [r["done"] for r in reported] == list(range(1, len(reported) + 1)) and len(reported) >= max(done)
    assert all(r["sequences"] == 8 for r in reported)  # each row is a whole step of both processes
    resumed = run(load_run_config(config), root=root, progress=False)  # resumes from the last checkpoint
    fresh = run(load_run_config(config), root=tmp_path / "fresh", progress=False)
    history = [json.loads(line) for line in (Path(resumed.refs["sft"].uri) / "history.jsonl").read_text().splitlines()]
    assert done and [h["step"] for h in history] == list(range(1, 13))
    trained = {name: read_output(r.refs["sft"]).metrics["perf/train_tokens"] for name, r in
               (("resumed", resumed), ("fresh", fresh))}
    after = sum(h["tokens"] for h in history if h["step"] > max(done))
    assert trained["resumed"] == after < trained["fresh"]  # the rerun trained only the steps after the checkpoint
    a, b = _weights(fresh.refs["sft"]), _weights(resumed.refs["sft"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-12, atol=0, msg=key)


def test_the_progress_reader_takes_only_complete_new_lines(tmp_path):
    from pipeline.rounds.launch import _new_rows

    path = tmp_path / "steps.jsonl"
    assert _new_rows(path, 0) == ([], 0)  # the job has not reported yet
    path.write_text('{"done": 1}\n{"done": 2}\n{"do')
    rows, offset = _new_rows(path, 0)
    assert [r["done"] for r in rows] == [1, 2]
    path.write_text('{"done": 1}\n{"done": 2}\n{"done": 3}\n')
    rows, offset = _new_rows(path, offset)
    assert [r["done"] for r in rows] == [3] and _new_rows(path, offset) == ([], offset)
