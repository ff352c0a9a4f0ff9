"""SFT -> GRPO against GFT -> GRPO on the embedded default: same base, same seeds, same GRPO rounds.

    python experiments/grpo_handoff.py [--config configs/default.toml] [--root runs] [--set grpo.rounds=6 ...]

Every stage goes through `pipeline.stages`, so finished stages are served from the store under --root. The
script prints and writes (to --out) the mean reward of every GRPO round of both chains and the held-out
accuracy after each stage, with the wall time of every stage that ran.

Each round draws fresh prompts, so the per-round mean reward mixes learning with how hard that round's
prompts are. `--control` also runs every chain with a learning rate of 1e-12 (the policy does not move: the
same samples as the start policy would draw on each round's prompts) and reports reward minus control.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pipeline import runtime, stages
from pipeline.store.artifacts import ArtifactRef, StageStore
from pipeline.store.outputs import read_output
from pipeline.config import RunConfig, apply_overrides, load_toml
from pipeline.run import resolve_models


def _override(cfg: RunConfig, assignments: list[str]) -> RunConfig:
    """`section.field=value` (value parsed as JSON, else kept as a string) applied to a RunConfig."""
    return apply_overrides(cfg, dict(_assignment(item) for item in assignments), where="--set")


def _assignment(item: str) -> tuple[str, object]:
    path, _, raw = item.partition("=")
    try:
        return path, json.loads(raw)
    except json.JSONDecodeError:
        return path, raw


def _metrics(res: runtime.Resources, ref: ArtifactRef) -> dict:
    return read_output(ref, res.store).metrics


def _eval(res: runtime.Resources, cfg: RunConfig, prompts: ArtifactRef, model: ArtifactRef,
          base: ArtifactRef) -> dict:
    ref = stages.evaluate(cfg.eval, prompts, model, base, cfg.engine, res=res)
    return read_output(ref).eval_metrics()


def run(cfg: RunConfig, root: Path, *, control: bool = False) -> dict:
    """Both chains; returns per-round rewards, held-out metrics per stage and wall times."""
    torch.set_num_threads(cfg.threads)
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        prompts = stages.prepare_data(cfg.data, *stages.prepare_data_inputs(cfg.data, cfg.synthetic), res=res)
        base, teacher_model = resolve_models(cfg, lambda _name, stage, *a, **k: stages.execute(
            stages.bind(stage, *a, **k), res))
        teacher = stages.teacher_sample(cfg.teacher_sample, prompts, teacher_model, cfg.engine, res=res)
        mix = teacher if cfg.sft.source == "mix" else None
        starts = {"sft": stages.sft(cfg.sft, prompts, mix, base, cfg.engine.trust_remote_code, res=res),
                  "gft": stages.gft(cfg.gft, prompts, teacher, base, res=res, engine=cfg.engine, seed=cfg.seed)[-1]}
        out = {"eval": {"base": _eval(res, cfg, prompts, base, base)}, "curves": {}, "wall_s": {}}
        for name, start in starts.items():
            out["eval"][name] = _eval(res, cfg, prompts, start, base)
            t0 = time.perf_counter()
            rounds = stages.grpo(cfg.grpo, prompts, start, res=res, engine=cfg.engine, seed=cfg.seed)
            out["wall_s"][f"{name}->grpo (this call)"] = time.perf_counter() - t0
            per_round = [_metrics(res, r) for r in rounds]
            out["curves"][name] = per_round
            out["wall_s"][f"{name}->grpo (stage sum)"] = sum(m["wall_time_s"] for m in per_round)
            out["eval"][f"{name}->grpo"] = _eval(res, cfg, prompts, rounds[-1], base)
            if control:
                frozen = cfg.grpo.model_copy(update={"train": cfg.grpo.train.model_copy(update={"lr": 1e-12})})
                out["curves"][f"{name} (control)"] = [_metrics(res, r) for r in stages.grpo(
                    frozen, prompts, start, res=res, engine=cfg.engine, seed=cfg.seed)]
        out["calls"] = dict(res.calls)
        return out
    finally:
        res.close()


KEYS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
        "entropy", "clip_ratio/region_mean", "sampling/sampling_logp_difference/mean", "perf/throughput",
        "wall_time_s")


def report(result: dict, cfg: RunConfig) -> str:
    k = cfg.eval.k
    lines = [f"GRPO: {cfg.grpo.rounds} rounds x {cfg.grpo.prompts_per_round} prompts x {cfg.grpo.num_generations} "
             f"generations, lr {cfg.grpo.train.lr}, minibatches {cfg.grpo.minibatches_per_round}, "
             f"num_iterations {cfg.grpo.num_iterations}", ""]
    for name, curve in result["curves"].items():
        lines.append(f"{name} -> grpo, per round:")
        lines.append("| round | " + " | ".join(KEYS) + " |")
        lines.append("|---" * (len(KEYS) + 1) + "|")
        for r, m in enumerate(curve):
            lines.append(f"| {r} | " + " | ".join(f"{m.get(key, float('nan')):.4g}" for key in KEYS) + " |")
        lines += _reward_summary([m["reward"] for m in curve], result["curves"].get(f"{name} (control)"))
        lines.append("")
    lines.append(f"| checkpoint | greedy_accuracy | mean@{k} | pass@{k} | entropy | kl_base_policy |")
    lines.append("|---|---|---|---|---|---|")
    for name, m in result["eval"].items():
        lines.append(f"| {name} | {m['greedy_accuracy']:.4f} | {m[f'mean@{k}']:.4f} | {m[f'pass@{k}']:.4f} | "
                     f"{m['entropy']:.4f} | {m.get('kl_base_policy', float('nan')):.4f} |")
    lines += ["", "wall times (s): " + ", ".join(f"{k2} {v:.1f}" for k2, v in result["wall_s"].items()),
              f"work done: {result['calls']}"]
    return "\n".join(lines)


def _half_means(values: list[float]) -> tuple[float, float]:
    half = len(values) // 2
    return sum(values[:half]) / max(1, half), sum(values[half:]) / max(1, len(values) - half)


def _reward_summary(rewards: list[float], control: list[dict] | None) -> list[str]:
    first, second = _half_means(rewards)
    lines = [f"mean reward: start {rewards[0]:.4f}, end {rewards[-1]:.4f}, first half {first:.4f}, "
             f"second half {second:.4f}"]
    if control is not None:
        lift = [r - c["reward"] for r, c in zip(rewards, control)]
        a, b = _half_means(lift)
        lines.append("reward - control per round: " + ", ".join(f"{x:+.4f}" for x in lift)
                     + f"; first half {a:+.4f}, second half {b:+.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"))
    parser.add_argument("--root", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, help="write the report (markdown) and raw results (json) here")
    parser.add_argument("--control", action="store_true", help="also run each chain with lr 1e-12")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.field=value")
    args = parser.parse_args(argv)
    cfg = _override(load_toml(RunConfig, args.config), args.overrides)
    start = time.perf_counter()
    result = run(cfg, args.root.resolve(), control=args.control)
    text = report(result, cfg) + f"\ntotal {time.perf_counter() - start:.0f} s\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
