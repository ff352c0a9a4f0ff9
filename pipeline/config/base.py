"""The base of every settings model, its two digests, and the one validator that refuses old names."""

from __future__ import annotations

import hashlib
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, model_validator

from pipeline.config.keys import RUN_ONLY
from pipeline.config.renames import refuse_old_names

__all__ = ["Settings", "S"]

S = TypeVar("S", bound="Settings")


def _sha256_json(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class Settings(BaseModel):
    """Base of every settings model: frozen, unknown keys and non-finite numbers rejected, field docstrings as
    descriptions."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """A renamed field or value fails with its new name (`pipeline.config.renames`)."""
        refuse_old_names(cls.__name__, data)
        return data

    def digest(self) -> str:
        """Stable sha256 of the settings (sorted-key JSON of every field, defaults included): what ran."""
        return _sha256_json(self.model_dump(mode="json"))

    def key_fields(self) -> dict[str, Any]:
        """The fields that can change what a stage writes, as JSON values (nested settings by their own key
        fields): every field but the run-only ones of `pipeline.config.keys.RUN_ONLY`."""
        run_only = RUN_ONLY.get(type(self).__name__, {})
        data = self.model_dump(mode="json", exclude=set(run_only))
        for name in data:
            value = getattr(self, name)
            if isinstance(value, Settings):
                data[name] = value.key_fields()
        return data

    def key_digest(self) -> str:
        """Stable sha256 of `key_fields`: equal for two settings that differ only in how the run goes."""
        return _sha256_json(self.key_fields())
