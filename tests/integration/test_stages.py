"""Every stage on tiny data: outputs, runtime (no work on a second call), recompute after damage."""

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline import runtime, stages
from pipeline.store.artifacts import StageStore
from pipeline.config import (
    DataConfig, EvalConfig, GFTConfig, SamplingConfig, SFTConfig, SyntheticConfig, TeacherSampleConfig, TrainConfig,
)

SYNTH = SyntheticConfig(n_train=64, n_eval=8, teacher_steps=3, base_steps=2, batch_size=8, warmup_steps=0)
DATA = DataConfig(synthetic_rows=40, eval_fraction=0.25)
SAMPLE = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=3)
TEACH = TeacherSampleConfig(k=2, sampling=SAMPLE)
SFT = SFTConfig(max_response_tokens=48, train=TrainConfig(lr=1e-3, num_steps=2, sequences_per_step=8,
                                                           micro_batch_size=8))
GFT = GFTConfig(rounds=2, prompts_per_round=4, expert=1, teacher=1, policy=2, minibatches_per_round=2,
                max_response_tokens=24, sampling=SAMPLE, train=TrainConfig(lr=1e-3, micro_batch_size=16))
EVAL = EvalConfig(k=2, max_prompts=4, kl_samples=1, sampling=SamplingConfig(temperature=0.5, max_new_tokens=24))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """One pass over every stage, and a second pass on a fresh Resources over the same store."""
    root = tmp_path_factory.mktemp("store")

    def once():
        res = runtime.Resources(StageStore(root), progress=False)
        try:
            refs = {"prompts": stages.prepare_data(DATA, *stages.prepare_data_inputs(DATA, SYNTH), res=res)}
            pair = stages.bootstrap_models(SYNTH, res=res)
            refs["base"], refs["teacher_model"] = (stages.bootstrap_member(pair, r) for r in ("base", "teacher"))
            refs["teacher"] = stages.teacher_sample(TEACH, refs["prompts"], refs["teacher_model"], res=res)
            refs["sft"] = stages.sft(SFT, refs["prompts"], refs["teacher"], refs["base"], res=res)
            rounds = stages.gft(GFT, refs["prompts"], refs["teacher"], refs["base"], res=res)
            refs["gft0"], refs["gft"] = rounds
            refs["eval"] = stages.evaluate(EVAL, refs["prompts"], refs["gft"], refs["base"], res=res)
            return refs, dict(res.calls)
        finally:
            res.close()

    first, first_calls = once()
    second, second_calls = once()
    return root, first, first_calls, second, second_calls


def test_second_call_does_no_work(pipeline_run):
    _, first, first_calls, second, second_calls = pipeline_run
    assert first_calls["optimizer.step"] == 2 + 2 * 2  # sft 2 steps, 2 rounds x 2 minibatches
    assert first_calls["engine.generate"] >= 4
    assert second_calls == {}  # no stage ran, no engine call, no optimizer step
    assert first == second


def test_group_dataset_schema(pipeline_run):
    from datasets import load_dataset

    path = Path(pipeline_run[1]["gft0"].uri) / "groups.parquet"
    frame = pd.read_parquet(path)
    expected = {"prompt_id", "group_index", "source", "response", "token_ids", "sampler_logprobs", "reward",
                "advantage", "truncated"}
    assert expected <= set(frame.columns)
    assert len(frame) == GFT.prompts_per_round * 4  # 1 expert + 1 teacher + 2 policy
    groups = frame.groupby("prompt_id")["source"].apply(sorted)
    assert all(tuple(g) == ("expert", "policy", "policy", "teacher") for g in groups)
    policy = frame[frame["source"] == "policy"]
    assert all(len(lp) == len(ids) for lp, ids in zip(policy["sampler_logprobs"], policy["token_ids"]))
    assert frame.loc[frame["source"] != "policy", "sampler_logprobs"].isna().all()
    assert set(frame["reward"]) <= {0.0, 1.0}
    hf = load_dataset("parquet", data_files=str(path), split="train")
    assert expected <= set(hf.column_names) and hf.num_rows == len(frame)


def test_expert_rewards_are_all_one(pipeline_run):
    frame = pd.read_parquet(Path(pipeline_run[1]["gft0"].uri) / "groups.parquet")
    assert frame.loc[frame["source"] == "expert", "reward"].eq(1.0).all()  # the solutions verify


def test_eval_metrics(pipeline_run):
    metrics = json.loads((Path(pipeline_run[1]["eval"].uri) / "metrics.json").read_text())
    for name in ("mean@2", "pass@2", "greedy_accuracy", "entropy", "kl_base_policy", "distinct_answers"):
        assert name in metrics
    assert 0.0 <= metrics["greedy_accuracy"] <= 1.0 and metrics["entropy"] > 0


def test_damaged_output_recomputes_only_that_stage(pipeline_run):
    root, first, *_ = pipeline_run
    (Path(first["sft"].uri) / "model" / "config.json").write_text("{}")  # alter one file
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        again = stages.sft(SFT, first["prompts"], first["teacher"], first["base"], res=res)
        stages.gft_round(GFT, 0, first["prompts"], first["teacher"], first["base"], res=res)
        stages.prepare_data(DATA, *stages.prepare_data_inputs(DATA, SYNTH), res=res)
    finally:
        res.close()
    assert res.calls == {"sft": 1, "optimizer.step": 2}
    assert again.sha256 == first["sft"].sha256  # same inputs, same seed: the same model again


def test_gft_resumes_after_its_last_finished_round(pipeline_run):
    # Delete the last round's group dataset: rerunning GFT serves round 0 and recomputes round 1 only.
    root, first, *_ = pipeline_run
    (Path(first["gft"].uri) / "groups.parquet").unlink()
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        rounds = stages.gft(GFT, first["prompts"], first["teacher"], first["base"], res=res)
    finally:
        res.close()
    assert res.calls == {"gft_round": 1, "engine.generate": 1, "optimizer.step": GFT.minibatches_per_round}
    assert rounds[0] == first["gft0"]
    assert (Path(rounds[1].uri) / "groups.parquet").exists()


def test_same_key_same_bytes_whatever_ran_before_in_the_process(pipeline_run, tmp_path):
    """A round's output (its state/ holds the process's RNG state) depends on its key only. With no policy
    members the engine never reseeds the process (nor does vLLM's engine ever), so only the round's own seeding
    keeps the bytes: draw from every global RNG differently before each computation of the same round."""
    import random

    import numpy as np
    import torch

    root, first, *_ = pipeline_run
    offline = GFT.model_copy(update={"policy": 0})
    digests = []
    for seed in (1, 2):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        res = runtime.Resources(StageStore(tmp_path / f"store-{seed}"), progress=False)  # two separate outputs
        try:
            digests.append(stages.gft_round(offline, 0, first["prompts"], first["teacher"], first["base"],
                                            res=res).sha256)
        finally:
            res.close()
        assert res.calls["gft_round"] == 1 and "engine.generate" not in res.calls
    assert digests[0] == digests[1]


def _file_digests(ref) -> dict[str, str]:
    import hashlib

    folder = Path(ref.uri)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}  # manifest: timings


def test_a_round_s_bytes_do_not_depend_on_other_threads_drawing_from_global_rngs(pipeline_run, tmp_path):
    """Under Prefect other threads draw from the process-global `random` while a stage runs (issue 26 item 2: a
    round's state/rng-0.pt then differed between two runs of one config, and every later key moved). Computed
    into two roots, once alone and once while a thread draws from python's and numpy's global generators
    throughout, a round's output is the same bytes, file by file."""
    import random
    import threading
    import time

    import numpy as np

    _, first, *_ = pipeline_run
    offline = GFT.model_copy(update={"policy": 0})
    outputs = []
    for busy in (False, True):
        stop = threading.Event()

        def draw() -> None:
            while not stop.is_set():
                random.random(), np.random.random()
                time.sleep(0.0005)

        thread = threading.Thread(target=draw, daemon=True)
        res = runtime.Resources(StageStore(tmp_path / f"store-{busy}"), progress=False)
        try:
            if busy:
                thread.start()
            ref = stages.gft_round(offline, 1, first["prompts"], first["teacher"], first["gft0"], res=res)
        finally:
            stop.set()
            thread.join() if busy else None
            res.close()
        outputs.append((ref.sha256, _file_digests(ref)))
    assert any(name.startswith("state/") for name in outputs[0][1])  # the round's continuation state is compared
    assert outputs[0] == outputs[1]


def test_no_progress_reaches_the_engines_bars(pipeline_run, tmp_path, capfd):
    """`--no-progress` (Resources.progress False) silences the engines' `generate:` bars too; with progress on,
    the bar is drawn (so the check can fail)."""
    from pipeline.config import EngineConfig

    _, first, *_ = pipeline_run
    drawn = {}
    for progress in (True, False):
        res = runtime.Resources(StageStore(tmp_path / "store"), progress=progress)
        try:
            engine = res.engine("eval", runtime.model_dir(first["base"]), EngineConfig())
            capfd.readouterr()
            engine.generate([[5, 6, 7]], 1, SAMPLE.model_copy(update={"max_new_tokens": 2}))
            drawn[progress] = "generate" in capfd.readouterr().err
        finally:
            res.close()
    assert drawn == {True: True, False: False}


def test_evaluating_the_base_samples_it_once_and_sft_logs_its_throughput(pipeline_run, tmp_path):
    """KL(base || base) is 0 by definition: the base's evaluation samples k + greedy, not a third KL pass.
    SFT's metrics carry perf/* like the rounds'."""
    root, first, *_ = pipeline_run
    res = runtime.Resources(StageStore(tmp_path / "store"), progress=False)
    try:
        ref = stages.evaluate(EVAL, first["prompts"], first["base"], first["base"], res=res)
    finally:
        res.close()
    assert res.calls["engine.generate"] == 2
    assert json.loads((Path(ref.uri) / "metrics.json").read_text())["kl_base_policy"] == 0.0
    sft = json.loads((Path(first["sft"].uri) / "manifest.json").read_text())["metrics"]
    assert sft["perf/throughput"] > 0 and sft["perf/train_tokens"] > 0 and sft["perf/step_s"] > 0


def test_validation_metrics_grade_the_validation_rows(pipeline_run, tmp_path):
    """With eval.validation, a checkpoint is also graded on validation.parquet: its val/* metrics equal the test
    metrics of an evaluation whose held-out rows are those validation rows (a .jsonl of them, all held out), the
    test metrics are those of an evaluation without it, and the three splits are disjoint."""
    root, first, *_ = pipeline_run
    res = runtime.Resources(StageStore(tmp_path / "store"), progress=False)
    graded = EVAL.model_copy(update={"reward": "tests.reward_helpers:even_length"})  # nonzero on tiny models
    try:
        data = DATA.model_copy(update={"validation_fraction": 0.25})
        prompts = stages.prepare_data(data, *stages.prepare_data_inputs(data, SYNTH), res=res)
        parts = {n: pd.read_parquet(Path(prompts.uri) / f"{n}.parquet") for n in ("train", "eval", "validation")}
        assert all(len(p) for p in parts.values())
        assert not set(parts["validation"]["id"]) & (set(parts["train"]["id"]) | set(parts["eval"]["id"]))
        both = _metrics(stages.evaluate(graded.model_copy(update={"validation": True}), prompts, first["sft"],
                                        first["base"], res=res))
        plain = _metrics(stages.evaluate(graded, prompts, first["sft"], first["base"], res=res))
        rows = tmp_path / "validation.jsonl"
        parts["validation"].to_json(rows, orient="records", lines=True)
        held = DataConfig(source=str(rows), eval_fraction=0.99, validation_fraction=0.0)  # u < 0.5 for these ids
        alone = stages.prepare_data(held, *stages.prepare_data_inputs(held, SYNTH), res=res)
        assert pd.read_parquet(Path(alone.uri) / "eval.parquet")["id"].tolist() == parts["validation"]["id"].tolist()
        direct = _metrics(stages.evaluate(graded, alone, first["sft"], first["base"], res=res))
    finally:
        res.close()
    assert {k: v for k, v in both.items() if not k.startswith("val/")} == plain
    assert {f"val/{k}" for k in ("mean@2", "pass@2", "greedy_accuracy")} <= set(both)
    for name, value in both.items():
        if name.startswith("val/"):
            assert value == direct[name.removeprefix("val/")], name
    assert 0 < both["val/mean@2"] < 1 and both["val/mean@2"] != both["mean@2"]  # graded, and other rows


def _metrics(ref) -> dict:
    return json.loads((Path(ref.uri) / "metrics.json").read_text())
