"""The run's report: the summary table, its plots, and the chain stages' outputs they are drawn from.

`finish` in `pipeline.run` calls `write_plots` and `write_summary` once the DAG is done; the experiment report reads
chain stages through `chain_outputs`. A cached rerun draws nothing: plots drawn from the same outputs by the same
plotting code are kept.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

from pipeline import plots
from pipeline.atomic import write_text_atomic
from pipeline.config import RunConfig
from pipeline.store.artifacts import ArtifactRef
from pipeline.store.outputs import Chain, read_chain

__all__ = ["write_plots", "write_summary", "chain_outputs", "chain_stage", "stage_history", "round_metrics"]

TABLE_COLUMNS = ["greedy_accuracy", "mean@{k}", "pass@{k}", "entropy", "kl_base_policy", "distinct_answers"]


def write_plots(cfg: RunConfig, refs: dict[str, ArtifactRef], metrics: dict[str, dict[str, float]],
                out: Path) -> list[Path]:
    """accuracy.png, training.png (loss, grad norm, entropy, rectified fraction per step), rewards.png. Plots drawn
    from the same outputs by the same plotting code are kept (`.plots.json` records their key): a cached rerun
    draws nothing, which was 2 s of matplotlib."""
    stamp, key = out / ".plots.json", _plots_key(cfg, refs)
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        saved = {}
    kept = [out / name for name in saved.get("plots", [])]
    if saved.get("key") == key and kept and all(p.is_file() for p in kept):
        return kept
    paths = _draw_plots(cfg, refs, metrics, out)
    write_text_atomic(stamp, json.dumps({"key": key, "plots": [p.name for p in paths]}))
    return paths


def _draw_plots(cfg: RunConfig, refs: dict[str, ArtifactRef], metrics: dict[str, dict[str, float]],
                out: Path) -> list[Path]:
    histories = {name: stage_history(refs, name) for name in cfg.chain}
    rounds = {name: round_metrics(refs, name) for name in cfg.chain if name != "sft"}
    keys = ["greedy_accuracy", f"mean@{cfg.eval.k}", f"pass@{cfg.eval.k}"]
    paths = [plots.accuracy_by_stage(metrics, out / "accuracy.png", keys)]
    if any(histories.values()):
        paths.append(plots.training_curves(histories, out / "training.png", along_chain=True))
    if any(rounds.values()):
        paths.append(plots.rewards_by_source(rounds, out / "rewards.png"))
    return paths


def _plots_key(cfg: RunConfig, refs: dict[str, ArtifactRef]) -> str:
    """What the plots are drawn from: the outputs' digests (metrics, histories), chain, eval.k, plotting code."""
    code = inspect.getsource(plots) + inspect.getsource(_draw_plots)
    text = json.dumps({"refs": {name: ref.sha256 for name, ref in refs.items()}, "chain": list(cfg.chain),
                       "k": cfg.eval.k, "code": hashlib.sha256(code.encode()).hexdigest()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def chain_stage(name: str) -> str:
    """The store's stage of a chain name: "sft" -> "sft", "gft" -> "gft_round", "grpo" -> "grpo_round"."""
    from pipeline import stages

    return f"{name}_round" if f"{name}_round" in stages.STAGES else name


def chain_outputs(refs: dict[str, ArtifactRef], name: str) -> Chain:
    """The outputs of chain stage `name` (SFT's one, or every round of GFT/GRPO), read from the store."""
    return read_chain(refs[name], chain_stage(name))


def stage_history(refs: dict[str, ArtifactRef], name: str) -> list[dict[str, float]]:
    """The per-step training history of chain stage `name` (every round's history, in order)."""
    return chain_outputs(refs, name).history


def round_metrics(refs: dict[str, ArtifactRef], name: str) -> list[dict[str, float]]:
    """The manifest metrics of each output of chain stage `name` (one per round; SFT's one)."""
    return chain_outputs(refs, name).round_metrics


def write_summary(path: Path, cfg: RunConfig, refs: dict[str, ArtifactRef], metrics: dict[str, dict[str, float]],
                   plot_paths: list[Path], tracker, registered: str | None) -> Path:
    from pipeline.algo.metrics import comparison_table

    columns = [c.format(k=cfg.eval.k) for c in TABLE_COLUMNS]
    lines = [f"# Run `{cfg.name}`", "", "Held-out evaluation:", "", comparison_table(metrics, columns=columns),
             "Artifacts:", ""]
    lines += [f"- {name}: `{ref.uri}` (sha256 {ref.sha256[:12]})" for name, ref in refs.items()]
    lines += ["", "Plots:", ""] + [f"- `{p}`" for p in plot_paths]
    if registered:
        lines += ["", f"Final model registered as `{registered}`."]
    url = tracker.parent_url()
    if url:
        lines += ["", f"MLflow: {url} (start the UI with `gft ui`)"]
    return write_text_atomic(path, "\n".join(lines) + "\n")
