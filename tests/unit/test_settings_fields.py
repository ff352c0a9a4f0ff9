"""Every settings field is classified, once, as changing what a stage writes (in its key) or as run-only (how the
run goes: left out of the key), `pipeline.config.keys`; a new field that is not classified fails here, and each
classification is checked against the key digest itself. No stage runs here."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import pytest

import pipeline.config as config
from pipeline.config import RunConfig, Settings
from pipeline.config.keys import OUTPUT, RUN_ONLY


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def _nested(schema: type[Settings]) -> set[type[Settings]]:
    """`schema` and every settings schema its fields hold, recursively."""
    found = {schema}
    for info in schema.model_fields.values():
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(arg, type) and issubclass(arg, Settings) and arg not in found:
                found |= _nested(arg)
    return found


SCHEMAS = sorted({c for c in _subclasses(Settings) if c.__module__.startswith("pipeline.config")} | _nested(RunConfig),
                 key=lambda c: c.__name__)
FIELDS = [(schema, name) for schema in SCHEMAS for name in schema.model_fields]


def classification_problems(schemas, output: dict[str, tuple[str, ...]], run_only: dict[str, dict[str, str]]):
    """Every field of `schemas` not classified, classified twice, and every table entry that names no field."""
    problems = []
    for schema in schemas:
        fields, out, run = set(schema.model_fields), set(output.get(schema.__name__, ())), \
            set(run_only.get(schema.__name__, {}))
        problems += [f"{schema.__name__}.{f}: not classified (add it to OUTPUT or RUN_ONLY in pipeline/config/keys.py)"
                     for f in sorted(fields - out - run)]
        problems += [f"{schema.__name__}.{f}: both OUTPUT and RUN_ONLY" for f in sorted(out & run)]
        problems += [f"{schema.__name__}.{f}: classified but no such field" for f in sorted((out | run) - fields)]
        problems += [f"{schema.__name__}.{f}: run-only without a reason" for f, why in
                     run_only.get(schema.__name__, {}).items() if not why.strip()]
    names = {s.__name__ for s in schemas}
    problems += [f"{name}: classified but no such schema" for name in sorted((set(output) | set(run_only)) - names)]
    return problems


def test_every_field_of_every_schema_is_classified_once():
    assert {c.__name__ for c in SCHEMAS} >= {"RunConfig", "LaunchConfig", "TrainConfig", "EngineConfig",
                                              "TrackingConfig", "RetentionConfig"}
    assert classification_problems(SCHEMAS, OUTPUT, RUN_ONLY) == []


def test_an_unclassified_or_misnamed_field_is_reported():
    class Probe(Settings):
        """A schema with one field of each kind and one nobody classified."""

        kept: int = 0
        """Changes the output."""
        how: int = 0
        """Changes how the run goes."""
        new: int = 0
        """Added later, classified nowhere."""

    problems = classification_problems([Probe], {"Probe": ("kept", "gone")}, {"Probe": {"how": "x", "kept": "y"}})
    assert problems == ["Probe.new: not classified (add it to OUTPUT or RUN_ONLY in pipeline/config/keys.py)",
                        "Probe.kept: both OUTPUT and RUN_ONLY", "Probe.gone: classified but no such field"]


def _non_none(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    return args[0] if is_union else annotation


def _other(value: Any, annotation) -> Any:
    """A different value of the field (not validated: the key digest is what is checked)."""
    kind = _non_none(annotation)
    if isinstance(value, Settings):
        fields = type(value).model_fields
        name = next((f for f in OUTPUT.get(type(value).__name__, ()) if not isinstance(getattr(value, f), Settings)),
                    next(iter(fields)))
        return value.model_copy(update={name: _other(getattr(value, name), fields[name].annotation)})
    if typing.get_origin(kind) is Literal:
        return next(choice for choice in typing.get_args(kind) if choice != value)
    if typing.get_origin(kind) is tuple:  # the last element changed, or one element where there was none
        element = typing.get_args(kind)[0]
        return value[:-1] + (_other(value[-1], element),) if value else (_other(None, element),)
    if isinstance(value, bool) or kind is bool:
        return not value
    if value is None and isinstance(kind, type) and issubclass(kind, Settings):
        return kind()  # an optional table where there was none (BenchmarkConfig.sampling, a first benchmark)
    if value is None:
        return {int: 1, float: 0.5, str: "x"}[kind]
    return value + "x" if isinstance(value, str) else value + 1


@pytest.mark.parametrize("schema,name", FIELDS, ids=[f"{s.__name__}.{n}" for s, n in FIELDS])
def test_a_field_changes_the_key_digest_exactly_when_it_is_classified_as_output(schema, name):
    settings = schema()
    changed = settings.model_copy(update={name: _other(getattr(settings, name), schema.model_fields[name].annotation)})
    assert changed.digest() != settings.digest()  # a real change: what ran differs
    in_key = changed.key_digest() != settings.key_digest()
    assert in_key == (name in OUTPUT.get(schema.__name__, ())), \
        f"{schema.__name__}.{name}: classified {'OUTPUT' if not in_key else 'RUN_ONLY'} but the key digest disagrees"


def test_the_key_digest_of_the_default_run_leaves_the_run_only_tables_out():
    run = RunConfig()
    assert "tracking" not in run.key_fields() and "timeout_s" not in run.key_fields()["sft"]["train"]["launch"]
    moved = config.apply_overrides(run, {"name": "elsewhere", "sft.train.launch.timeout_s": 5.0,
                                         "engine.enable_sleep_mode": True, "tracking.enabled": False})
    assert moved.key_digest() == run.key_digest() and moved.digest() != run.digest()


def test_old_names_are_not_current_names():
    """A renamed field or value that is also a current one would refuse valid settings."""
    from pipeline.config.renames import RENAMED

    for schema_name, renamed in RENAMED.items():
        schema = getattr(config, schema_name)
        assert not set(renamed.fields) & set(schema.model_fields), schema_name
        for name, values in renamed.values.items():
            allowed = typing.get_args(schema.model_fields[name].annotation)
            assert allowed and not set(values) & set(allowed) and set(values.values()) <= set(allowed), name
            with pytest.raises(ValueError, match=f"is now {next(iter(values.values()))!r}"):
                schema.model_validate({name: next(iter(values))})
