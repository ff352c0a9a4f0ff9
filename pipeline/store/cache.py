"""The cache rule: a stage call's key is derived from its arguments, never assembled by hand.

A stage takes settings (pydantic `Settings`), input references (`ArtifactRef`) and scalars (round index, seed,
flags). `derive_spec` sorts the bound arguments of one call by type; every argument enters the key under its role
(the argument's name): settings by the fields that can change what the stage writes (`Settings.key_fields`; the
run-only ones of `pipeline.config.keys`, such as a job's timeout or an engine's sleep mode, are left out), scalars
by value, references as `role=digest`; `None` means "absent" and adds nothing. So a setting that changes what a
stage writes is an ordinary argument of the stage and therefore part of its key, a new argument cannot be
forgotten in the key, and two inputs swapped between roles give another key.
`key = stage_key(stage, VERSIONS[stage], digest of settings and scalars by role, role=digest of each input)`: the
store's folder name and Prefect's cache key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pipeline.config import Settings
from pipeline.store.artifacts import ArtifactRef, stage_key

__all__ = ["VERSIONS", "StageSpec", "derive_spec"]

# Bump a stage's version when its code changes what it writes: the key covers arguments and inputs, not code.
# tests/unit/test_stage_versions.py fails when a stage's code changes without a bump here.
VERSIONS = {"prepare_data": 8, "bootstrap_models": 7, "teacher_sample": 6, "sft": 10, "gft_round": 13, "grpo_round": 12,
            "prepare_benchmark": 1, "evaluate": 10}

_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class StageSpec:
    """One stage call before it runs: settings, input references by role and scalars by name, and its key."""

    stage: str
    kind: str
    configs: dict[str, Settings]
    inputs: dict[str, ArtifactRef]
    scalars: dict[str, Any]
    datasets: dict[str, str] = field(default_factory=dict)

    @cached_property
    def key(self) -> str:
        """`stage_key(stage, VERSIONS[stage], arguments digest, input digests by role)`, computed once per spec."""
        return stage_key(self.stage, VERSIONS[self.stage], self.arguments_digest, self.input_digests)

    @property
    def arguments_digest(self) -> str:
        """sha256 of the settings (their output fields only) and scalars, each under its role."""
        blob = json.dumps({"settings": {role: c.key_fields() for role, c in self.configs.items()},
                           "scalars": self.scalars}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def input_digests(self) -> list[str]:
        """`role=sha256` of every input, sorted by role: a digest counts only in the role it was passed in."""
        return [f"{role}={ref.sha256}" for role, ref in sorted(self.inputs.items())]

    @property
    def pending(self) -> bool:
        """Whether an input is still to be computed (a dry run's placeholder): the key is not known yet."""
        return any(r.kind == "pending" for r in self.inputs.values())


def derive_spec(stage: str, kind: str, arguments: Mapping[str, Any],
                datasets: Mapping[str, str] | None = None) -> StageSpec:
    """The spec of one call from its bound arguments (in signature order); anything that is not settings, a
    reference, a scalar or None is refused, naming the argument."""
    configs, inputs, scalars = {}, {}, {}
    for name, value in arguments.items():
        if value is None:
            continue
        if isinstance(value, Settings):
            configs[name] = value
        elif isinstance(value, ArtifactRef):
            inputs[name] = value
        elif isinstance(value, _SCALARS):
            scalars[name] = value
        else:
            raise TypeError(f"stage {stage}: argument {name!r} is a {type(value).__name__}; a stage takes settings, "
                            f"artifact references and scalars, so that all of it is in the key")
    return StageSpec(stage, kind, configs, inputs, scalars, dict(datasets or {}))
