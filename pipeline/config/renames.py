"""Old names of settings, refused with the new one named: a renamed option must not be silently ignored (extra
keys fail anyway) or silently reinterpreted. `Settings` applies these tables in one validator, before its own
fields are checked, so an old name in a TOML file fails with what to write instead."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Renamed", "RENAMED", "refuse_old_names"]


@dataclass(frozen=True)
class Renamed:
    """The old names of one schema: fields that are gone (and what replaces each), values of a field that were
    renamed (old -> new), and why the values were renamed."""

    section: str
    fields: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    values_why: str = ""


RENAMED: dict[str, Renamed] = {
    "GRPOConfig": Renamed(
        section="grpo",
        fields={
            "importance_sampling": "the sampler/trainer correction is sampler_correction (none, token_truncate, "
                                   "sequence_truncate, token_mask, sequence_mask); GSPO's sequence ratio is "
                                   "importance_sampling_level",
            "importance_sampling_cap": "use sampler_correction_max",
        },
        values={"aggregation": {"token_mean": "token-mean", "sequence_mean": "seq-mean-token-mean",
                                "constant": "dr_grpo"}},
        values_why="verl's loss_agg_mode names",
    ),
}
"""Schema class name -> its old names."""


def refuse_old_names(schema: str, data: Any) -> None:
    """Raise ValueError naming the new name if `data` (the raw input of `schema`) uses an old one."""
    renamed = RENAMED.get(schema)
    if renamed is None or not isinstance(data, Mapping):
        return
    for old, new in renamed.fields.items():
        if old in data:
            raise ValueError(f"{renamed.section}.{old} was renamed: {new}")
    for name, table in renamed.values.items():
        value = data.get(name)
        if isinstance(value, str) and value in table:
            raise ValueError(f"{renamed.section}.{name} = {value!r} is now {table[value]!r} ({renamed.values_why})")
