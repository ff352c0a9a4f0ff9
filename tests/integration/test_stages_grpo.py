"""The GRPO stage on tiny data: outputs and their schema, metric names, runtime (no work on a second call),
the reference as an input only when beta > 0, resuming after the last finished round."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from pipeline import runtime, stages
from pipeline.store.artifacts import StageStore
from pipeline.config import GRPOConfig, SamplingConfig, TrainConfig
from tests.integration.test_stages import DATA, SYNTH

GRPO = GRPOConfig(rounds=2, prompts_per_round=3, num_generations=2, max_response_tokens=16, beta=0.04,
                  sampling=SamplingConfig(temperature=1.0, max_new_tokens=16, seed=3), minibatches_per_round=2,
                  num_iterations=2, rewards=("math_answer", "tests.reward_helpers:none_for_odd_id"),
                  reward_weights=(1.0, 0.5), train=TrainConfig(lr=1e-3, micro_batch_size=4))
METRICS = ("reward", "reward_std", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean",
           "clip_ratio/region_mean", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio",
           "perf/throughput", "perf/sample_s", "perf/reward_s", "perf/train_s", "sampling/sampling_logp_difference/mean",
           "sampling/sampling_logp_difference/max", "sampling/kl_k3", "sampling/importance_sampling_ratio/mean",
           "rewards/math_answer/mean", "rewards/none_for_odd_id/mean")


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """GRPO from the bootstrap base twice over one store, each pass on a fresh Resources."""
    root = tmp_path_factory.mktemp("store")

    def once():
        res = runtime.Resources(StageStore(root), progress=False)
        try:
            prompts = stages.prepare_data(DATA, *stages.prepare_data_inputs(DATA, SYNTH), res=res)
            base = stages.bootstrap_member(stages.bootstrap_models(SYNTH, res=res), "base")
            rounds = stages.grpo(GRPO, prompts, base, res=res, seed=1)
            return {"prompts": prompts, "base": base, "rounds": rounds}, dict(res.calls)
        finally:
            res.close()

    first, first_calls = once()
    second, second_calls = once()
    return root, first, first_calls, second, second_calls


def test_second_call_does_no_work(grpo_run):
    _, first, first_calls, second, second_calls = grpo_run
    assert first_calls["grpo_round"] == 2
    assert first_calls["optimizer.step"] == 2 * 2 * 2  # rounds x minibatches x iterations
    assert second_calls == {}
    assert first == second


def test_outputs_and_schema(grpo_run):
    _, first, *_ = grpo_run
    folder = Path(first["rounds"][0].uri)
    assert {"model", "state", "groups.parquet", "history.jsonl", "manifest.json"} <= {p.name for p in folder.iterdir()}
    frame = pd.read_parquet(folder / "groups.parquet")
    assert list(frame.columns) == ["prompt_id", "group_index", "source", "response", "token_ids", "sampler_logprobs",
                                   "reward", "advantage", "truncated"]
    assert len(frame) == GRPO.prompts_per_round * GRPO.num_generations
    assert set(frame["source"]) == {"policy"}
    assert all(len(lp) == len(ids) for lp, ids in zip(frame["sampler_logprobs"], frame["token_ids"]))
    assert all(len(ids) <= GRPO.max_response_tokens for ids in frame["token_ids"])
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    second = [json.loads(line) for line in (Path(first["rounds"][1].uri) / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in second] == [5, 6, 7, 8]  # the optimizer state continues across rounds
    assert history[0]["ratio_mean"] == 1.0 and "kl" in history[0]


def test_metric_names(grpo_run):
    _, first, *_ = grpo_run
    manifest = json.loads((Path(first["rounds"][0].uri) / "manifest.json").read_text())
    metrics = manifest["metrics"]
    missing = [m for m in METRICS if m not in metrics]
    assert not missing, missing
    assert 0.0 <= metrics["completions/clipped_ratio"] <= 1.0 and metrics["perf/throughput"] > 0
    assert metrics["sampling/sampling_logp_difference/mean"] < 1e-3  # HF engine and trainer, both float32
    assert not math.isnan(metrics["reward"])


def test_grpo_resumes_after_its_last_finished_round(grpo_run):
    root, first, *_ = grpo_run
    (Path(first["rounds"][1].uri) / "groups.parquet").unlink()
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        rounds = stages.grpo(GRPO, first["prompts"], first["base"], res=res, seed=1)
    finally:
        res.close()
    assert res.calls == {"grpo_round": 1, "engine.generate": 1, "optimizer.step": 4}
    assert rounds[0] == first["rounds"][0]


def test_prompt_pool_makes_rounds_revisit_the_same_prompts(grpo_run):
    """With prompt_pool = prompts_per_round every round draws the same prompts; without it, the next ones."""
    root, first, *_ = grpo_run
    pooled = GRPO.model_copy(update={"prompt_pool": GRPO.prompts_per_round, "rounds": 2})
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        rounds = stages.grpo(pooled, first["prompts"], first["base"], res=res, seed=1)
    finally:
        res.close()

    def ids(ref):
        return set(pd.read_parquet(Path(ref.uri) / "groups.parquet")["prompt_id"])

    train = pd.read_parquet(Path(first["prompts"].uri) / "train.parquet")
    assert ids(rounds[0]) == ids(rounds[1]) == set(train["id"].astype(str)[: GRPO.prompts_per_round])
    assert ids(first["rounds"][0]) != ids(first["rounds"][1])
