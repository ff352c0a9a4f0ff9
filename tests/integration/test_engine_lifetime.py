"""Engine lifetime (issue 25 item 2): an engine lives while the stages that use it run and is closed when no later
stage of the process needs it; an HF engine is closed around a training phase in this process (the trainer loads
its own copy of the weights). `Resources(keep_engines=True)` is the old lifetime (every engine until `close`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import run as run_lib
from pipeline import runtime, stages
from pipeline.config import EngineConfig, load_run_config
from pipeline.config.run import apply_overrides
from pipeline.rounds import launch
from pipeline.store.artifacts import StageStore

TINY = Path(__file__).parents[1] / "data" / "tiny_run.toml"


class _Spy:
    """A real engine that records which stage built it and whether it is closed."""

    def __init__(self, engine, built_in: str):
        self.engine, self.built_in, self.closed = engine, built_in, False

    def generate(self, *args, **kw):
        assert not self.closed, f"generate on a closed engine built in {self.built_in}"
        return self.engine.generate(*args, **kw)

    def load_weights(self, model_dir):
        self.engine.load_weights(model_dir)

    def close(self):
        self.closed = True
        self.engine.close()


@pytest.fixture(scope="module")
def lifetimes(tmp_path_factory):
    """The tiny run's chain (sft -> gft -> grpo, one round each) under both lifetimes: for each, what was open at
    the start of every stage and during every training phase, and the engines built."""
    cfg = apply_overrides(load_run_config(TINY), {"chain": ["sft", "gft", "grpo"], "gft.rounds": 1,
                                                  "grpo.rounds": 1, "grpo.prompts_per_round": 4,
                                                  "grpo.num_generations": 2, "grpo.max_response_tokens": 24,
                                                  "grpo.sampling.max_new_tokens": 24, "tracking.enabled": False})
    return {keep: _walk(cfg, tmp_path_factory.mktemp(f"keep-{keep}"), keep) for keep in (False, True)}


def _walk(cfg, root: Path, keep: bool) -> dict:
    spies, seen, current = [], {"stages": [], "training": []}, ["-"]
    real_build, real_train = runtime.build_engine, launch.train

    def build(model_dir, engine_cfg, **kw):
        spies.append(_Spy(real_build(model_dir, engine_cfg, **kw), current[0]))
        return spies[-1]

    def train(job, **kw):
        seen["training"].append((job.phase, [s.built_in for s in spies if not s.closed]))
        return real_train(job, **kw)

    def ops(call: stages.StageCall):
        current[0] = call.stage
        seen["stages"].append((call.stage, [s.built_in for s in spies if not s.closed]))
        return stages.execute(call, res=res)

    res = runtime.Resources(StageStore(root), progress=False, keep_engines=keep)
    mp = pytest.MonkeyPatch()
    mp.setattr(runtime, "build_engine", build)
    mp.setattr(launch, "train", train)
    try:
        run_lib.execute(cfg, ops, res)
    finally:
        mp.undo()
        res.close()
    return {**seen, "built": [s.built_in for s in spies], "all_closed": all(s.closed for s in spies)}


def test_an_engine_is_closed_when_its_last_stage_ends(lifetimes):
    seen = lifetimes[False]
    assert {"teacher_sample", "evaluate", "gft_round", "grpo_round"} <= set(seen["built"])
    for stage, open_engines in seen["stages"]:
        # at a stage's start, only engines of that stage's own kind are open (consecutive evaluations share)
        assert set(open_engines) <= {stage}, f"{stage} started with engines of {open_engines} open"
    after_teacher = [open_ for stage, open_ in seen["stages"][1:] if stage != "teacher_sample"]
    assert all("teacher_sample" not in open_ for open_ in after_teacher)
    assert seen["all_closed"]


def test_no_engine_is_open_while_a_training_phase_runs_in_process(lifetimes):
    phases = lifetimes[False]["training"]
    assert [phase for phase, _ in phases] == ["sft", "gft_round", "grpo_round"]
    assert all(open_ == [] for _, open_ in phases), phases


def test_the_old_lifetime_keeps_every_engine_to_the_end(lifetimes):
    """The baseline the memory bench compares against: the teacher's engine is still open at the last stage, the
    round's engine is open while its trainer runs (so the tests above can tell the two apart)."""
    old = lifetimes[True]
    assert "teacher_sample" in old["stages"][-1][1]
    assert any(open_ for _, open_ in old["training"])
    assert old["all_closed"]  # close() still closes them


class _Fake:
    def __init__(self):
        self.closed = False

    def load_weights(self, model_dir):
        pass

    def close(self):
        self.closed = True


def test_hold_keeps_a_vllm_engine_a_later_stage_uses_and_releases_hf_engines(tmp_path, monkeypatch):
    """An HF engine is rebuilt cheaply, so it goes whenever its stage is not running; a vLLM engine is kept while a
    later stage of the process uses its role, and released after its last stage."""
    monkeypatch.setattr(runtime, "build_engine", lambda *a, **k: _Fake())
    res = runtime.Resources(StageStore(tmp_path), progress=False)
    hf, vllm = EngineConfig(backend="hf"), EngineConfig(backend="vllm")
    policy, teacher, evaluation = (res.engine("policy", "m", vllm), res.engine("teacher", "t", vllm),
                                   res.engine("eval", "m", hf))
    assert res.hold(["base"], later=["policy"]) == ["teacher", "eval"]
    assert teacher.closed and evaluation.closed and not policy.closed
    assert res.hold([], later=[]) == ["policy"] and policy.closed
    kept = runtime.Resources(StageStore(tmp_path), progress=False, keep_engines=True)
    engine = kept.engine("teacher", "t", hf)
    assert kept.hold([]) == [] and not engine.closed
    kept.close()
    assert engine.closed


def test_scoring_projects_the_vocabulary_in_bounded_chunks(monkeypatch):
    """score_responses (evaluation's entropy and KL, GRPO's reference) projects at most SCORING_CHUNK_BYTES of
    float32 logits at once, and the chunking changes no number: bitwise the one-chunk result, and the float64
    full log-softmax up to float32 rounding."""
    import torch

    from pipeline.model import scoring
    from tests.conftest import random_examples, tiny_lm

    vocab = 70_000  # 239 rows per chunk: the 16 x <=20 response tokens below take two chunks
    model = tiny_lm("llama", vocab=vocab).eval()
    examples = random_examples(16, vocab=vocab, max_prompt=5, max_response=20, seed=1)
    prompts, responses = [e.prompt_ids for e in examples], [e.response_ids for e in examples]
    sizes, real = [], scoring.token_logprobs
    monkeypatch.setattr(scoring, "token_logprobs", lambda *a, chunk_size, **k: (sizes.append(chunk_size),
                                                                                real(*a, chunk_size=chunk_size, **k))[1])
    bounded = scoring.score_responses(model, prompts, responses, pad_id=0)
    assert sizes and all(4 * vocab * s <= scoring.SCORING_CHUNK_BYTES for s in sizes), sizes
    whole = scoring.score_responses(model, prompts, responses, pad_id=0, chunk_size=4096)
    assert all(torch.equal(a, b) for a, b in zip(bounded.logprobs, whole.logprobs))
    assert all(torch.equal(a, b) for a, b in zip(bounded.entropy, whole.entropy))
    with torch.no_grad():
        ref = model.double()
        for p, r, lp, ent in zip(prompts, responses, bounded.logprobs, bounded.entropy):
            logits = ref(torch.tensor([list(p) + list(r)])).logits[0, len(p) - 1:-1]  # [T, V] float64
            logsm = torch.log_softmax(logits, -1)
            torch.testing.assert_close(lp.double(), logsm.gather(-1, torch.tensor(r)[:, None])[:, 0],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ent.double(), -(logsm.exp() * logsm).sum(-1), rtol=1e-5, atol=1e-5)
