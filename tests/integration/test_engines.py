"""HFEngine on a tiny random Qwen2 + char tokenizer saved to a tmp folder (no vllm needed).

The key check: the engine's log-probs equal a teacher-forced recomputation (one full forward over
prompt + completion, log_softmax at temperature 1) whatever temperature/top-p sampled the tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.rollout.engines import Completion, Engine, HFEngine, build_engine

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-*/=()[]{}.,:;!?<>"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
PAD, BOS, EOS = 0, 1, 2
PROMPTS = [[1, 10, 11, 12], [1, 20], [1, 5, 6, 7, 8, 9, 30, 31, 32], [1, 40, 41]]


def char_tokenizer():
    """A character-level WordLevel tokenizer (one id per character) with pad/bos/eos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_checkpoint(path: Path, *, seed: int = 0, init_std: float = 0.1) -> Path:
    """A 2-layer random Qwen2 (head_dim 32, which vLLM's CPU attention supports) and the char tokenizer.
    `init_std` 5x HF's 0.02 keeps greedy near-ties away; much more inflates float32 cache-vs-full-forward gaps."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = char_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=init_std, pad_token_id=PAD, bos_token_id=BOS,
                      eos_token_id=EOS)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def teacher_forced_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion_t | prompt, completion_<t) from one full forward, log_softmax at temperature 1."""
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().cpu()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def max_teacher_forced_error(model, prompts, results: list[list[Completion]]) -> float:
    errors = [abs(a - b) for prompt, group in zip(prompts, results, strict=True) for c in group
              for a, b in zip(c.logprobs, teacher_forced_logprobs(model, list(prompt), c.token_ids), strict=True)]
    return max(errors)


@pytest.fixture(scope="module")
def ckpt_a(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_a"), seed=0)


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_b"), seed=1)


F32 = dict(dtype="float32")  # the 1e-5 checks need float32 on a GPU too ("auto" is bfloat16 there)


@pytest.fixture(scope="module", params=["generate", "compact"])
def engine(ckpt_a, request) -> HFEngine:
    """Every engine test runs on both decoding loops: transformers `generate` and `sample_compacting`."""
    return HFEngine(ckpt_a, EngineConfig(batch_size=2, hf_decode=request.param, **F32), progress=False)


SAMPLE = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=3)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def test_build_engine_gives_an_hf_engine(ckpt_a):
    eng = build_engine(ckpt_a, EngineConfig(backend="hf"), progress=False)
    assert isinstance(eng, HFEngine)
    _: Engine = eng  # structural: satisfies the protocol
    assert eng.model.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert not eng.model.training


def test_shapes_and_fields(engine):
    results = engine.generate(PROMPTS, 3, SAMPLE)
    assert [len(group) for group in results] == [3] * len(PROMPTS)
    for group in results:
        for c in group:
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= SAMPLE.max_new_tokens
            assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert "</s>" not in c.text


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.8), (1.7, 0.95), (0.0, 1.0)])
def test_logprobs_equal_teacher_forced_recomputation(engine, temperature, top_p):
    """Raw log-probs (temperature 1, no top-p), even for tokens sampled at another temperature/top-p,
    with left padding in play (batch_size 2, prompts of different lengths)."""
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=16, seed=7)
    results = engine.generate(PROMPTS, 4, sampling)
    assert max_teacher_forced_error(engine.model, PROMPTS, results) < 1e-5


@pytest.mark.parametrize("decode", ["generate", "compact"])
def test_left_padding_does_not_change_results(ckpt_a, decode):
    short, cfg = [1, 20], EngineConfig(batch_size=1, hf_decode=decode, **F32)
    alone = HFEngine(ckpt_a, cfg, progress=False).generate([short], 1, GREEDY)[0][0]
    batched = HFEngine(ckpt_a, cfg.model_copy(update={"batch_size": 8}), progress=False)
    in_batch = batched.generate([[1, 5, 6, 7, 8, 9, 30, 31, 32, 33, 34], short, [1] + [12] * 20], 1, GREEDY)[1][0]
    assert in_batch.token_ids == alone.token_ids
    assert max(abs(a - b) for a, b in zip(in_batch.logprobs, alone.logprobs)) < 1e-5


@pytest.mark.parametrize("temperature,top_p", [(0.5, 0.9), (1.3, 0.6)])
def test_both_loops_sample_from_the_tempered_nucleus(engine, temperature, top_p):
    """4,000 first tokens of one prompt through the engine (each loop; on CPU both draw by inverse CDF) against
    transformers' own warpers on the same logits: within 0.04 total variation of softmax(top_p(logits / T)),
    nothing drawn outside the nucleus; the untempered distribution is far from it (the check can tell them apart)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    prompt, n = PROMPTS[2], 4000
    out = engine.generate([prompt], n, SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=1, seed=0))
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([prompt], device=engine.model.device)).logits[:, -1].float()
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    expected = warped.softmax(-1)[0].cpu()  # [V]
    firsts = torch.tensor([c.token_ids[0] for c in out[0]])
    counts = torch.bincount(firsts, minlength=expected.numel()).double()
    assert counts[expected == 0].sum() == 0
    assert 0.5 * (counts / n - expected).abs().sum() < 0.04
    assert 0.5 * (logits.softmax(-1)[0].cpu() - expected).abs().sum() > 0.1


def test_same_seed_same_completions_other_seed_others(engine):
    first = engine.generate(PROMPTS, 4, SAMPLE)
    again = engine.generate(PROMPTS, 4, SAMPLE)
    other = engine.generate(PROMPTS, 4, SAMPLE.model_copy(update={"seed": SAMPLE.seed + 1}))
    assert first == again
    assert [[c.token_ids for c in g] for g in first] != [[c.token_ids for c in g] for g in other]


def test_generate_leaves_the_global_rng_alone(engine):
    state = torch.get_rng_state()
    engine.generate(PROMPTS[:1], 2, SAMPLE)
    assert torch.equal(torch.get_rng_state(), state)


def test_samples_differ_within_a_group(engine):
    group = engine.generate([PROMPTS[0], PROMPTS[0]], 8, SAMPLE)
    ids = [tuple(c.token_ids) for g in group for c in g]
    assert len(set(ids)) > 8  # 16 samples of up to 12 tokens from a 61-token vocabulary


def test_temperature_zero_is_greedy(engine):
    results = engine.generate(PROMPTS, 3, GREEDY)
    for prompt, group in zip(PROMPTS, results, strict=True):
        assert all(c == group[0] for c in group) and group[0].token_ids is not group[1].token_ids
        ids = torch.tensor([prompt + group[0].token_ids], device=engine.model.device)
        with torch.inference_mode():
            argmax = engine.model(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert group[0].token_ids == argmax


def test_finish_reason_stop_iff_eos(engine):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10, seed=0)
    results = [c for g in engine.generate(PROMPTS, 16, sampling) for c in g]
    for c in results:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 10 and EOS not in c.token_ids
    assert {c.finish_reason for c in results} == {"stop", "length"}


def test_pad_falls_back_to_eos(ckpt_a, tmp_path):
    """A tokenizer without a pad token pads with eos; results are unchanged."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(ckpt_a, tmp_path / "nopad")
    tok = AutoTokenizer.from_pretrained(ckpt_a)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    eng = HFEngine(tmp_path / "nopad", EngineConfig(batch_size=4, **F32), progress=False)
    assert eng.pad_id == EOS
    ref = HFEngine(ckpt_a, EngineConfig(batch_size=4, **F32), progress=False)
    assert eng.generate(PROMPTS, 2, SAMPLE) == ref.generate(PROMPTS, 2, SAMPLE)


def test_load_weights_switches_to_the_new_checkpoint_in_place(ckpt_a, ckpt_b):
    eng = HFEngine(ckpt_a, EngineConfig(batch_size=2, **F32), progress=False)
    model = eng.model
    before = eng.generate(PROMPTS, 2, SAMPLE)
    eng.load_weights(ckpt_b)
    assert eng.model is model
    fresh_b = HFEngine(ckpt_b, EngineConfig(batch_size=2, **F32), progress=False)
    after = eng.generate(PROMPTS, 2, SAMPLE)
    assert after == fresh_b.generate(PROMPTS, 2, SAMPLE)
    assert after != before
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # still tied
    eng.load_weights(ckpt_a)
    assert eng.generate(PROMPTS, 2, SAMPLE) == before


def test_load_weights_rejects_another_architecture_and_keeps_the_weights(engine, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    before = engine.generate(PROMPTS, 1, GREEDY)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint does not match.*missing \['model.layers.1"):
        engine.load_weights(tmp_path)
    assert engine.generate(PROMPTS, 1, GREEDY) == before


def test_bad_requests_are_named(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], 1, SAMPLE)
    with pytest.raises(ValueError, match="n must be"):
        engine.generate([[1, 2]], 0, SAMPLE)


def test_no_min_p_warper_unless_the_model_sets_one(engine):
    """min_p = 0.0 filters nothing yet adds a warper (a softmax over the vocabulary) to every decoding step; the
    engine passes none, except to override a min_p the model's own generation config sets."""
    from transformers.generation import MinPLogitsWarper

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=4)

    def warpers() -> list:
        cfg = engine._generation_config(sampling, 2)
        return [type(w) for w in engine.model._get_logits_processor(
            generation_config=engine.model._prepare_generation_config(cfg)[0], input_ids_seq_length=3,
            encoder_input_ids=None, prefix_allowed_tokens_fn=None, logits_processor=None)]

    assert MinPLogitsWarper not in warpers()
    engine.model.generation_config.min_p = 0.3
    try:
        assert engine._generation_config(sampling, 2).min_p == 0.0  # the model's 0.3 is overridden
    finally:
        engine.model.generation_config.min_p = None


# ---------------------------------------------------------------------------------------------------------
# sample_compacting: the loop that drops finished rows
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(ckpt_a):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt_a, dtype=torch.float32).eval()


def _padded(prompts):
    from pipeline.rollout.engines import _left_pad

    return _left_pad(prompts, PAD, torch.device("cpu"))


def test_compaction_drops_finished_rows_without_changing_any_row(tiny_model):
    """Many eos ids make rows stop at different steps; dropping them as they finish gives every row the
    tokens and log-probs it gets when no row is dropped (greedy, so no random stream is involved)."""
    from pipeline.rollout.decoding import sample_compacting

    prompts = PROMPTS + [[1, 44, 45, 46, 47], [1, 50, 13], [1, 8] * 5, [1, 33]]
    ids, mask = _padded(prompts)
    eos = {EOS} | set(range(30, 50))  # a third of the vocabulary
    run = lambda at: sample_compacting(tiny_model, ids, mask, max_new_tokens=24, temperature=0.0, top_p=1.0,  # noqa: E731
                                       eos_ids=eos, compact_at=at)
    dropping, kept = run(0.01), run(1.0)
    lengths = sorted(len(t) for t in kept.token_ids)
    assert lengths[0] < lengths[-1] and dropping.compactions >= 2 and kept.compactions == 0
    assert dropping.token_ids == kept.token_ids
    for a, b in zip(dropping.logprobs, kept.logprobs, strict=True):
        assert max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0) < 1e-5
    for toks in kept.token_ids:
        assert all(t not in eos for t in toks[:-1]) and (toks[-1] in eos or len(toks) == 24)
    for prompt, toks, lps in zip(prompts, dropping.token_ids, dropping.logprobs, strict=True):
        ref = teacher_forced_logprobs(tiny_model, prompt, toks)
        assert max(abs(a - b) for a, b in zip(lps, ref, strict=True)) < 1e-5


@pytest.mark.parametrize("temperature,top_p", [(0.5, 0.9), (1.3, 0.6)])
def test_compacting_samples_from_the_tempered_nucleus(tiny_model, temperature, top_p):
    """4,000 first tokens of one prompt against transformers' own warpers on the same logits: the empirical
    distribution is within 0.04 total variation of softmax(top_p(logits / T)), and outside the nucleus
    nothing is drawn; the untempered distribution is far from it (the check can tell them apart)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from pipeline.rollout.decoding import sample_compacting

    prompt, n = PROMPTS[2], 4000
    ids, mask = _padded([prompt])
    torch.manual_seed(0)
    out = sample_compacting(tiny_model, ids, mask, max_new_tokens=1, temperature=temperature, top_p=top_p,
                            eos_ids={EOS}, copies=n)
    assert len(out.token_ids) == n
    with torch.inference_mode():
        logits = tiny_model(input_ids=torch.tensor([prompt])).logits[:, -1].float()  # [1, V]
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    expected = warped.softmax(-1)[0]  # [V]
    counts = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=expected.numel()).double()
    empirical = counts / n
    assert counts[expected == 0].sum() == 0
    assert 0.5 * (empirical - expected).abs().sum() < 0.04
    assert 0.5 * (logits.softmax(-1)[0] - expected).abs().sum() > 0.1


def test_inverse_cdf_draw_has_the_rows_distribution(monkeypatch):
    """`draw_from` (the compacting loop's draw): 200,000 draws per row match each row's probabilities within
    0.005 total variation, unnormalized rows included; zero-probability entries are never drawn, not even when
    the uniform lands on the row's total (forced here), where the last positive entry is taken."""
    from pipeline.rollout import decoding

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0],
                          [0.0, 2.0, 0.0, 1.0, 1.0],  # sums to 4
                          [0.0, 0.0, 0.0, 1e-3, 0.0]])
    torch.manual_seed(0)
    n = 200_000
    draws = decoding.draw_from(probs.repeat_interleave(n, 0)).view(3, n)  # [3, n]
    for row, d in zip(probs, draws, strict=True):
        empirical = torch.bincount(d, minlength=5).double() / n
        assert 0.5 * (empirical - row.double() / row.sum()).abs().sum() < 0.005
        assert empirical[row == 0].sum() == 0
    monkeypatch.setattr(decoding.torch, "rand", lambda *shape, **kw: torch.ones(*shape, **kw))
    assert decoding.draw_from(probs).tolist() == [3, 4, 3]  # u * total == total: the last positive entry


def test_compacting_prefill_asks_for_the_last_position_only(tiny_model):
    """Like `generate`, the prefill computes logits of the last position only (not [B, L, V])."""
    from pipeline.rollout.decoding import sample_compacting

    shapes = []
    hook = tiny_model.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        ids, mask = _padded(PROMPTS)
        sample_compacting(tiny_model, ids, mask, max_new_tokens=2, temperature=1.0, top_p=1.0, eos_ids={EOS},
                          copies=3)
    finally:
        hook.remove()
    assert shapes[0] == (len(PROMPTS), 1, tiny_model.config.vocab_size)


@pytest.mark.parametrize("cfg, compacting", [
    (EngineConfig(), True),  # auto with the dynamic cache
    (EngineConfig(hf_cache="static"), False),  # auto with the static cache: generate
    (EngineConfig(hf_decode="generate"), False),
    (EngineConfig(hf_decode="compact"), True),
])
def test_hf_decode_picks_the_loop(ckpt_a, monkeypatch, cfg, compacting):
    import pipeline.rollout.hf_engine as hf_engine

    calls = []
    real = hf_engine.sample_compacting
    monkeypatch.setattr(hf_engine, "sample_compacting", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    eng = HFEngine(ckpt_a, cfg.model_copy(update={"hf_compile": False, **F32}), progress=False)
    assert len(eng.generate(PROMPTS[:2], 2, SAMPLE)) == 2
    assert bool(calls) == compacting


def test_compact_with_the_static_cache_is_refused():
    with pytest.raises(ValueError, match='hf_decode="compact" drops rows from a dynamic cache'):
        EngineConfig(hf_decode="compact", hf_cache="static")


def test_vllm_engine_keeps_the_model_folders_tokenizer(ckpt_a, monkeypatch):
    """VLLMEngine decodes with the folder's tokenizer as the pipeline loads it (`load_tokenizer`, as HFEngine does),
    not with the one vLLM builds for itself, which it used to overwrite it with (issue 24). vLLM is faked here: only
    the engine's construction runs (tests/integration/test_vllm_engine.py checks the same on real vLLM)."""
    import sys
    import types

    from pipeline.data.chat import load_tokenizer
    from pipeline.rollout.vllm_engine import VLLMEngine

    class FakeLLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def get_tokenizer(self):
            return "vLLM's own tokenizer"

    vllm, platforms = types.ModuleType("vllm"), types.ModuleType("vllm.platforms")
    vllm.LLM, platforms.current_platform = FakeLLM, types.SimpleNamespace(is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # what the engine would set on CPU, undone after
    engine = VLLMEngine(ckpt_a, EngineConfig(backend="vllm", **F32))
    assert engine.llm.kwargs["model"] == str(Path(ckpt_a).resolve())
    ours, text = load_tokenizer(ckpt_a), "ab c = 1 + 2"
    assert type(engine.tokenizer) is type(ours)
    ids = ours.encode(text, add_special_tokens=False)
    assert engine.tokenizer.encode(text, add_special_tokens=False) == ids and engine.tokenizer.decode(ids) == text
