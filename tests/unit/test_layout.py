"""The library's shape: layers import downwards only, only the stage layer and above touch the store and tracking,
no folder grows past eight modules, no Prefect inside.

The layers, lowest first (docs/design.md, "Layers"): settings, references and atomic writes -> pure math -> the store
-> data -> the model -> tracking and plots -> rollout -> rounds -> runtime -> stages -> run -> experiment. A module
may import its own package and any lower layer; importing a higher layer (or a sibling of the same rank) fails here,
naming the file, the line and the import. Besides, `pipeline.store` and `pipeline.tracking` are imported only by
`STORE_USERS` (and by each other, and by `flows/`, which sits above the library): rounds, model, algo, data and
rollout are handed folders and live objects, never the store.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"

LAYERS = {
    "pipeline": 0, "pipeline.config": 0, "pipeline.progress": 0, "pipeline.atomic": 0, "pipeline.artifacts": 0,
    "pipeline.algo": 1, "pipeline.memory": 1, "pipeline.store": 2, "pipeline.data": 3, "pipeline.model": 4,
    "pipeline.tracking": 5, "pipeline.plots": 5, "pipeline.rollout": 6, "pipeline.rounds": 7,
    "pipeline.runtime": 8, "pipeline.stages": 9, "pipeline.report": 10, "pipeline.run": 11, "pipeline.experiment": 12,
}
STORE_USERS = {"pipeline.store", "pipeline.tracking", "pipeline.runtime", "pipeline.stages", "pipeline.report",
               "pipeline.run", "pipeline.experiment"}
"""The units that may import `pipeline.store` and `pipeline.tracking` (docs/design.md, "Layers")."""
GUARDED = ("pipeline.store", "pipeline.tracking")
MAX_MODULES = 8


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage (pipeline.model) or, at the top level, itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "pipeline":  # from pipeline import x: x is a module of its own
                found += [(node.lineno, f"pipeline.{alias.name}") for alias in node.names]
    return found


def layer_violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        here = _module_name(path, package)
        mine = LAYERS[_unit(here)]
        for line, target in _imports(path):
            if target.split(".")[0] == "prefect":
                out.append(f"{path.relative_to(package.parent)}:{line}: imports {target} (pipeline/ never imports prefect)")
            if not target.startswith("pipeline") or target == "pipeline" or _unit(target) == _unit(here):
                continue
            theirs = LAYERS.get(_unit(target))
            if theirs is None or theirs >= mine:
                out.append(f"{path.relative_to(package.parent)}:{line}: {here} (layer {mine}) imports {target} "
                           f"(layer {theirs}); import downwards only")
    return out


def store_violations(package: Path = PACKAGE) -> list[str]:
    """Imports of the store or tracking from a unit outside `STORE_USERS`, as "file:line: ..." lines."""
    out = []
    for path in sorted(package.rglob("*.py")):
        here = _unit(_module_name(path, package))
        for line, target in _imports(path):
            if here not in STORE_USERS and target.startswith(GUARDED) and _unit(target) in GUARDED:
                out.append(f"{path.relative_to(package.parent)}:{line}: {here} imports {target}; only "
                           f"{', '.join(sorted(STORE_USERS - set(GUARDED)))} touch the store and tracking")
    return out


def test_layers_import_downwards_only():
    assert layer_violations() == []


def test_only_the_stage_layer_and_above_touch_the_store_and_tracking():
    assert store_violations() == []


def test_the_store_check_catches_a_lower_layer_reaching_into_the_store(tmp_path):
    """The rule can fail: a round that writes through the store and a data module that hashes with it are reported;
    the stages, a store module and the bottom-layer references are not."""
    fake = tmp_path / "pipeline"
    for sub in ("rounds", "data", "store"):
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "rounds" / "launch.py").write_text("import os\nfrom pipeline.store.artifacts import write_text_atomic\n")
    (fake / "data" / "prompts.py").write_text("from pipeline.artifacts import tree_sha256\n"
                                              "def f():\n    from pipeline.tracking import base\n")
    (fake / "store" / "outputs.py").write_text("from pipeline.store.artifacts import StageStore\n")
    (fake / "stages.py").write_text("from pipeline.store import cache\nimport pipeline.tracking\n")
    found = store_violations(fake)
    assert [v.split(": ")[0] for v in found] == ["pipeline/data/prompts.py:3", "pipeline/rounds/launch.py:2"], found
    assert "pipeline.rounds imports pipeline.store.artifacts" in found[1]


def test_the_check_catches_an_upward_import(tmp_path):
    """The rule can fail: a pure-math module that imports the trainer is reported with its line."""
    fake = tmp_path / "pipeline"
    (fake / "algo").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "algo" / "__init__.py").write_text("")
    (fake / "algo" / "losses.py").write_text("import torch\nfrom pipeline.model.trainer import fit\n")
    (fake / "stages.py").write_text("from pipeline.algo import losses\nimport prefect\n")
    found = layer_violations(fake)
    assert any("algo/losses.py:2" in v and "pipeline.model.trainer" in v for v in found), found
    assert any("stages.py:2" in v and "prefect" in v for v in found), found
    assert not any("stages.py:1" in v for v in found), found


def test_every_module_has_a_layer():
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYERS), f"modules without a layer in LAYERS: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("folder", [PACKAGE, *sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())],
                         ids=lambda p: p.name)
def test_no_folder_holds_more_than_eight_modules(folder):
    modules = [p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(modules) <= MAX_MODULES, f"{folder.name}/ holds {len(modules)} modules: split it by concern"


def test_prefect_results_of_run_roots_made_before_the_move_still_load():
    """Prefect's JSON result records name the class they hold; records written before the store moved name
    `pipeline.artifacts.ArtifactRef`, and must still load (as the same class the stages return now)."""
    import json

    from prefect.serializers import JSONSerializer

    from pipeline.store.artifacts import ArtifactRef

    ref = ArtifactRef(kind="model", uri="/r/sft/k", sha256="a" * 64, schema_version=1)
    blob = JSONSerializer().dumps(ref)
    record = json.loads(blob)
    assert record["__class__"] == "pipeline.artifacts.ArtifactRef"  # the class lives below every layer again
    for name in ("pipeline.store.artifacts.ArtifactRef", "pipeline.artifacts.ArtifactRef"):  # as roots stored it
        record["__class__"] = name
        old = JSONSerializer().loads(json.dumps(record).encode())
        assert isinstance(old, ArtifactRef) and old == ref


TIERS = ("unit", "integration", "system")


def test_every_test_file_sits_in_a_tier():
    """tests/unit: one module on its own inputs; tests/integration: parts together in one process (stages, training,
    engines, the store, MLflow); tests/system: whole runs (the CLI, Prefect, torchrun jobs, servers)."""
    tests = PACKAGE.parent / "tests"
    stray = sorted(p.relative_to(tests).as_posix() for p in tests.rglob("test_*.py") if p.parent.name not in TIERS)
    assert not stray, f"test files outside tests/{{{','.join(TIERS)}}}: {stray}"
    assert all(any((tests / tier).glob("test_*.py")) for tier in TIERS)
