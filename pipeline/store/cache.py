"""The cache rule: a stage call's key is derived from its arguments, never assembled by hand.

A stage takes settings (pydantic `Settings`), input references (`ArtifactRef`) and scalars (round index, seed,
flags). `derive_spec` sorts the bound arguments of one call by type: every settings object goes into the config
digest, every reference into the input digests (by role: the argument's name), every scalar into the key as
`name=value`; `None` means "absent" and adds nothing. So a setting that changes what a stage writes is an ordinary
argument of the stage and therefore part of its key, and a new argument cannot be forgotten in the key.
`key = stage_key(stage, VERSIONS[stage], config digest + scalars, input digests)`: the store's folder name and
Prefect's cache key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pipeline.config import Settings
from pipeline.store.artifacts import ArtifactRef, stage_key

__all__ = ["VERSIONS", "StageSpec", "derive_spec"]

# Bump a stage's version when its code changes what it writes: the key covers arguments and inputs, not code.
# tests/test_stage_versions.py fails when a stage's code changes without a bump here.
VERSIONS = {"prepare_data": 6, "bootstrap_models": 5, "teacher_sample": 5, "sft": 8, "gft_round": 11, "grpo_round": 10,
            "evaluate": 8}

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
        """`stage_key(stage, VERSIONS[stage], config digest + scalars, input digests)`, computed once per spec."""
        digest = hashlib.sha256("|".join(c.digest() for c in self.configs.values()).encode()).hexdigest()
        extra = ",".join(f"{name}={value}" for name, value in self.scalars.items())
        return stage_key(self.stage, VERSIONS[self.stage], digest + extra, [r.sha256 for r in self.inputs.values()])

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
