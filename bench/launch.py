"""The SFT stage of the embedded default trained in the stage's process, as a launched one-process job, and as a
launched job of 2 processes (DDP, gloo): wall time of the training phase (`perf/train_s`: model load, the job's
start and the steps), tokens/s, and the launch's overhead (the one-process job against in-process training),
interleaved, medians over repetitions. Upstream stages are computed once and served; evaluations are skipped.

    .venv/bin/python bench/launch.py [--reps 2] [--root /tmp/bench-launch] [--out bench/reference/launch_cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"in-process": {}, "job x1": {"sft.train.launch.job": True},
            "job x2 ddp": {"sft.train.launch.processes": 2}}


def sft_once(root: Path, overrides: dict) -> dict[str, float]:
    """One SFT stage (upstream served from `root`), its perf metrics and the stage's wall time."""
    from pipeline import run, runtime, stages
    from pipeline.config import apply_overrides, load_run_config
    from pipeline.store.artifacts import ArtifactRef, StageStore
    from pipeline.store.outputs import read_output

    cfg = apply_overrides(load_run_config(Path("configs/default.toml")),
                          {"chain": ["sft"], "tracking.enabled": False, **overrides})
    res = runtime.Resources(StageStore(root), progress=False)
    skipped = ArtifactRef(kind="pending", uri="pending:evaluate", sha256="0" * 64, schema_version=1)

    def ops(call: stages.StageCall) -> ArtifactRef:
        return skipped if call.stage == "evaluate" else stages.execute(call, res=res)

    try:
        start = time.perf_counter()
        refs = run.execute(cfg, ops, res)
        metrics = read_output(refs["sft"]).metrics
    finally:
        res.close()
    return {"stage_s": time.perf_counter() - start, **{k: v for k, v in metrics.items() if k.startswith("perf/")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--root", type=Path, default=Path("/tmp/bench-launch"))
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.txt")
    args = p.parse_args()
    sft_once(args.root, {"sft.train.seed": 1000})  # upstream stages computed once, not timed
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        for name, overrides in VARIANTS.items():  # interleaved; a fresh seed is a fresh key
            results[name].append(sft_once(args.root, {**overrides, "sft.train.seed": rep}))
    lines = table(results)
    print("\n".join(lines))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return 0


def table(results: dict[str, list[dict[str, float]]]) -> list[str]:
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
    base = med["in-process"]["perf/train_s"]
    lines = [f"SFT stage of configs/default.toml, {len(results['in-process'])} interleaved reps, medians",
             f"{'variant':<12} {'train s':>8} {'stage s':>8} {'step s':>7} {'tok/s':>7} {'vs in-process':>14}",
             "-" * 62]
    for name, m in med.items():
        lines.append(f"{name:<12} {m['perf/train_s']:8.1f} {m['stage_s']:8.1f} {m['perf/step_s']:7.2f} "
                     f"{m['perf/throughput']:7.0f} {m['perf/train_s'] / base:13.2f}x")
    overhead = med["job x1"]["perf/train_s"] - base
    lines.append(f"launch overhead (job x1 - in-process): {overhead:.1f} s, {overhead / base:.0%} of the training phase")
    return lines


if __name__ == "__main__":
    sys.exit(main())
