"""GPU bench (issue 7): GFT step against plain SFT step, HFEngine sampling, one GFT round; one run, one JSON.

What it measures, at the Qwen2-0.5B shape (random init, bf16 autocast over float32 weights, SDPA):

  (a) train   One optimizer step (forward, backward, grad clip 1.0, fused AdamW, zero_grad) on 8 x 1024 tokens
              (256 prompt + 768 response), per variant: tokens/s, achieved TFLOP/s (model FLOPs: 6 x matmul
              params x tokens + causal attention), MFU against a bf16 matmul ceiling measured in this run,
              peak memory. SFT = Hugging Face `model(input_ids, labels=...)`, eager and `torch.compile(model)`;
              GFT = the library step (`make_trainer` + `plan_step` + `train_step`, gft_objective tau 0.5):
              eager, compiled (TrainConfig.compile) at several log-prob chunk sizes, packed (varlen and mask).
              An uneven batch (prompts 64-256, responses 64-768) shows what padding costs and packing saves.
  (b) sample  HFEngine: 128 prompts x 8 samples x 256 new tokens. plain = 32 prompts per generate call,
              dynamic cache; then 128 prompts per call (dynamic, the compacting loop `hf_decode="compact"` that
              prefills each prompt once and drops finished rows, static + compiled decoding). Beside them, plain
              `model.generate` (raw_generate_*, no engine) at 128 and 32 prompts per call on the same prompts:
              the engine's overhead, side by side. A long, uneven case (completions stop at random, up to 512
              tokens) measures padding and early finishes (generate, compacting loop, static cache).
  (c) round   One GFT round on the GPU: `pipeline.rounds.gft.run_round`, the round the gft_round stage runs
              (sample with HFEngine on a bf16 copy, reward with exact_match in the Verifier's worker process
              and group advantages, 4 optimizer steps over 1024 responses, packed varlen), then the weight
              sync to the engine; seconds per phase (sample, reward, train: the round's perf/* metrics).

Each section runs in its own subprocess under a deadline (a crash or a hang loses only that section, and
each section writes its results after every variant); lower-priority variants are skipped when time runs
short, and say so. Goals (GFT >= 0.95x the best SFT tokens/s at <= 1.05x its peak memory, MFU >= 45%,
round sampling >= 30k tokens/s and >= 2.5x plain) are reported as ratios with ok/MISS flags; the bench
exits 0 whatever they say.

How to run
    bash bench/gpu_run.sh                         # on the GPU machine: wheels, bench, JSON to $OUT
    python bench/gpu_bench.py --cpu-smoke         # everything tiny on CPU (< 2 minutes), checks the plumbing
    python bench/gpu_bench.py --sections train --budget-s 200 --out /tmp/b
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = ("train", "sample", "round")
SHARES = {"train": 0.5, "sample": 0.32, "round": 0.18}  # of the total budget; unused time carries over
FULL = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, batch=8, prompt=256,
            response=768, prompts=128, samples=8, new_tokens=256, long_prompts=32, long_tokens=512,
            round_prompts=128, round_policy=7, round_tokens=256, warmup=2, steps=6, sample_batch=32, profile_tokens=32)
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, batch=4, prompt=16,
             response=48, prompts=8, samples=2, new_tokens=16, long_prompts=4, long_tokens=32,
             round_prompts=8, round_policy=3, round_tokens=16, warmup=1, steps=2, sample_batch=2, profile_tokens=8)
SMOKE_SKIP = {"uneven_gft_packed_varlen_compiled_c4096"}  # on CPU its per-sequence attention compiles slowly
GOALS = {"gft_vs_best_sft_tokens_per_s_min": 0.95, "gft_vs_best_sft_peak_memory_max": 1.05, "gft_mfu_min": 0.45,
         "round_sampling_tokens_per_s_min": 30000.0, "round_sampling_vs_plain_min": 2.5}
GIB = 2**30

# Training variants in priority order: (name, kind, options). Options: compile, scope (TrainConfig.compile_scope:
# layers, the default, or model), packing, attention, chunk, keep (TrainConfig.keep_logits), batch, weights
# ("bf16": bf16 parameters and AdamW state, no autocast; SFT only, to compare with the issue's reference figures;
# the library trains float32 weights, as a 1e-6 step is lost in bf16).
TRAIN_VARIANTS = [
    ("sft_eager", "sft", {}),
    ("sft_compiled", "sft", {"compile": True}),
    ("gft_compiled_c4096_keep", "gft", {"compile": True, "chunk": 4096, "keep": True}),
    ("gft_compiled_c4096_keep_model", "gft", {"compile": True, "chunk": 4096, "keep": True, "scope": "model"}),
    ("gft_compiled_c4096", "gft", {"compile": True, "chunk": 4096}),
    ("gft_eager", "gft", {}),
    ("gft_compiled_c8192_keep", "gft", {"compile": True, "chunk": 8192, "keep": True}),
    ("gft_compiled_c8192", "gft", {"compile": True, "chunk": 8192}),
    ("gft_packed_varlen", "gft", {"packing": True}),
    ("gft_packed_varlen_compiled_c4096", "gft", {"compile": True, "packing": True, "chunk": 4096}),
    ("gft_compiled_c2048", "gft", {"compile": True, "chunk": 2048}),
    ("gft_packed_mask", "gft", {"packing": True, "attention": "mask"}),
    ("uneven_sft_compiled", "sft", {"compile": True, "batch": "uneven"}),
    ("uneven_gft_compiled_c4096_keep", "gft", {"compile": True, "chunk": 4096, "keep": True, "batch": "uneven"}),
    ("uneven_gft_packed_varlen_compiled_c4096", "gft",
     {"compile": True, "chunk": 4096, "packing": True, "batch": "uneven"}),
    ("sft_compiled_bf16_weights", "sft", {"compile": True, "weights": "bf16"}),
]


# ---------------------------------------------------------------------------------------------------------
# Small helpers: device, timing, JSON records
# ---------------------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _device():
    torch = _torch()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    torch = _torch()
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


def _now_gib() -> float | None:
    torch = _torch()
    return torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None


class Record:
    """A section's results, rewritten to its file after every change (a killed section keeps what it had)."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"variants": {}, "skipped": {}, "errors": {}, "profiles": {}}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def variant(self, group: str, name: str, value) -> None:
        self.data[group][name] = value
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def guarded(rec: Record, name: str, fn, *args, group: str = "variants") -> None:
    """Run one variant; an error (CUDA OOM included) is recorded and the section goes on."""
    t0 = time.perf_counter()
    try:
        rec.variant(group, name, {**fn(*args), "wall_s": time.perf_counter() - t0})
    except Exception as exc:  # noqa: BLE001 - a bench records every failure and moves on
        rec.variant("errors", name, f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        _free()
    print(f"  {name}: {time.perf_counter() - t0:.1f}s", flush=True)


def time_left(deadline: float, need_s: float) -> bool:
    return time.time() + need_s < deadline


def _wanted(args, names: list[str]) -> set[str] | None:
    """The variants of a section that --variants names; None (run them all) when it names none of them."""
    chosen = set(args.variants.split(",")) & set(names) if args.variants else set()
    return chosen or None


# ---------------------------------------------------------------------------------------------------------
# Model, batch, FLOPs
# ---------------------------------------------------------------------------------------------------------


def build_model(shape: dict, *, dtype=None):
    """A random-init Qwen2 causal LM of the given shape (tied embeddings, as Qwen2-0.5B), on the device."""
    torch = _torch()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(_device()):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype) if dtype is not None else model


def matmul_params(shape: dict) -> int:
    """Parameters that take part in a matmul per token: attention, MLP and the output projection."""
    h, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    q, kv = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * shape["intermediate"]
    return shape["layers"] * per_layer + shape["vocab"] * h


def step_flops(shape: dict, lengths: list[int]) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) over sequences of these lengths:
    2 x matmul params per token, plus causal attention 2 x 2 x d x L^2 / 2 per layer."""
    d = shape["hidden"]
    fwd = sum(2 * matmul_params(shape) * n + 2 * d * n * n * shape["layers"] for n in lengths)
    return 3.0 * fwd


def make_examples(shape: dict, kind: str, seed: int = 0):
    """Random examples: uniform (every prompt/response at the shape's length) or uneven (random lengths)."""
    from pipeline.model.batches import Example

    rng = random.Random(seed)
    out = []
    for _ in range(shape["batch"]):
        if kind == "uneven":
            n_p = rng.randint(shape["prompt"] // 4, shape["prompt"])
            n_r = rng.randint(shape["response"] // 12, shape["response"])
        else:
            n_p, n_r = shape["prompt"], shape["response"]
        ids = [rng.randrange(3, shape["vocab"]) for _ in range(n_p + n_r)]
        out.append(Example(ids[:n_p], ids[n_p:], rng.gauss(0, 1)))
    return out


def measure_ceiling(device) -> dict:
    """Dense matmul TFLOP/s in the training dtype (bf16 on CUDA, fp32 on CPU): the MFU denominator."""
    torch = _torch()
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 30) if cuda else (512, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 3):
        _sync()
        t0 = time.perf_counter()
        a @ b
        _sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / best / 1e12,
            "tflops_median": 2 * n**3 / statistics.median(times) / 1e12}


# ---------------------------------------------------------------------------------------------------------
# (a) training steps
# ---------------------------------------------------------------------------------------------------------


def _autocast(device):
    torch = _torch()
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def sft_step_fn(shape: dict, examples, opts: dict):
    """Plain Hugging Face SFT: model(input_ids, attention_mask, labels) with -100 on prompt and pad positions."""
    torch = _torch()
    device = _device()
    pure_bf16 = opts.get("weights") == "bf16"
    model = build_model(shape, dtype=torch.bfloat16 if pure_bf16 and device.type == "cuda" else None)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda" or None)
    from pipeline.model.logprobs import COMPILE_OPTIONS

    fwd = torch.compile(model, **COMPILE_OPTIONS) if opts.get("compile") else model
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(examples):
        seq = list(e.prompt_ids) + list(e.response_ids)
        ids[r, :len(seq)] = torch.tensor(seq)
        labels[r, len(e.prompt_ids):len(seq)] = torch.tensor(list(e.response_ids))
        mask[r, :len(seq)] = 1
    padded = bool((mask == 0).any())
    ids, labels, mask = ids.to(device), labels.to(device), (mask.to(device) if padded else None)

    def step(_i: int) -> None:
        with nullcontext() if pure_bf16 else _autocast(device):
            loss = fwd(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, {"positions": int(ids.numel())}


def gft_step_fn(shape: dict, examples, opts: dict):
    """The library GFT step: make_trainer + plan_step + train_step with gft_objective(tau=0.5)."""
    from pipeline.config import TrainConfig
    from pipeline.model.batches import plan_step
    from pipeline.model.scoring import gft_objective
    from pipeline.model.trainer import make_trainer, train_step

    n = len(examples)
    tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    cfg = TrainConfig(lr=1e-5, sequences_per_step=n, micro_batch_size=n, packing=opts.get("packing", False),
                      micro_batch_tokens=tokens, logprob_chunk_size=opts.get("chunk", 1024),
                      keep_logits=opts.get("keep", False), compile_scope=opts.get("scope", "layers"),
                      compile=opts.get("compile", False), packed_attention=opts.get("attention", "varlen"),
                      max_grad_norm=1.0)
    trainer = make_trainer(build_model(shape), cfg, total_steps=1000)
    micro, totals = plan_step(examples, list(range(n)), cfg, rank=0, world=1, pad_id=0)
    objective = gft_objective(tau=0.5)

    def step(i: int) -> None:
        train_step(trainer, micro, objective, totals, max_grad_norm=1.0, step=i)

    return step, {"positions": int(sum(mb.input_ids.numel() for mb in micro)), "micro_batches": len(micro)}


def run_train_variant(shape: dict, kind: str, opts: dict, ceiling: dict) -> dict:
    examples = make_examples(shape, opts.get("batch", "uniform"))
    lengths = [len(e.prompt_ids) + len(e.response_ids) - 1 for e in examples]  # positions that predict
    _free()
    base = _now_gib()
    step, info = (sft_step_fn if kind == "sft" else gft_step_fn)(shape, examples, opts)
    warm = shape["warmup"] + (1 if opts.get("compile") else 0)
    t0 = time.perf_counter()
    for i in range(warm):
        step(i)
    _sync()
    first_s = time.perf_counter() - t0
    times = []
    for i in range(shape["steps"]):
        _sync()
        t = time.perf_counter()
        step(warm + i)
        _sync()
        times.append(time.perf_counter() - t)
    return _train_summary(shape, lengths, times, first_s, base, info, ceiling, opts)


def _train_summary(shape, lengths, times, first_s, base, info, ceiling, opts) -> dict:
    med = statistics.median(times)
    tokens = sum(lengths) + len(lengths)  # every non-pad input token (prompt + response), as bench/train_step
    tflops = step_flops(shape, lengths) / med / 1e12
    peak = _peak_gib()
    return {"step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(times), "tokens_per_step": tokens,
            "tokens_per_s": tokens / med, "tflops": tflops, "mfu": tflops / ceiling["tflops"],
            "peak_gib": peak, "peak_above_start_gib": None if peak is None else peak - base, "start_gib": base,
            "warmup_s": first_s, "options": opts, **info}


def section_train(args, shape: dict, rec: Record, deadline: float) -> None:
    device = _device()
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    ceiling = measure_ceiling(device)
    rec.set("ceiling", ceiling)
    rec.set("shape", shape)
    wanted = _wanted(args, [name for name, _, _ in TRAIN_VARIANTS])
    for name, kind, opts in TRAIN_VARIANTS:
        if (wanted and name not in wanted) or (args.cpu_smoke and name in SMOKE_SKIP):
            continue
        need = (40 if opts.get("compile") else 15) if device.type == "cuda" else (10 if opts.get("compile") else 2)
        if not time_left(deadline, need):
            rec.variant("skipped", name, f"not started: under {need}s left in the section")
            continue
        guarded(rec, name, run_train_variant, shape, kind, opts, ceiling)


# ---------------------------------------------------------------------------------------------------------
# (b) sampling
# ---------------------------------------------------------------------------------------------------------


def _engine(model, tok, batch_size: int, cache: str):
    from pipeline.config import EngineConfig
    from pipeline.rollout.engines import HFEngine

    # "dynamic" and "static": transformers `generate`; "compact": the dynamic-cache loop that drops finished rows
    compact = cache == "compact"
    cfg = EngineConfig(batch_size=batch_size, hf_cache="dynamic" if compact else cache,
                       hf_decode="compact" if compact else "generate")
    return HFEngine.from_model(model, tok, cfg, progress=False)


def _prompts(shape: dict, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, shape["vocab"]) for _ in range(rng.randint(32, 128))] for _ in range(n)]


def _rate(lengths: list[int], stopped: list[bool], wall: float) -> dict:
    """Generated tokens (up to and including eos) per wall second, and the completions' lengths."""
    return {"wall_s": wall, "tokens": sum(lengths), "tokens_per_s": sum(lengths) / wall, "completions": len(lengths),
            "mean_len": sum(lengths) / len(lengths), "max_len": max(lengths),
            "stopped_frac": sum(stopped) / len(lengths)}


def _generate(engine, prompts, n: int, max_new: int) -> dict:
    from pipeline.config import SamplingConfig

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new, seed=1)
    _sync()
    t0 = time.perf_counter()
    out = engine.generate(prompts, n, sampling)
    _sync()
    wall = time.perf_counter() - t0
    completions = [c for group in out for c in group]
    return _rate([len(c.token_ids) for c in completions], [c.finish_reason == "stop" for c in completions], wall)


def sample_variant(model, tok, prompts, shape, *, batch: int, cache: str, max_new: int, warm: bool) -> dict:
    """tokens/s of one generate pass; with warm, a first identical pass (compiles) is timed separately."""
    engine = _engine(model, tok, batch, cache)
    first = _generate(engine, prompts, shape["samples"], max_new) if warm else None
    result = _generate(engine, prompts, shape["samples"], max_new)
    _free()
    return {**result, "first_pass_s": None if first is None else first["wall_s"], "batch_prompts": batch,
            "cache": cache, "prompts": len(prompts), "samples": shape["samples"], "max_new_tokens": max_new,
            "engine": "HFEngine"}


def _raw_generate(model, prompts, n: int, max_new: int, batch: int, eos: list[int], pad: int) -> dict:
    """Time plain `model.generate` calls of `batch` left-padded prompts, n samples each; the tokens are counted
    after the clock stops, as HFEngine counts them (up to and including the first eos)."""
    torch = _torch()
    from pipeline.rollout.engines import _left_pad

    torch.manual_seed(1)
    outs = []  # (prompt width, [B*n, L+T] sequences) per call
    _sync()
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        ids, mask = _left_pad(prompts[s:s + batch], pad, _device())  # [B, L] each
        outs.append((ids.shape[1], model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=max_new, num_return_sequences=n, eos_token_id=eos, pad_token_id=pad)))
    _sync()
    wall = time.perf_counter() - t0
    hits = [torch.isin(seq[:, width:], torch.tensor(eos, device=seq.device)) for width, seq in outs]  # [B*n, T]
    stopped = torch.cat([h.any(1) for h in hits])  # [completions]
    lengths = torch.cat([torch.where(h.any(1), h.int().argmax(1) + 1, h.shape[1]) for h in hits])  # [completions]
    return _rate(lengths.tolist(), stopped.tolist(), wall)


def raw_generate_variant(model, tok, prompts, shape, *, batch: int, max_new: int) -> dict:
    """Plain transformers `model.generate`, no engine, for HFEngine's overhead: the same prompts, left padding,
    pad and eos ids, n samples per prompt (num_return_sequences), temperature 1 with no top-k or top-p."""
    engine = _engine(model, tok, batch, "dynamic")  # only for the pad and eos ids HFEngine uses
    result = _raw_generate(model, prompts, shape["samples"], max_new, batch, sorted(engine.eos_ids), engine.pad_id)
    _free()
    return {**result, "first_pass_s": None, "batch_prompts": batch, "cache": "dynamic", "prompts": len(prompts),
            "samples": shape["samples"], "max_new_tokens": max_new, "engine": "model.generate"}


def _profile(fn, warm=None) -> dict:
    """Where one call's time goes: torch.profiler's top ops by self device time and by self CPU time, and the
    host syncs and copies it made (counts). A first, unprofiled call (of `warm` if given, else of `fn`) takes
    the one-time costs."""
    torch = _torch()
    from torch.profiler import ProfilerActivity, profile

    (warm or fn)()
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available()
    with profile(activities=activities) as prof:
        result = fn()
    events = prof.key_averages()

    def top(key: str) -> list[dict]:
        rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:25]
        return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                 "self_device_ms": e.self_device_time_total / 1e3} for e in rows]

    syncs = {e.key: e.count for e in events if any(w in e.key for w in ("Synchronize", "Memcpy", "item", "nonzero"))}
    return {**result, "top_by_device": top("self_device_time_total"), "top_by_cpu": top("self_cpu_time_total"),
            "syncs": syncs}


def profile_variant(model, tok, prompts, shape, *, raw: bool, max_new: int) -> dict:
    """One profiled generate call (HFEngine, or plain `model.generate` with raw) of `prompts` x n samples."""
    engine = _engine(model, tok, len(prompts), "dynamic")
    n = shape["samples"]
    call = (functools.partial(_raw_generate, model, prompts, n, max_new, len(prompts), sorted(engine.eos_ids),
                              engine.pad_id) if raw else functools.partial(_generate, engine, prompts, n, max_new))
    out = _profile(call)
    return {**out, "ms_per_step": 1e3 * out["wall_s"] / max_new, "prompts": len(prompts), "samples": n,
            "max_new_tokens": max_new, "engine": "model.generate" if raw else "HFEngine"}


def _uneven_eos(model, shape: dict, mean_len: int) -> None:
    """Make completions stop at random: about vocab / mean_len eos ids, so a near-uniform random model stops
    after about mean_len tokens on average (geometric lengths: long and uneven)."""
    from bench.engines import uneven_eos

    model.generation_config.eos_token_id = uneven_eos(shape["vocab"], mean_len)


def _sample_plans(model, tok, shape: dict) -> tuple[list, list]:
    """(name, seconds needed on CUDA, run) of the sampling variants in priority order: the round shape
    (HFEngine at 32 and 128 prompts per call, plain `model.generate` at the same two, the static cache), then
    the long uneven case (run after `_uneven_eos`)."""
    prompts = _prompts(shape, shape["prompts"], seed=0)
    plain_prompts = prompts[: 2 * shape["sample_batch"]]  # two calls: tokens/s is a per-call rate
    long_prompts = _prompts(shape, shape["long_prompts"], seed=1)
    big, small, compile_need = shape["prompts"], shape["sample_batch"], 90 if _device().type == "cuda" else 5
    engine = functools.partial(sample_variant, model, tok, shape=shape, max_new=shape["new_tokens"])
    raw = functools.partial(raw_generate_variant, model, tok, shape=shape, max_new=shape["new_tokens"])
    prof = functools.partial(profile_variant, model, tok, shape=shape, max_new=shape["profile_tokens"])
    long = functools.partial(sample_variant, model, tok, long_prompts, shape, batch=len(long_prompts),
                             max_new=shape["long_tokens"])
    return [
        ("round_plain_b32_dynamic", 30, lambda: engine(plain_prompts, batch=small, cache="dynamic", warm=False)),
        ("round_b128_dynamic", 30, lambda: engine(prompts, batch=big, cache="dynamic", warm=False)),
        ("round_b128_compact", 30, lambda: engine(prompts, batch=big, cache="compact", warm=False)),
        ("raw_generate_b128_dynamic", 20, lambda: raw(prompts, batch=big)),
        ("raw_generate_b32_dynamic", 30, lambda: raw(plain_prompts, batch=small)),
        ("round_b128_static", compile_need, lambda: engine(prompts, batch=big, cache="static", warm=True)),
        ("profile_engine_b32", 25, lambda: prof(plain_prompts[:small], raw=False)),
        ("profile_raw_b32", 25, lambda: prof(plain_prompts[:small], raw=True)),
    ], [
        ("long_uneven_dynamic", 40, lambda: long(cache="dynamic", warm=False)),
        ("long_uneven_compact", 40, lambda: long(cache="compact", warm=False)),
        ("long_uneven_static", compile_need + 20, lambda: long(cache="static", warm=True)),
    ]


def _run_sample(rec: Record, deadline: float, wanted: set[str] | None, name: str, need: int, run) -> None:
    if wanted is not None and name not in wanted:
        return
    if not time_left(deadline, need if _device().type == "cuda" else 2):
        rec.variant("skipped", name, f"not started: under {need}s left in the section")
        return
    guarded(rec, name, run, group="profiles" if name.startswith("profile_") else "variants")


def section_sample(args, shape: dict, rec: Record, deadline: float) -> None:
    torch = _torch()
    from pipeline.data.synthetic import build_tokenizer

    tok = build_tokenizer()  # ids beyond its vocabulary decode to nothing: text is not what is measured here
    dtype = torch.bfloat16 if _device().type == "cuda" else torch.float32
    model = build_model(shape, dtype=dtype).eval()
    model.generation_config.eos_token_id = 2
    rounds, longs = _sample_plans(model, tok, shape)
    wanted = _wanted(args, [name for name, _, _ in rounds + longs])
    for name, need, run in rounds:
        _run_sample(rec, deadline, wanted, name, need, run)
    _uneven_eos(model, shape, mean_len=max(4, shape["long_tokens"] // 3))
    for name, need, run in longs:
        _run_sample(rec, deadline, wanted, name, need, run)


# ---------------------------------------------------------------------------------------------------------
# (c) one GFT round
# ---------------------------------------------------------------------------------------------------------


def _round_config(shape: dict, args):
    """The GFTConfig of the bench's round: 1 expert and `round_policy` policy members per prompt, no teachers,
    4 optimizer steps over the round's responses (packed, varlen), exact_match rewards."""
    from pipeline.config import GFTConfig, SamplingConfig, TrainConfig

    train = TrainConfig(lr=1e-6, packing=True, micro_batch_tokens=args.round_micro_tokens, logprob_chunk_size=4096,
                        compile=args.round_compile)
    return GFTConfig(rounds=1, prompts_per_round=shape["round_prompts"], expert=1, teacher=0,
                     policy=shape["round_policy"], tau=0.5, minibatches_per_round=4,
                     max_response_tokens=shape["round_tokens"], reward="exact_match",
                     sampling=SamplingConfig(temperature=1.0, max_new_tokens=shape["round_tokens"], seed=1),
                     train=train)


def run_round(shape: dict, args) -> dict:
    """`pipeline.rounds.gft.run_round`, the round the gft_round stage runs, on a random-init model: the bench
    times set-up (models, engine, the verifier's worker, which the pipeline keeps across rounds) and the weight
    sync to the engine; sample, reward and train seconds are the round's own `perf/*` metrics."""
    torch = _torch()
    import pandas as pd

    from pipeline.data.synthetic import build_tokenizer, make_problems
    from pipeline.model.trainer import make_trainer
    from pipeline.rollout.verifiers import Verifier
    from pipeline.rounds import gft
    from pipeline.data import chat
    from pipeline.rounds.groups import Phases

    cfg, phases, device = _round_config(shape, args), Phases(), _device()
    with Verifier(cfg.reward) as verifier:
        with phases("setup"):
            tok = build_tokenizer()
            rows = pd.DataFrame(make_problems(cfg.prompts_per_round, seed=0),
                                columns=["id", "prompt", "solution", "answer"])
            model = build_model(shape)  # float32 master weights for the trainer, as the stage loads them
            engine_model = build_model(shape, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            engine_model.eval().load_state_dict(model.state_dict())
            engine_model.generation_config.eos_token_id = tok.eos_token_id
            engine = _engine(engine_model, tok, cfg.prompts_per_round, args.round_cache)
            trainer = make_trainer(model, cfg.train, total_steps=cfg.rounds * cfg.minibatches_per_round)
            verifier.reward_one(rows["solution"][0], rows.iloc[0].to_dict())  # starts the worker process
            _sync()
        train = functools.partial(gft.train_phase, trainer, cfg=cfg, round_idx=0, pad_id=chat.pad_id(tok))
        result = gft.run_round(train, engine, verifier, rows, {}, tok, cfg, round_idx=0)
    with phases("sync_weights"):
        engine_model.load_state_dict(trainer.model.state_dict())
        _sync()
    return _round_summary(phases.seconds, result.metrics, len(result.table), args)


def _round_summary(bench_s: dict, metrics: dict, responses: int, args) -> dict:
    """Seconds per phase (setup and sync_weights timed here; sample, reward and train by the round) and rates."""
    seconds = {"setup": bench_s["setup"], **{k: metrics[f"perf/{k}_s"] for k in ("sample", "reward", "train")},
               "sync_weights": bench_s["sync_weights"]}
    work = {k: v for k, v in seconds.items() if k != "setup"}
    return {"phase_s": seconds, "round_s": sum(work.values()),
            "phase_share": {k: v / sum(work.values()) for k, v in work.items()},
            "sample_tokens": metrics["perf/sample_tokens"], "sample_tokens_per_s": metrics["perf/sample_tokens_per_s"],
            "train_response_tokens": metrics["perf/train_tokens"],
            "train_response_tokens_per_s": metrics["perf/throughput"], "responses": responses,
            "reward_mean": metrics["reward_mean"], "final_loss": metrics["train/loss"], "peak_gib": _peak_gib(),
            "round_metrics": metrics,
            "settings": {"engine_cache": args.round_cache, "train_compile": args.round_compile,
                         "packing": "varlen", "micro_batch_tokens": args.round_micro_tokens}}


def section_round(args, shape: dict, rec: Record, deadline: float) -> None:
    rec.set("shape", shape)
    guarded(rec, "gft_round", run_round, shape, args)


# ---------------------------------------------------------------------------------------------------------
# Driver: one subprocess per section, then goals, table and JSON
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results")),
                   help="folder of gpu_bench.json (default $OUT, else bench/results)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the plumbing, not speed")
    p.add_argument("--budget-s", type=float, default=360.0, help="total seconds for all sections (+20 s grace each)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--variants", default="", help="comma-separated train and sample variants to run; a section "
                   "none of whose variants is named runs all of them")
    p.add_argument("--round-cache", choices=("compact", "dynamic", "static"), default="compact",
                   help="round: HFEngine decoding (compact: the library default, dropping finished rows; dynamic: "
                   "generate; static: generate with a compiled decoding step, ~1 min more)")
    p.add_argument("--round-compile", action="store_true", help="round: TrainConfig.compile (compiles: ~1 min)")
    p.add_argument("--round-micro-tokens", type=int, default=16384, help="round: packed micro-batch tokens")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: run one section
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(args) -> None:
    torch = _torch()
    if args.cpu_smoke:
        torch.set_num_threads(1)
        import pipeline.model.logprobs as logprobs

        logprobs.COMPILE_OPTIONS.update(backend="aot_eager")  # graph capture checked, no C++ codegen on CPU
    shape = SMOKE if args.cpu_smoke else FULL
    rec = Record(args.result)
    fn = {"train": section_train, "sample": section_sample, "round": section_round}[args.section]
    fn(args, shape, rec, args.deadline)


def run_section(args, name: str, seconds: float) -> dict:
    result = args.out / f".section-{name}.json"
    result.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", str(result),
            "--deadline", str(time.time() + seconds), "--variants", args.variants, "--round-cache",
            args.round_cache, "--round-micro-tokens", str(args.round_micro_tokens)]
    argv += ["--cpu-smoke"] * args.cpu_smoke + ["--round-compile"] * args.round_compile
    t0 = time.perf_counter()
    print(f"[{name}] up to {seconds:.0f}s", flush=True)
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)  # its own group: kill compile workers too
    try:
        code = proc.wait(timeout=seconds + 20)
        status = "ok" if code == 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        status = "killed at the section's time limit"
    finally:
        _kill_group(proc)
    data = json.loads(result.read_text()) if result.exists() else {"variants": {}, "skipped": {}, "errors": {}}
    result.unlink(missing_ok=True)
    return {**data, "status": status, "section_s": time.perf_counter() - t0}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of a section's process group (its compile and verifier workers), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def environment(args) -> dict:
    env = {"python": platform.python_version(), "cpu_smoke": args.cpu_smoke, "machine": platform.machine()}
    try:
        torch = _torch()
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   device="cuda" if torch.cuda.is_available() else "cpu")
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception as exc:  # noqa: BLE001 - the report is written whatever the environment lacks
        env["error"] = f"{type(exc).__name__}: {exc}"
    return env


def _best(variants: dict, prefix: str) -> tuple[str | None, dict | None]:
    """The fastest variant (tokens/s) whose name starts with prefix: uniform batch, float32 weights (the
    bf16-weights SFT is a reference point for the issue's figures, not a baseline for the library's step)."""
    found = [(v["tokens_per_s"], k) for k, v in variants.items()
             if k.startswith(prefix) and v.get("options", {}).get("weights") != "bf16"]
    if not found:
        return None, None
    name = max(found)[1]
    return name, variants[name]


def _flag(value: float | None, bound: float, at_least: bool) -> dict:
    ok = None if value is None else (value >= bound if at_least else value <= bound)
    return {"value": value, "bound": bound, "ok": ok}


def goals(sections: dict) -> dict:
    """The issue's goals as ratios from this run, each with ok true/false (null: not measured)."""
    out: dict = {}
    train = sections.get("train", {}).get("variants", {})
    sft_name, sft = _best(train, "sft_")
    gft_name, gft = _best(train, "gft_")
    if sft and gft:
        mem = None if sft["peak_gib"] is None else gft["peak_above_start_gib"] / sft["peak_above_start_gib"]
        out.update(best_sft=sft_name, best_gft=gft_name,
                   gft_vs_best_sft_tokens_per_s=_flag(gft["tokens_per_s"] / sft["tokens_per_s"],
                                                      GOALS["gft_vs_best_sft_tokens_per_s_min"], True),
                   gft_vs_best_sft_peak_memory=_flag(mem, GOALS["gft_vs_best_sft_peak_memory_max"], False),
                   gft_mfu=_flag(gft["mfu"], GOALS["gft_mfu_min"], True))
    sample = sections.get("sample", {}).get("variants", {})
    plain = sample.get("round_plain_b32_dynamic")
    best = max((v["tokens_per_s"], k) for k, v in sample.items() if k.startswith("round_")) if sample else None
    if best:
        out["best_round_sampling"] = best[1]
        out["round_sampling_tokens_per_s"] = _flag(best[0], GOALS["round_sampling_tokens_per_s_min"], True)
        if plain:
            out["round_sampling_vs_plain"] = _flag(best[0] / plain["tokens_per_s"],
                                                   GOALS["round_sampling_vs_plain_min"], True)
    return out


ENGINE_PAIRS = {"b128": ("round_b128_dynamic", "raw_generate_b128_dynamic"),
                "b32": ("round_plain_b32_dynamic", "raw_generate_b32_dynamic")}  # HFEngine, plain generate


def engine_vs_raw(sections: dict) -> dict:
    """HFEngine's sampling tokens/s over plain `model.generate`'s at the same prompts per call (the engine's
    overhead: below 1 is slower); null where either variant did not run."""
    sample = sections.get("sample", {}).get("variants", {})
    out = {}
    for key, (engine, raw) in ENGINE_PAIRS.items():
        e, r = (sample.get(name, {}).get("tokens_per_s") for name in (engine, raw))
        out[key] = {"engine": engine, "raw": raw, "engine_tokens_per_s": e, "raw_tokens_per_s": r,
                    "engine_vs_raw": None if e is None or r is None else e / r}
    return out


def _print_engine_vs_raw(pairs: dict) -> None:
    ratio = {key: "-" if v["engine_vs_raw"] is None else f"{v['engine_vs_raw']:.2f}x" for key, v in pairs.items()}
    parts = [f"{key} {_fmt(v['engine_tokens_per_s'], '.0f')} / {_fmt(v['raw_tokens_per_s'], '.0f')} = {ratio[key]}"
             for key, v in pairs.items()]
    print("HFEngine vs plain model.generate, tokens/s: " + "; ".join(parts))


def _print_profiles(profiles: dict) -> None:
    for name, p in profiles.items():
        print(f"\n{name}: {p['prompts']} prompts x {p['samples']} x {p['max_new_tokens']} tokens, "
              f"{p['ms_per_step']:.1f} ms per decoding step (profiled); syncs {p['syncs']}")
        for key, label in (("top_by_device", "self_device_ms"), ("top_by_cpu", "self_cpu_ms")):
            print(f"  top by {label}: " + "; ".join(f"{r['op']} {r[label]:.1f} ({r['calls']})" for r in p[key][:8]))


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(report: dict) -> None:
    s = report["sections"]
    tr = s.get("train", {})
    print(f"\nmatmul ceiling: {_fmt(tr.get('ceiling', {}).get('tflops'))} TFLOP/s")
    print(f"{'train variant':44} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'step ms':>8} {'warm s':>7}")
    for name, v in tr.get("variants", {}).items():
        print(f"{name:44} {v['tokens_per_s']:9.0f} {v['tflops']:8.1f} {v['mfu']:6.1%} {_fmt(v['peak_gib'], '.2f'):>8}"
              f" {v['step_ms_median']:8.1f} {v['warmup_s']:7.1f}")
    print(f"\n{'sampling variant':44} {'tok/s':>9} {'tokens':>8} {'mean len':>8} {'wall s':>7} {'1st s':>7}")
    for name, v in s.get("sample", {}).get("variants", {}).items():
        print(f"{name:44} {v['tokens_per_s']:9.0f} {v['tokens']:8d} {v['mean_len']:8.1f} {v['wall_s']:7.1f}"
              f" {_fmt(v['first_pass_s']):>7}")
    _print_engine_vs_raw(report["engine_vs_raw_generate"])
    _print_profiles(s.get("sample", {}).get("profiles", {}))
    rnd = s.get("round", {}).get("variants", {}).get("gft_round")
    if rnd:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in rnd["phase_s"].items())
        print(f"\nGFT round: {rnd['round_s']:.1f}s ({phases}); sampling {rnd['sample_tokens_per_s']:.0f} tok/s, "
              f"training {rnd['train_response_tokens_per_s']:.0f} response tok/s")
    for name, sec in s.items():
        for group in ("errors", "skipped"):
            for k, msg in sec.get(group, {}).items():
                print(f"{group[:-1] if group == 'errors' else 'skipped'}: {name}/{k}: {msg[:300]}")
        if sec.get("status") != "ok":
            print(f"section {name}: {sec.get('status')}")
    smoke = report["environment"].get("cpu_smoke")
    print("\ngoals" + (" (CPU smoke: the plumbing is checked, the ratios mean nothing here):" if smoke else ":"))
    for k, v in report["goals"].items():
        if isinstance(v, dict):
            mark = {True: "ok", False: "MISS", None: "-"}[v["ok"]]
            print(f"  {k:36} {_fmt(v['value'], '.3f'):>10}  (bound {v['bound']})  {mark}")
        else:
            print(f"  {k:36} {v}")


DEFINITIONS = {
    "tokens_per_s": "non-pad input tokens of the batch (prompt + response) / median step time",
    "tflops": "model FLOPs of the step (3 x forward: 2 x matmul params per token incl. the output projection, "
              "plus causal attention) / median step time; GFT's recomputation and skipped prompt logits not counted",
    "mfu": "tflops / the bf16 dense matmul ceiling (8192^3) measured in the same run",
    "peak_gib": "torch.cuda.max_memory_allocated during the variant (weights, optimizer state and activations)",
    "peak_above_start_gib": "peak_gib minus what was allocated before the variant built its model (what the "
                            "memory goal compares; start_gib is normally ~0)",
    "step": "forward, backward, clip_grad_norm 1.0, fused AdamW step, zero_grad; collation excluded",
    "sampling tokens_per_s": "generated tokens (up to and including eos) / wall time of the generate calls",
    "raw_generate": "plain model.generate(input_ids, attention_mask, do_sample, temperature 1, top_k 0, top_p 1, "
                    "num_return_sequences=n), no engine: HFEngine's prompts, left padding, pad and eos ids; its "
                    "wall time covers the padding and generate calls (HFEngine's also covers its log-prob "
                    "recording, copies to the host and decoding)",
    "engine_vs_raw_generate": "HFEngine tokens/s / raw_generate tokens/s at the same prompts per call",
    "first_pass_s": "an identical first pass when the variant compiles (static cache): compile time included",
}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.section:
        return child_main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    start, wanted = time.time(), [s for s in SECTIONS if s in args.sections.split(",")]
    sections = {}
    for i, name in enumerate(wanted):
        left = args.budget_s - (time.time() - start)
        later = sum(SHARES[s] for s in wanted[i + 1:]) * args.budget_s
        sections[name] = run_section(args, name, max(30.0, left - later))
    report = {"benchmark": "bench/gpu_bench.py", "argv": sys.argv[1:], "environment": environment(args),
              "total_s": time.time() - start, "goals": goals(sections), "goal_bounds": GOALS,
              "engine_vs_raw_generate": engine_vs_raw(sections), "definitions": DEFINITIONS, "sections": sections}
    path = args.out / ("gpu_bench_cpu_smoke.json" if args.cpu_smoke else "gpu_bench.json")
    path.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    print(f"\nwrote {path} in {report['total_s']:.0f}s")


if __name__ == "__main__":
    main()
