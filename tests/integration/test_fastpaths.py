"""GPU fast paths checked against the plain paths on CPU: varlen packed attention, the compiled log-prob head,
the compiled model body. Values and gradients, to float64/float32/bf16 tolerances; no timings here."""

import pytest
import torch
from torch.testing import assert_close

from pipeline.model import attention
from pipeline.config import TrainConfig
from pipeline.model.batches import collate_packed, collate_padded, plan_step
from pipeline.model.logprobs import token_logprobs
from pipeline.model.scoring import TokenScorer, gft_objective
from pipeline.model.trainer import accumulate_gradients, make_trainer
from tests.conftest import PAD, random_examples, tiny_lm
from tests.reference import token_stats_reference


def _score(scorer, batch, packed=None):
    return scorer(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                  targets=batch.targets, loss_mask=batch.loss_mask, packed=packed)[0]


# ------------------------------------------------------------------------------------------ varlen packing


def test_packed_lengths_are_the_sequence_boundaries():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    got = attention.packed_lengths(pos)
    assert got["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and got["max_length_q"] == 4
    assert got["cu_seq_lens_q"].dtype == torch.int32
    with pytest.raises(ValueError, match="start at 0"):
        attention.packed_lengths(torch.tensor([[1, 2, 0]]))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_varlen_packed_rows_equal_padded_rows_values_and_gradients(kind):
    examples, idx = random_examples(7, seed=4), list(range(7))
    padded, packed = collate_padded(examples, idx, PAD), collate_packed(examples, idx, PAD, max_tokens=40)
    assert len(packed) > 1
    results = []
    for varlen in (False, True):
        model = tiny_lm(kind, dtype=torch.float64)
        scorer = TokenScorer(model, chunk_size=5, varlen=varlen)
        if varlen:
            lp = torch.cat([_score(scorer, b, attention.packed_lengths(b.position_ids)) for b in packed])
            assert model.config._attn_implementation == attention.VARLEN
        else:
            lp = _score(scorer, padded)
        (lp * torch.linspace(-1, 1, lp.numel(), dtype=lp.dtype)).sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp_pad, g_pad), (lp_var, g_var) = results
    assert_close(lp_var, lp_pad, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_var, g_pad):
        assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_varlen_model_without_boundaries_is_plain_sdpa():
    examples, idx = random_examples(5, seed=5), list(range(5))
    padded = collate_padded(examples, idx, PAD)
    plain = _score(TokenScorer(tiny_lm(dtype=torch.float64), chunk_size=5), padded)
    varlen = _score(TokenScorer(tiny_lm(dtype=torch.float64), chunk_size=5, varlen=True), padded)
    assert_close(varlen, plain, rtol=1e-12, atol=1e-12)


def _fake_varlen(new_api: bool):
    """Stands in for torch's flash varlen_attn (old or new signature), computing the reference per sequence."""
    def old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and k.shape[1] == q.shape[1]  # the old kernel has no GQA: heads repeated
        return attention._per_sequence(q, k, v, cu_q.tolist(), q.shape[-1] ** -0.5)

    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
            enable_gqa=False):
        assert window_size == (-1, 0) and enable_gqa
        return attention._per_sequence(q, k, v, cu_q.tolist(), scale)
    return new if new_api else old


@pytest.mark.parametrize("new_api", [False, True])
def test_varlen_kernel_arguments_for_both_torch_signatures(monkeypatch, new_api):
    import inspect
    fake = _fake_varlen(new_api)
    monkeypatch.setattr(attention, "_VARLEN_ATTN", fake)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", tuple(inspect.signature(fake).parameters))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(9, 4, 8, generator=g), torch.randn(9, 2, 8, generator=g), torch.randn(9, 2, 8, generator=g)
    cu = [0, 4, 9]
    got = attention._varlen_kernel(q, k, v, torch.tensor(cu, dtype=torch.int32), 5, 8 ** -0.5)
    assert_close(got, attention._per_sequence(q, k, v, cu, 8 ** -0.5))


def test_varlen_under_autocast_reaches_the_flash_kernel_in_bf16(monkeypatch):
    """Float32 weights under bf16 autocast (GPU training): RoPE hands the attention q and k in float32 and v in
    bf16. The flash kernel, which autocast does not cast for, must still get all three in bf16."""
    import inspect

    new, calls = _fake_varlen(True), []

    def fake(q, k, v, *args, **kwargs):
        calls.append((q.dtype, k.dtype, v.dtype))
        return new(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "_VARLEN_ATTN", fake)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", tuple(inspect.signature(new).parameters))
    monkeypatch.setattr(attention, "varlen_available", lambda device: True)  # as on CUDA
    examples, idx = random_examples(6, seed=7), list(range(6))
    packed = collate_packed(examples, idx, PAD, max_tokens=40)
    out = []
    for autocast in (False, True):  # float32 goes to the per-sequence reference, bf16 autocast to the kernel
        scorer = TokenScorer(tiny_lm(), chunk_size=5, varlen=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out.append(torch.cat([_score(scorer, b, attention.packed_lengths(b.position_ids)) for b in packed]))
    assert calls and set(calls) == {(torch.bfloat16,) * 3}
    assert len(calls) == 2 * len(packed)  # every layer of every packed row
    assert_close(out[1], out[0], rtol=0, atol=0.05)


# ------------------------------------------------------------------------------------------ compiled paths


def test_compiled_head_and_kept_logits_match_plain_head_float32_and_bf16():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()
    bias = torch.randn(50, generator=g).requires_grad_()
    labels, upstream = torch.randint(0, 50, (37,), generator=g), torch.randn(37, generator=g)
    for autocast in (False, True):
        out = []
        for compiled, keep in ((False, False), (True, False), (True, True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                stats = token_logprobs(hidden, weight, labels, bias=bias, chunk_size=16, compiled=compiled,
                                       keep_logits=keep)
            grads = torch.autograd.grad((stats.logprobs * upstream).sum(), [hidden, weight, bias])
            out.append((stats.logprobs.detach(), stats.entropy, *grads))
        # the bf16 logits (bias added) are rounded the same way on both paths; only the float32 sums differ
        for plain, fast in ((out[0], out[1]), (out[0], out[2])):
            for a, b in zip(plain, fast):
                assert a.dtype == b.dtype
                assert_close(b, a, rtol=1e-5, atol=1e-5)
    ref_lp, ref_ent = token_stats_reference(hidden.double(), weight.double(), bias.double(), labels)
    assert_close(out[1][0].double(), ref_lp.detach(), rtol=0, atol=0.05)  # bf16 run against float64


def test_compiled_head_scores_at_the_temperature_like_the_plain_head():
    # score_at_temperature on the compiled fused path: the kernels see the tempered logits; values and gradients
    # equal the plain head's, and the plain head's equal float64 log_softmax((hidden @ W.T + b) / T).
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()
    bias = torch.randn(50, generator=g).requires_grad_()
    labels, upstream = torch.randint(0, 50, (37,), generator=g), torch.randn(37, generator=g)
    out = []
    for compiled, keep in ((False, False), (True, False), (True, True)):
        stats = token_logprobs(hidden, weight, labels, bias=bias, chunk_size=16, compiled=compiled, keep_logits=keep,
                               temperature=0.7)
        grads = torch.autograd.grad((stats.logprobs * upstream).sum(), [hidden, weight, bias])
        out.append((stats.logprobs.detach(), stats.entropy, *grads))
    for fast in out[1:]:
        for a, b in zip(out[0], fast):
            assert_close(b, a, rtol=1e-5, atol=1e-5)
    ref_lp, ref_ent = token_stats_reference(hidden.double() / 0.7, weight.double(), bias.double() / 0.7, labels)
    assert_close(out[0][0].double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    assert_close(out[0][1].double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)


def test_train_config_keep_logits_gives_the_same_step():
    examples = random_examples(8, seed=6)
    base = TrainConfig(sequences_per_step=8, micro_batch_size=4, precision="fp32", logprob_chunk_size=7)
    grads = []
    for cfg in (base, base.model_copy(update={"keep_logits": True})):
        trainer = make_trainer(tiny_lm(), cfg, total_steps=1)
        assert trainer.scorer.keep_logits is cfg.keep_logits
        micro, totals = plan_step(examples, list(range(8)), cfg, rank=0, world=1, pad_id=PAD)
        accumulate_gradients(trainer, micro, gft_objective(tau=0.5), totals, step=0)
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["layers", "model"])
def test_compiled_checkpointed_body_with_varlen_packing_equals_plain_padded_step(scope):
    examples = random_examples(8, seed=3)
    base = TrainConfig(sequences_per_step=8, micro_batch_size=8, precision="fp32")
    grads = []
    fast = {"compile": True, "compile_scope": scope, "packing": True, "micro_batch_tokens": 40,
            "gradient_checkpointing": True}  # checkpointing recomputes the compiled layers in backward
    for cfg in (base, base.model_copy(update=fast)):
        trainer = make_trainer(tiny_lm(), cfg, total_steps=1)
        decoder = trainer.model.get_decoder()
        compiled = [m for m in (decoder, *decoder.layers) if getattr(m, "_compiled_call_impl", None) is not None]
        assert compiled == ([] if not cfg.compile else list(decoder.layers) if scope == "layers" else [decoder])
        micro, totals = plan_step(examples, list(range(8)), cfg, rank=0, world=1, pad_id=PAD)
        accumulate_gradients(trainer, micro, gft_objective(tau=0.5), totals, step=0)
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
        assert "_orig_mod" not in "".join(trainer.model.state_dict())  # checkpoints keep their names
    for a, b in zip(*grads):
        assert_close(b, a, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ HFEngine settings


def test_static_cache_engine_and_engine_over_a_live_model_match_the_plain_engine(tmp_path):
    from pipeline.config import EngineConfig, SamplingConfig
    from pipeline.rollout.engines import HFEngine
    from tests.integration.test_engines import PROMPTS, max_teacher_forced_error, save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path, seed=0)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
    sample = SamplingConfig(temperature=1.0, max_new_tokens=10, seed=3)
    plain = HFEngine(ckpt, EngineConfig(batch_size=2, dtype="float32"), progress=False)
    static = HFEngine(ckpt, EngineConfig(batch_size=4, dtype="float32", hf_cache="static"), progress=False)
    live = HFEngine.from_model(plain.model, plain.tokenizer, EngineConfig(batch_size=2), progress=False)
    want = [c[0].token_ids for c in plain.generate(PROMPTS, 1, greedy)]
    assert [c[0].token_ids for c in static.generate(PROMPTS, 1, greedy)] == want
    assert [c[0].token_ids for c in live.generate(PROMPTS, 1, greedy)] == want
    assert max_teacher_forced_error(plain.model, PROMPTS, static.generate(PROMPTS, 3, sample)) < 1e-5
    assert live.generate(PROMPTS, 2, sample) == plain.generate(PROMPTS, 2, sample)


def test_round_perf_metrics_count_policy_and_trained_tokens():
    from pipeline.rounds.gft import _perf
    from pipeline.rounds.groups import Member, Phases

    members = [[Member("a", "expert", "", [1, 2, 3], False), Member("a", "policy", "", [4, 5], False)],
               [Member("b", "policy", "", [6, 7, 8, 9], True)]]
    phases = Phases()
    phases.seconds.update({"sample": 2.0, "reward": 1.0, "train": 4.0})
    perf = _perf(phases, members, [{"tokens": 10.0}, {"tokens": 6.0}])
    assert perf["perf/sample_tokens"] == 6 and perf["perf/sample_tokens_per_s"] == 3.0
    assert perf["perf/train_tokens"] == 16 and perf["perf/throughput"] == 4.0 and perf["perf/round_s"] == 7.0
    assert perf["perf/sample_s"] == 2.0 and perf["perf/reward_s"] == 1.0 and perf["perf/train_s"] == 4.0
    assert all(name.startswith("perf/") for name in perf)


def test_bench_modules_import_without_the_packages_the_gpu_machine_lacks():
    """bench/gpu_bench.py runs where pandas, pyarrow, datasets, math-verify, prefect, mlflow and vllm are
    missing: the modules it uses must not import them at module level."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "for m in ('pandas', 'pyarrow', 'datasets', 'math_verify', 'prefect', 'mlflow', 'vllm'):\n"
            "    sys.modules[m] = None\n"
            "import pipeline.rollout.engines, pipeline.model.trainer, pipeline.data.synthetic, pipeline.algo.advantages, pipeline.rollout.verifiers\n"
            "import bench.gpu_bench\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
