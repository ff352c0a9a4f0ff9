"""Stages under failure: a killed stage leaves nothing half-written and resumes; bad input is named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import runtime, stages
from pipeline.store.artifacts import StageStore
from pipeline.config import DataConfig, SFTConfig, SyntheticConfig, TrainConfig
from pipeline.data.prompts import DataError

ROOT = Path(__file__).resolve().parents[2]
SYNTH = SyntheticConfig(n_train=32, n_eval=8, teacher_steps=2, base_steps=1, batch_size=8, warmup_steps=0)
DATA = DataConfig(synthetic_rows=40, eval_fraction=0.25)
LONG_SFT = SFTConfig(max_response_tokens=48, train=TrainConfig(lr=1e-3, num_steps=60, sequences_per_step=8,
                                                                micro_batch_size=8, save_every=1))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        prompts = stages.prepare_data(DATA, *stages.prepare_data_inputs(DATA, SYNTH), res=res)
        base = stages.bootstrap_member(stages.bootstrap_models(SYNTH, res=res), "base")
    finally:
        res.close()
    return root, prompts, base


@pytest.mark.slow
def test_killed_stage_leaves_nothing_half_written_and_resumes(inputs):
    root, prompts, base = inputs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/stage_worker.py"), str(root),
                             prompts.model_dump_json(), base.model_dump_json()], env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((root / "sft").glob(".ckpt-*/step-*")) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.3)  # a few more steps (of 60), mid-write of the stage's temp folder and checkpoints
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpts = list((root / "sft").glob(".ckpt-*/step-*"))
    assert ckpts, "the worker never reached its first checkpoint"
    done_before = max(int(p.name.split("-")[1]) for p in ckpts)
    finals = [p for p in (root / "sft").iterdir() if not p.name.startswith(".")]
    assert finals == []  # no published output
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        ref = stages.sft(LONG_SFT, prompts, None, base, res=res)
    finally:
        res.close()
    assert done_before < LONG_SFT.train.num_steps, "the worker finished before the kill: the test saw no resume"
    assert res.calls["optimizer.step"] == LONG_SFT.train.num_steps - done_before  # resumed, not restarted
    assert (Path(ref.uri) / "model" / "config.json").exists()
    assert not list((root / "sft").glob(".tmp-*")) and not list((root / "sft").glob(".ckpt-*"))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_are_all_named_before_any_stage_runs(tmp_path):
    rows = [
        {"id": "ok", "prompt": "1+1?", "solution": "\\boxed{2}", "answer": "2"},
        {"id": "empty-prompt", "prompt": "", "solution": "\\boxed{2}", "answer": "2"},
        {"id": "bad-gold", "prompt": "2+2?", "solution": "\\boxed{4}", "answer": "\\frac{"},
        {"id": "no-answer", "prompt": "3+3?", "solution": "\\boxed{6}", "answer": ""},
    ]
    cfg = DataConfig(source=str(_write_jsonl(tmp_path / "p.jsonl", rows)))
    res = runtime.Resources(StageStore(tmp_path / "store"), progress=False)
    try:
        with pytest.raises(DataError) as err:
            stages.prepare_data(cfg, *stages.prepare_data_inputs(cfg, SYNTH), res=res)
        for name in ("empty-prompt", "bad-gold", "no-answer"):
            assert name in str(err.value)
        assert not (tmp_path / "store" / "prepare_data").exists() or not [
            p for p in (tmp_path / "store" / "prepare_data").iterdir() if not p.name.startswith(".")]
        skip = cfg.model_copy(update={"on_bad_row": "skip", "eval_fraction": 0.0})
        skipped = stages.prepare_data(skip, *stages.prepare_data_inputs(skip, SYNTH), res=res)
    finally:
        res.close()
    report = json.loads((Path(skipped.uri) / "report.json").read_text())
    assert report["kept"] == 1 and report["skipped"] == 3


def test_missing_column_names_the_file_and_column(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "question": "1+1?", "solution": "2", "answer": "2"}])
    res = runtime.Resources(StageStore(tmp_path / "store"), progress=False)
    try:
        with pytest.raises(DataError, match=r"(?s)p\.jsonl.*prompt"):
            stages.prepare_data(DataConfig(source=str(path)), *stages.prepare_data_inputs(DataConfig(source=str(path)), SYNTH), res=res)
    finally:
        res.close()


def test_long_expert_responses_are_cut_and_counted(inputs):
    root, prompts, base = inputs
    cfg = SFTConfig(max_response_tokens=4, train=TrainConfig(num_steps=1, sequences_per_step=8, micro_batch_size=8))
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        ref = stages.sft(cfg, prompts, None, base, res=res)
    finally:
        res.close()
    manifest = StageStore(root).manifest(ref)
    assert manifest.metrics["truncated_responses"] == manifest.metrics["examples"] > 0
