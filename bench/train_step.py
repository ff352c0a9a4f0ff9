"""Benchmark: one GFT training step against one plain cross-entropy SFT step, same model, same batch.

What it measures
    A full optimizer step (forward, backward, AdamW, zero_grad) on a random-init Qwen2-style causal LM
    (`transformers.Qwen2ForCausalLM` built from a `Qwen2Config`, no download) and one fixed batch of random
    examples (prompt 16-64 tokens, response 32-192 tokens by default, random advantages), in five variants:

      sft_plain    `model(input_ids, attention_mask, labels=labels)` with labels = -100 on prompt and pad
                   positions (Hugging Face's own cross-entropy), `loss.backward()`, `optimizer.step()`.
      gft          the library path: `make_trainer` + `plan_step` (padded `collate_padded`) + `train_step`
                   with `gft_objective(tau=0.5)`.
      gft_packed   the same with `TrainConfig(packing=True)` (`collate_packed`, no pad tokens).
      sft_library  `train_step` with `sft_objective()`: the library plumbing with the SFT loss, so
                   sft_library vs sft_plain isolates the plumbing and gft vs sft_library the loss.
      gft_keep     gft with `TrainConfig(keep_logits=True)`: backward reuses the forward's chunk logits
                   instead of recomputing them (one output-projection matmul fewer per chunk).

    Compiled variants, not in the default set (`--variants` names them): `sft_plain_compiled` is sft_plain
    with each decoder layer compiled (`layer.compile` with the library's COMPILE_OPTIONS, as
    `TrainConfig.compile_scope="layers"` does; the loss stays eager), `gft_compiled` and `sft_library_compiled`
    the library steps with `TrainConfig(compile=True)` (each decoder layer and the log-prob chunk kernels
    compiled). Their first steps compile: give them `--warmup 2` or more.

    `--shape smollm2-135m` trains a real model shape instead of the Qwen2 toy: SmolLM2-135M's config (a
    `LlamaForCausalLM`, 30 layers, hidden 576, MLP 1536, 9 heads, 3 KV heads, vocab 49,152, tied embeddings),
    random init. `bench/cpu_shapes.py` runs it beside the sampling bench.

    Per variant: median step time over the timed steps (after warmup), tokens/s (all non-pad input tokens
    of the batch, prompt + response, per step: the same numerator for every variant, so throughput ratios
    are step-time ratios), response tokens/s, peak memory above the baseline taken right after model and
    batch creation, and the ratios against sft_plain. Collation (building tensors from the example list)
    is timed separately and is not part of the step time for any variant.

    Every variant runs in its own subprocess (this script re-invoking itself with `--variant NAME`), so
    peak memory is that variant's alone. On CPU the peak is the resident set size: a psutil sampling thread
    (1 ms) during the warmup steps plus the process high-water mark `ru_maxrss` when it rose above its
    value at the baseline; the sampler is off during the timed steps so it cannot perturb the timing.
    On CUDA it is `torch.cuda.max_memory_allocated()` above the allocation at the baseline (stats reset at
    the baseline), and the trainer's precision "auto" (bf16 autocast) is used, with the same autocast
    for sft_plain.

    Fairness: by default (`--schedule interleaved`) all variant processes are alive at once and the driver
    tells one at a time to take a step, alternating the order (ABCD, DCBA, ...), so only one step computes
    at any moment and drift in machine speed (other processes, clocks) hits every variant alike.
    `--schedule sequential` runs one variant process at a time instead (for models of which several copies
    do not fit the device); `--rounds N` repeats everything with fresh processes, order alternating.
    Each step's process CPU time is recorded next to its wall time: with one thread, CPU time well below
    wall time means the step waited for a CPU, and the table says so.

How to run
    make bench                                   # = .venv/bin/python bench/train_step.py
    .venv/bin/python bench/train_step.py --hidden 512 --layers 8 --batch 16 --steps 10 --device cuda
    .venv/bin/python bench/train_step.py --prompt-len 16,16 --response-len 192,192   # no padding, mostly response
    .venv/bin/python bench/train_step.py --help

    Defaults (hidden 256, 4 layers, vocab 32000, batch 8, 1 thread) finish in about 1-2 minutes on a
    2-core CPU. The vocabulary is large on purpose: the loss tail works on [tokens, vocab] logits.
    Results are printed as a table and written as JSON (default bench/results/train_step.json).

Goal
    The GFT step (gft, gft_packed, gft_keep) at >= 0.95x the throughput of sft_plain and <= 1.05x its peak memory.
    This is a benchmark, not a test: it reports the ratios and marks them ok/MISS, and always exits 0
    unless a variant fails to run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = ("sft_plain", "gft", "gft_packed", "sft_library", "gft_keep")
VARIANTS = (*DEFAULT_VARIANTS, "sft_plain_compiled", "gft_compiled", "sft_library_compiled")
# Real model shapes (random init): the architecture and sizes of a published config, nothing downloaded.
SHAPES = {
    "smollm2-135m": dict(arch="llama", hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152,
                         tie=True, rope_theta=100000.0, rms_norm_eps=1e-5),
}
GOAL_THROUGHPUT = 0.95  # GFT tokens/s >= this x sft_plain
GOAL_MEMORY = 1.05  # GFT peak memory <= this x sft_plain
PAD_ID = 0
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a real model shape (random init); sets --hidden, "
                   "--layers, --vocab, --intermediate, --heads and --kv-heads")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (None: 4 * hidden)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (None: hidden // 64)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (None: heads // 2)")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (one micro-batch)")
    p.add_argument("--prompt-len", default="16,64", help="MIN,MAX prompt tokens (uniform)")
    p.add_argument("--response-len", default="32,192", help="MIN,MAX response tokens (uniform)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (memory is sampled here)")
    p.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved",
                   help="interleaved: all variant processes alive, stepped in turn; sequential: one at a time "
                        "(use it when several copies of the model do not fit the device)")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, order alternating")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every subprocess")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tau", type=float, default=0.5, help="GFT DCR threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "train_step.json",
                   help="where to write the results")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)  # internal: where it reports
    args = p.parse_args(argv)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    for name in ("prompt_len", "response_len"):
        try:
            lo, hi = (int(x) for x in getattr(args, name).split(","))
        except ValueError:
            p.error(f"--{name.replace('_', '-')} must be MIN,MAX")
        if not 1 <= lo <= hi:
            p.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX")
        setattr(args, name, (lo, hi))
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1 (warmup creates the AdamW state)")
    return args


# ---------------------------------------------------------------------------------------------------------
# One variant, in its own process
# ---------------------------------------------------------------------------------------------------------


def _resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def model_config(shape: dict, **extra):
    """A transformers config of `shape` (hidden, layers, vocab; optional intermediate, heads, kv_heads, tie: tied
    embeddings, default off; with arch "llama" a LlamaConfig and its rope_theta and rms_norm_eps, else a
    Qwen2Config) and its model class."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    heads = shape.get("heads") or max(1, shape["hidden"] // 64)
    common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                  intermediate_size=shape.get("intermediate") or 4 * shape["hidden"],
                  num_hidden_layers=shape["layers"], num_attention_heads=heads,
                  num_key_value_heads=shape.get("kv_heads") or max(1, heads // 2), **extra)
    if shape.get("arch") == "llama":
        return LlamaConfig(tie_word_embeddings=shape.get("tie", False), rope_theta=shape.get("rope_theta", 10000.0),
                           rms_norm_eps=shape.get("rms_norm_eps", 1e-6), **common), LlamaForCausalLM
    return Qwen2Config(tie_word_embeddings=shape.get("tie", False), **common), Qwen2ForCausalLM


def build_model(args):
    import torch

    cfg, cls = model_config(vars(args), max_position_embeddings=1024, pad_token_id=PAD_ID, use_cache=False)
    torch.manual_seed(args.seed)
    model = cls(cfg)  # random init, float32
    model.config._attn_implementation = "sdpa"
    return model


def build_examples(args):
    import torch
    from pipeline.model.batches import Example

    g = torch.Generator().manual_seed(args.seed + 1)

    def ids(n: int) -> list[int]:
        return torch.randint(1, args.vocab, (n,), generator=g).tolist()  # 0 is the pad id

    examples = []
    for _ in range(args.batch):
        n_p = int(torch.randint(args.prompt_len[0], args.prompt_len[1] + 1, (1,), generator=g))
        n_r = int(torch.randint(args.response_len[0], args.response_len[1] + 1, (1,), generator=g))
        examples.append(Example(prompt_ids=ids(n_p), response_ids=ids(n_r),
                                advantage=float(torch.randn((), generator=g))))
    return examples


def plain_batch(examples):
    """Right-padded prompt+response rows, labels -100 on prompt and pad positions (HF shifts them itself)."""
    import torch

    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for r, e in enumerate(examples):
        n_p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.response_ids)
        input_ids[r, :n] = torch.tensor(list(e.prompt_ids) + list(e.response_ids))
        attention_mask[r, :n] = 1
        labels[r, n_p:n] = input_ids[r, n_p:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # bytes on macOS, KiB on Linux


class RssSampler:
    """Highest RSS seen by a background thread sampling every `interval` seconds while running."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def setup_variant(args):
    """Model, batch and step function of one variant; returns (step, sync, info) after the memory baseline."""
    import torch

    torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    cuda = device.type == "cuda"
    from pipeline.config import TrainConfig
    from pipeline.model.batches import plan_step
    from pipeline.model.scoring import gft_objective, sft_objective
    from pipeline.model.trainer import make_trainer, train_step

    model = build_model(args)
    examples = build_examples(args)
    n = len(examples)
    compiled = args.variant.endswith("_compiled")
    cfg = TrainConfig(sequences_per_step=n, micro_batch_size=n, packing=args.variant == "gft_packed",
                      keep_logits=args.variant == "gft_keep", precision="auto", seed=args.seed,
                      compile=compiled and args.variant != "sft_plain_compiled")

    t0 = time.perf_counter()
    if args.variant.startswith("sft_plain"):
        batch = plain_batch(examples)
        positions = batch["input_ids"].numel()
    else:
        micro, totals = plan_step(examples, list(range(n)), cfg, rank=0, world=1, pad_id=PAD_ID)
        positions = sum(mb.input_ids.numel() for mb in micro)
    collate_ms = (time.perf_counter() - t0) * 1e3

    if cuda:
        model.to(device)
    gc.collect()
    # Baseline: model and batch exist; optimizer state, gradients and activations do not yet.
    if cuda:
        torch.cuda.synchronize()
        base, base_hwm = torch.cuda.memory_allocated(), None
        torch.cuda.reset_peak_memory_stats()
    else:
        base, base_hwm = _rss(), _maxrss()

    if args.variant.startswith("sft_plain"):
        from pipeline.model.logprobs import COMPILE_OPTIONS

        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
        batch = {k: v.to(device) for k, v in batch.items()}
        if compiled:  # each decoder layer, as TrainConfig.compile_scope="layers" (one graph they all reuse)
            for layer in model.model.layers:
                layer.compile(**COMPILE_OPTIONS)

        def step(i: int) -> float:
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
    else:
        trainer = make_trainer(model, cfg, total_steps=10_000)
        torch.set_num_threads(args.threads)  # in case accelerate touched it
        objective = gft_objective(tau=args.tau) if args.variant.startswith("gft") else sft_objective()

        def step(i: int) -> float:
            out = train_step(trainer, micro, objective, totals, max_grad_norm=cfg.max_grad_norm, step=i)
            return out.metrics["loss"]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    info = {
        "variant": args.variant, "device": str(device), "cuda": cuda, "collate_ms": collate_ms,
        "baseline_bytes": int(base), "baseline_hwm": base_hwm, "positions": int(positions),
        "tokens": sum(len(e.prompt_ids) + len(e.response_ids) for e in examples),
        "response_tokens": sum(len(e.response_ids) for e in examples),
    }
    return step, sync, info


def variant_worker(args) -> None:
    """Child process: set up, say `ready`, then run one step per `step` line on stdin until `done`.

    Replies go to the original stdout; anything the libraries print goes to stderr instead."""
    import torch

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    step, sync, info = setup_variant(args)
    cuda = info["cuda"]
    sampler = None if cuda else RssSampler()
    losses, wall, cpu, i = [], [], [], 0
    reply.write("ready\n")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "done":
            break
        if cmd != "step":
            raise SystemExit(f"unknown command {cmd!r}")
        warm = i < args.warmup
        if warm and sampler is not None and i == 0:
            sampler.__enter__()  # memory is sampled over the warmup steps only, never while timing
        sync()
        t, c = time.perf_counter(), time.process_time()
        losses.append(step(i))
        sync()
        t, c = time.perf_counter() - t, time.process_time() - c
        if warm and sampler is not None and i == args.warmup - 1:
            sampler.__exit__(None, None, None)
        if not warm:
            wall.append(t)
            cpu.append(c)
        i += 1
        reply.write(f"ok {t:.6f}\n")

    base = info["baseline_bytes"]
    if cuda:
        peak, source = torch.cuda.max_memory_allocated() - base, "cuda.max_memory_allocated"
    else:
        peak, source = sampler.peak - base, "rss sampler (warmup steps)"
        hwm = _maxrss()
        if hwm > info["baseline_hwm"] and hwm - base > peak:
            peak, source = hwm - base, "ru_maxrss"
    result = {**info, "threads": torch.get_num_threads(), "step_s": wall, "cpu_s": None if cuda else cpu,
              "losses": losses, "peak_bytes": int(peak), "peak_source": source}
    args.result_file.write_text(json.dumps(result))
    reply.write("bye\n")


# ---------------------------------------------------------------------------------------------------------
# The driver: subprocesses, aggregation, table, JSON
# ---------------------------------------------------------------------------------------------------------


def _child_argv(args, variant: str, result: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--result-file", str(result)]
    for flag in ("shape", "hidden", "layers", "vocab", "intermediate", "heads", "kv_heads", "batch", "steps",
                 "warmup", "threads", "device", "tau", "seed"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for flag in ("prompt_len", "response_len"):
        argv += [f"--{flag.replace('_', '-')}", ",".join(map(str, getattr(args, flag)))]
    return argv


class Child:
    """One variant's process, driven a step at a time."""

    def __init__(self, args, variant: str, result: Path, env: dict):
        self.variant, self.result = variant, result
        self.proc = subprocess.Popen(_child_argv(args, variant, result), env=env, cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def expect(self, word: str) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            self.proc.kill()
            raise SystemExit(f"variant {self.variant}: expected {word!r}, got {line!r} "
                             f"(exit code {self.proc.wait()}; see its stderr above)")
        return line

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def step(self) -> float:
        self.send("step")
        return float(self.expect("ok").split()[1])

    def finish(self) -> dict:
        self.send("done")
        self.expect("bye")
        if self.proc.wait() != 0:
            raise SystemExit(f"variant {self.variant} exited with code {self.proc.returncode}")
        return json.loads(self.result.read_text())


def run_all(args) -> dict:
    """`interleaved`: all variants' processes alive at once and stepped in turn (ABCD, DCBA, ...), one step
    computing at a time. `sequential`: one variant's process at a time. Either way, `--rounds` times."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    n_steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else args.variants[::-1]
            groups = [order] if args.schedule == "interleaved" else [[v] for v in order]
            for group in groups:
                t = time.perf_counter()
                children = [Child(args, v, Path(tmp) / f"{v}-{r}.json", env) for v in group]
                try:
                    for c in children:
                        c.expect("ready")
                    print(f"  round {r + 1}/{args.rounds}: {', '.join(group)} ready "
                          f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
                    for i in range(n_steps):
                        turn = children if i % 2 == 0 else children[::-1]
                        took = [f"{c.variant} {c.step():.2f}s" for c in turn]
                        tag = "warmup" if i < args.warmup else "timed"
                        print(f"    step {i + 1}/{n_steps} ({tag}): {', '.join(took)}", file=sys.stderr, flush=True)
                    for c in children:
                        runs[c.variant].append(c.finish())
                finally:
                    for c in children:
                        if c.proc.poll() is None:
                            c.proc.kill()
                            c.proc.wait()
    return runs


def _median_ms(values) -> float | None:
    return None if not values else statistics.median(values) * 1e3


def summarize(args, runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for v, rs in runs.items():
        times = [t for r in rs for t in r["step_s"]]
        cpu = [t for r in rs if r["cpu_s"] is not None for t in r["cpu_s"]]
        med = statistics.median(times)
        first = rs[0]
        rows[v] = {
            "step_ms_median": med * 1e3,
            "step_ms_min": min(times) * 1e3,
            "step_ms_max": max(times) * 1e3,
            "cpu_ms_median": _median_ms(cpu),
            "cpu_per_wall": sum(cpu) / sum(times) if cpu else None,
            "tokens_per_s": first["tokens"] / med,
            "response_tokens_per_s": first["response_tokens"] / med,
            "peak_mib": max(r["peak_bytes"] for r in rs) / MIB,
            "peak_mib_per_round": [r["peak_bytes"] / MIB for r in rs],
            "peak_source": sorted({r["peak_source"] for r in rs}),
            "baseline_mib": first["baseline_bytes"] / MIB,
            "collate_ms": statistics.median(r["collate_ms"] for r in rs),
            "first_loss": first["losses"][0],
            "tokens_per_step": first["tokens"],
            "response_tokens_per_step": first["response_tokens"],
            "positions_per_step": first["positions"],
            "device": first["device"],
            "threads": first["threads"],
        }
    ref = rows.get("sft_plain")
    for row in rows.values():
        row["throughput_vs_sft_plain"] = row["cpu_throughput_vs_sft_plain"] = row["memory_vs_sft_plain"] = None
        if ref is None:
            continue
        row["throughput_vs_sft_plain"] = ref["step_ms_median"] / row["step_ms_median"]
        if ref["cpu_ms_median"] and row["cpu_ms_median"]:
            row["cpu_throughput_vs_sft_plain"] = ref["cpu_ms_median"] / row["cpu_ms_median"]
        if ref["peak_mib"] > 0:
            row["memory_vs_sft_plain"] = row["peak_mib"] / ref["peak_mib"]
    goal = {}
    for v, base in (("gft", "sft_plain"), ("gft_packed", "sft_plain"), ("gft_keep", "sft_plain"),
                    ("gft_compiled", "sft_plain_compiled")):
        if v in rows and base in rows:
            thr = rows[base]["step_ms_median"] / rows[v]["step_ms_median"]
            mem = rows[v]["peak_mib"] / rows[base]["peak_mib"] if rows[base]["peak_mib"] > 0 else None
            goal[v] = {"against": base, "throughput": thr, "memory": mem, "throughput_ok": thr >= GOAL_THROUGHPUT,
                       "memory_ok": mem is not None and mem <= GOAL_MEMORY}
    import torch
    import transformers

    return {
        "benchmark": "bench/train_step.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("variant", "result_file")},
        "goal": {"throughput_vs_sft_plain_min": GOAL_THROUGHPUT, "memory_vs_sft_plain_max": GOAL_MEMORY,
                 "judged_on": "median wall-clock step time and peak memory", "met": goal},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "machine": platform.machine(),
                        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "definitions": {
            "step": "forward + backward + optimizer step + zero_grad; collation excluded (collate_ms)",
            "step_ms_median": "median wall-clock time of the timed steps (after warmup)",
            "cpu_ms_median": "median process CPU time of the timed steps (CPU only; with 1 thread it is "
                             "the step time without the time lost to other processes on the machine)",
            "cpu_per_wall": "process CPU time / wall time over the timed steps; well below --threads means "
                            "the steps waited for a CPU (other processes on the machine)",
            "tokens_per_s": "non-pad input tokens of the batch (prompt + response) / median step time",
            "response_tokens_per_s": "response (loss) tokens / median step time",
            "positions_per_step": "input positions the model runs on, pad included",
            "peak_mib": "peak memory above the baseline taken after model + batch creation "
                        "(CPU: RSS; CUDA: max_memory_allocated)",
        },
        "results": rows,
    }


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}x"


def print_table(summary: dict) -> None:
    rows = summary["results"]
    c = summary["config"]
    first = next(iter(rows.values()))
    model = f"{c['shape']} (random init)" if c.get("shape") else "Qwen2"
    print(f"\nGFT vs SFT training step | {model} hidden={c['hidden']} layers={c['layers']} vocab={c['vocab']} | "
          f"batch={c['batch']} prompt={c['prompt_len'][0]}-{c['prompt_len'][1]} "
          f"response={c['response_len'][0]}-{c['response_len'][1]} ({first['tokens_per_step']} tokens, {first['response_tokens_per_step']} response) | "
          f"{first['device']}, {first['threads']} thread(s) | {c['schedule']}, {c['rounds']} round(s) x "
          f"{c['steps']} timed steps (+{c['warmup']} warmup)")
    head = ("variant", "step ms", "min..max", "cpu ms", "tok/s", "resp tok/s", "peak MiB", "thr/plain",
            "cpu thr/plain", "mem/plain", "positions", "collate ms", "loss@0")
    body = []
    for v, r in rows.items():
        cpu = "-" if r["cpu_ms_median"] is None else f"{r['cpu_ms_median']:.1f}"
        body.append((v, f"{r['step_ms_median']:.1f}", f"{r['step_ms_min']:.0f}..{r['step_ms_max']:.0f}", cpu,
                     f"{r['tokens_per_s']:.0f}", f"{r['response_tokens_per_s']:.0f}", f"{r['peak_mib']:.1f}",
                     _fmt_ratio(r["throughput_vs_sft_plain"]), _fmt_ratio(r["cpu_throughput_vs_sft_plain"]),
                     _fmt_ratio(r["memory_vs_sft_plain"]), str(r["positions_per_step"]),
                     f"{r['collate_ms']:.1f}", f"{r['first_loss']:.4f}"))
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)

    def fmt(cells) -> str:
        return "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(cells, widths)))

    print("\n".join([line, fmt(head), line, *map(fmt, body), line]))
    for v, g in summary["goal"]["met"].items():
        print(f"goal {v} vs {g['against']}: throughput {_fmt_ratio(g['throughput'])} (>= {GOAL_THROUGHPUT}) "
              f"{'ok' if g['throughput_ok'] else 'MISS'}; peak memory {_fmt_ratio(g['memory'])} "
              f"(<= {GOAL_MEMORY}) {'ok' if g['memory_ok'] else 'MISS'}")
    shares = {v: r["cpu_per_wall"] for v, r in rows.items() if r["cpu_per_wall"] is not None}
    if shares and min(shares.values()) < 0.9 * c["threads"]:
        worst = min(shares, key=shares.get)
        print(f"note: {worst} got {shares[worst]:.2f} CPU-seconds per second with {c['threads']} thread(s): "
              "other processes competed for the CPUs, so wall-clock times are noisy; the cpu columns less so")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant is not None:
        variant_worker(args)
        return
    t = time.perf_counter()
    runs = run_all(args)
    summary = summarize(args, runs)
    summary["wall_s"] = time.perf_counter() - t
    print_table(summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**summary, "runs": runs}, indent=2))
    print(f"wrote {args.json} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
