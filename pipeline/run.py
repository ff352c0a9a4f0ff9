"""Run the pipeline in-process, without Prefect: data -> models -> teacher -> {SFT, GFT} -> evaluation.

    python -m pipeline.run configs/default.toml

Every stage is cached in the run's artifact store, so running the same config again serves every finished
stage and computes only what is missing or changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import stages
from pipeline.artifacts import ArtifactRef, StageStore
from pipeline.config import RunConfig, load_toml
from pipeline.evaluation import comparison_table

__all__ = ["RunResult", "run", "main"]

TABLE_COLUMNS = ["greedy_accuracy", "mean@{k}", "pass@{k}", "entropy", "kl_base_policy", "distinct_answers"]


@dataclass(frozen=True)
class RunResult:
    """References of every stage output, the evaluation metrics by checkpoint, and the summary file."""

    refs: dict[str, ArtifactRef]
    metrics: dict[str, dict[str, float]]
    summary_path: Path
    calls: dict[str, int]


def resolve_models(cfg: RunConfig, res: stages.Resources) -> tuple[ArtifactRef, ArtifactRef | None]:
    """Base and teacher references: the bootstrap pair for "bootstrap", else external models."""
    needs_bootstrap = "bootstrap" in (cfg.models.base, cfg.models.teacher)
    pair = stages.bootstrap_models(cfg.synthetic, res) if needs_bootstrap else None

    base = stages.bootstrap_member(pair, "base") if cfg.models.base == "bootstrap" else stages.external_model(
        cfg.models.base)
    teacher = None if cfg.models.teacher is None else (
        stages.bootstrap_member(pair, "teacher") if cfg.models.teacher == "bootstrap"
        else stages.external_model(cfg.models.teacher))
    return base, teacher


def run(cfg: RunConfig, *, root: Path, progress: bool = True) -> RunResult:
    """Run the configured chain, each training stage from the base model, each followed by evaluation."""
    torch.set_num_threads(cfg.threads)
    res = stages.Resources(StageStore(root), engine_cfg=cfg.engine, progress=progress)
    try:
        refs = {"prompts": stages.prepare_data(cfg.data, cfg.synthetic, res)}
        refs["base"], teacher_model = resolve_models(cfg, res)
        if teacher_model is not None and cfg.teacher_sample.k > 0:
            refs["teacher"] = stages.teacher_sample(cfg.teacher_sample, refs["prompts"], teacher_model, res)
        evals = {"base": stages.evaluate(cfg.eval, refs["prompts"], refs["base"], refs["base"], res)}
        for name in cfg.chain:
            refs[name] = _train(name, cfg, refs, res)
            evals[name] = stages.evaluate(cfg.eval, refs["prompts"], refs[name], refs["base"], res)
        refs.update({f"eval/{k}": v for k, v in evals.items()})
        metrics = {k: json.loads((Path(v.uri) / "metrics.json").read_text()) for k, v in evals.items()}
        summary = _write_summary(root / f"summary-{cfg.name}.md", cfg, refs, metrics)
        return RunResult(refs=refs, metrics=metrics, summary_path=summary, calls=dict(res.calls))
    finally:
        res.close()


def _train(name: str, cfg: RunConfig, refs: dict[str, ArtifactRef], res: stages.Resources) -> ArtifactRef:
    teacher = refs.get("teacher")
    if name == "sft":
        return stages.sft(cfg.sft, refs["prompts"], teacher, refs["base"], res)
    if name == "grpo":
        return stages.grpo(cfg.grpo, refs["prompts"], refs["base"], res, seed=cfg.seed)[-1]
    return stages.gft(cfg.gft, refs["prompts"], teacher, refs["base"], res, seed=cfg.seed)[-1]


def _write_summary(path: Path, cfg: RunConfig, refs: dict[str, ArtifactRef],
                   metrics: dict[str, dict[str, float]]) -> Path:
    columns = [c.format(k=cfg.eval.k) for c in TABLE_COLUMNS]
    lines = [f"# Run `{cfg.name}`", "", "Held-out evaluation:", "", comparison_table(metrics, columns=columns),
             "Artifacts:", ""]
    lines += [f"- {name}: `{ref.uri}` (sha256 {ref.sha256[:12]})" for name, ref in refs.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a RunConfig TOML file, e.g. configs/default.toml")
    parser.add_argument("--root", type=Path, help="artifact store (default: the config's `root`)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; ours stay
    cfg = load_toml(RunConfig, args.config)
    root = (args.root or (args.config.resolve().parent / cfg.root)).resolve()
    start = time.perf_counter()
    result = run(cfg, root=root, progress=not args.no_progress)
    print(result.summary_path.read_text())
    print(f"Finished in {time.perf_counter() - start:.0f} s. Summary: {result.summary_path}")
    print(f"Work done this time (cached stages do none): {result.calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
