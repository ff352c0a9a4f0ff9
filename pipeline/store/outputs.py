"""The one reader of a stage's output folder: its manifest, inputs by role, declared datasets, metrics, per-step
history and, for a round-based stage, the chain of rounds.

Every module that looks inside a stage output (the run's summary and plots, the experiment report, the tracker)
reads it here, so the folder's layout (manifest.json, history.jsonl, metrics.json) is known in one place. The
manifest is read through `StageStore.manifest`, which refuses one that describes other content than the reference.
Manifests written before inputs had roles and outputs declared their datasets read the same way: their inputs get
the stage's positional roles (`LEGACY_ROLES`), their datasets the table by output kind (`LEGACY_DATASETS`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.store.artifacts import MANIFEST, ArtifactError, ArtifactRef, Manifest, StageStore

__all__ = ["StageOutput", "Chain", "read_output", "find_output", "read_chain", "HISTORY", "EVAL_METRICS",
           "LEGACY_ROLES", "LEGACY_DATASETS"]

HISTORY = "history.jsonl"
"""One JSON row per optimizer step of a training stage."""
EVAL_METRICS = "metrics.json"
"""An evaluation's held-out metrics."""

# The order of each stage's inputs in manifests that listed them without roles (read as input0, input1, ...).
LEGACY_ROLES: dict[str, tuple[str, ...]] = {
    "prepare_data": ("source",), "teacher_sample": ("prompts", "teacher"), "sft": ("prompts", "init", "teacher"),
    "gft_round": ("prompts", "prev", "teacher"), "grpo_round": ("prompts", "prev", "reference"),
    "evaluate": ("prompts", "model", "base"),
}
# The dataset files of each output kind, for manifests that declare none: file -> the context a consumer logs.
LEGACY_DATASETS: dict[str, dict[str, str]] = {
    "prompts": {"train.parquet": "training", "eval.parquet": "evaluation"},
    "teacher_responses": {"teacher.parquet": "training"},
    "model": {"groups.parquet": "training"},
    "eval": {"samples.parquet": "evaluation"},
}
_POSITIONAL = re.compile(r"input(\d+)")


def _role(stage: str, name: str) -> str:
    """An input's role: `name` itself, or for an old manifest's "input<i>" the stage's i-th positional role."""
    match = _POSITIONAL.fullmatch(name)
    roles = LEGACY_ROLES.get(stage, ())
    return roles[int(match[1])] if match and int(match[1]) < len(roles) else name


@dataclass(frozen=True)
class StageOutput:
    """One stage output folder read through its manifest."""

    ref: ArtifactRef
    manifest: Manifest

    @property
    def path(self) -> Path:
        """The output folder."""
        return self.ref.path

    @property
    def stage(self) -> str:
        """The stage that wrote it (also its folder's parent's name in the store)."""
        return self.manifest.stage

    @property
    def metrics(self) -> dict[str, float]:
        """The stage metrics the manifest records (an evaluation's metrics plus wall time, a round's summary)."""
        return dict(self.manifest.metrics)

    @property
    def inputs(self) -> dict[str, ArtifactRef]:
        """Every input by role, e.g. {"prompts": ..., "model": ..., "base": ...} for an evaluation."""
        return {_role(self.stage, name): ref for name, ref in self.manifest.inputs.items()}

    @property
    def datasets(self) -> dict[str, str]:
        """Dataset file -> the context a consumer logs it under: what the manifest declares (old manifests: the
        table by output kind), limited to files the folder holds."""
        declared = self.manifest.datasets or LEGACY_DATASETS.get(self.manifest.output.kind, {})
        return {name: context for name, context in declared.items() if name in self.manifest.files}

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists; ArtifactError for one it does not."""
        if name not in self.manifest.files:
            raise ArtifactError(f"{self.path}: no file {name!r} in its manifest")
        return self.path / name

    def file_digest(self, name: str) -> str:
        """The sha256 the manifest records for a file."""
        self.file(name)
        return self.manifest.files[name]

    def history(self) -> list[dict[str, float]]:
        """The per-step training rows (history.jsonl), in step order; empty for a stage that does not train."""
        if HISTORY not in self.manifest.files:
            return []
        return [json.loads(line) for line in self.file(HISTORY).read_text().splitlines() if line.strip()]

    def eval_metrics(self) -> dict[str, float]:
        """An evaluation's held-out metrics (metrics.json)."""
        return json.loads(self.file(EVAL_METRICS).read_text())

    def previous_round(self) -> StageOutput | None:
        """The round this output continues: its `prev` input when that is an output of the same stage, else None."""
        prev = self.inputs.get("prev")
        if prev is None or prev.path.parent.name != self.stage:
            return None
        return read_output(prev)

    def rounds(self) -> list[StageOutput]:
        """This output and every earlier round it continues, oldest first (itself alone for a stage without rounds)."""
        chain = [self]
        while (prev := chain[-1].previous_round()) is not None:
            chain.append(prev)
        return chain[::-1]


@dataclass(frozen=True)
class Chain:
    """The outputs of one chain stage, oldest first: SFT's one, or every round of GFT or GRPO."""

    outputs: tuple[StageOutput, ...]

    @property
    def history(self) -> list[dict[str, float]]:
        """Every output's per-step rows, in order (the rounds continue the step count)."""
        return [row for out in self.outputs for row in out.history()]

    @property
    def round_metrics(self) -> list[dict[str, float]]:
        """The manifest metrics of each output (one per round)."""
        return [out.metrics for out in self.outputs]


def read_output(ref: ArtifactRef, store: StageStore | None = None) -> StageOutput:
    """The stage output `ref` points at; ArtifactError when it has no readable manifest or the manifest describes
    other content. `store` defaults to the store holding the folder (`<root>/<stage>/<key>`)."""
    store = store or StageStore(ref.path.parent.parent)
    return StageOutput(ref, store.manifest(ref))


def find_output(ref: ArtifactRef) -> StageOutput | None:
    """Like `read_output`, but None for a reference that is no stage output (an external model, a member folder of
    the bootstrap pair, a prompt source): one whose folder has no manifest."""
    if not (ref.path / MANIFEST).is_file():
        return None
    return read_output(ref)


def read_chain(ref: ArtifactRef, stage: str) -> Chain:
    """The outputs of `stage` that led to `ref`, oldest first (walking each round's `prev` input back); empty when
    `ref` is no output of `stage`, e.g. the initial model of a chain stage of zero rounds."""
    if ref.path.parent.name != stage:
        return Chain(())
    return Chain(tuple(read_output(ref).rounds()))
