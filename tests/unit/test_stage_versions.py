"""A stage's code cannot change without a version bump.

The key of a stage covers its arguments and inputs, not its code, so `pipeline.store.cache.VERSIONS` must be
bumped whenever the code a stage runs changes what it writes. This test hashes each stage's code closure: the
stage function and the helpers of pipeline/stages.py it calls, plus every library module it reaches through
imports (settings, the store, tracking and progress bars excluded: the key covers settings, and the others do
not change outputs), each as its AST without docstrings (comments and docstrings never need a bump). The
digests are recorded with the versions in tests/data/stage_code.json; a digest that moved while its version did
not fails here, naming the version to bump. After bumping, record the new digests:

    make stage-versions        # .venv/bin/python tests/unit/test_stage_versions.py --update
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline import stages  # noqa: E402
from pipeline.store.cache import VERSIONS  # noqa: E402

SNAPSHOT = ROOT / "tests" / "data" / "stage_code.json"
IGNORED = ("pipeline.config", "pipeline.progress", "pipeline.store", "pipeline.tracking", "pipeline.artifacts",
           "pipeline.runtime", "pipeline.stages", "pipeline.plots", "pipeline.run", "pipeline.experiment")


def _normalized(tree: ast.AST) -> str:
    """The AST without docstrings: what the code does, not how it is described."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def _path(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # from pipeline.data import chat
    return {m for m in found if m.startswith("pipeline.") and _path(m) and not m.startswith(IGNORED)}


def module_closure(modules: set[str]) -> dict[str, str]:
    """Every library module reachable from `modules` by imports, with its normalized AST."""
    todo, seen = sorted(modules), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        tree = ast.parse(_path(name).read_text())
        seen[name] = _normalized(tree)
        todo += sorted(_imports(tree) - set(seen))
    return seen


def _stage_functions(stage: str) -> tuple[list[ast.FunctionDef], set[str]]:
    """The stage function and the module-level helpers of stages.py it calls (transitively), and the names
    they use."""
    tree = ast.parse(Path(stages.__file__).read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    todo, picked, names = [stage], {}, set()
    while todo:
        name = todo.pop()
        if name in picked or name not in defs:
            continue
        picked[name] = defs[name]
        used = {n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name)}
        names |= used
        todo += sorted(used & set(defs))
    return [picked[k] for k in sorted(picked)], names


RESOURCES = {"engine": "pipeline.rollout.engines", "verifier": "pipeline.rollout.verifiers"}
"""What a stage reaches through `Resources` (res.engine(...), res.verifier(...)) rather than an import."""


def _reached(functions: list[ast.FunctionDef]) -> set[str]:
    """Modules a stage reaches without importing them: resources it asks for, verifier specs it names."""
    out = set()
    for fn in functions:
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and node.attr in RESOURCES:
                out.add(RESOURCES[node.attr])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("pipeline."):
                out.add(node.value.split(":")[0])  # "pipeline.rollout.verifiers:gold_check"
    return {m for m in out if _path(m)}


def _imported_modules(names: set[str]) -> set[str]:
    """The library modules that stages.py binds to `names` by its imports."""
    out = set()
    for node in ast.parse(Path(stages.__file__).read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:
                if (alias.asname or alias.name) in names:
                    sub = f"{node.module}.{alias.name}"
                    out.add(sub if _path(sub) else node.module)
    return {m for m in out if not m.startswith(IGNORED)}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stage_code_parts(stage: str) -> dict[str, str]:
    """The digest of each part of the stage's code closure: its functions in stages.py and each module."""
    functions, names = _stage_functions(stage)
    closure = module_closure(_imported_modules(names) | _reached(functions))
    parts = {"pipeline.stages:" + stage: _sha("\0".join(_normalized(fn) for fn in functions))}
    return parts | {name: _sha(closure[name]) for name in sorted(closure)}


def stage_code_digest(stage: str) -> tuple[str, list[str]]:
    """sha256 of the stage's code closure, and the modules in it."""
    parts = stage_code_parts(stage)
    return _sha(json.dumps(parts, sort_keys=True)), sorted(p for p in parts if ":" not in p)


def current() -> dict[str, dict]:
    return {s: {"version": VERSIONS[s], "code": stage_code_digest(s)[0], "parts": stage_code_parts(s)}
            for s in sorted(stages.STAGES)}


def _moved(was: dict, now: dict) -> list[str]:
    """The parts of a closure whose code changed, appeared or went."""
    old, new = was.get("parts", {}), now["parts"]
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def test_every_stage_has_a_version_and_a_recorded_digest():
    recorded = json.loads(SNAPSHOT.read_text())
    assert set(stages.STAGES) == set(VERSIONS) == set(recorded), "run `make stage-versions` after adding a stage"


def test_stage_code_changes_come_with_a_version_bump():
    recorded, problems = json.loads(SNAPSHOT.read_text()), []
    for stage, now in current().items():
        was = recorded[stage]
        if now["code"] != was["code"] and now["version"] == was["version"]:
            problems.append(f"{stage}: its code changed ({', '.join(_moved(was, now))}) but "
                            f"VERSIONS[{stage!r}] is still {now['version']}: bump it to {now['version'] + 1} in "
                            f"pipeline/store/cache.py, then run `make stage-versions`")
        elif now["version"] != was["version"] and now["code"] == was["code"]:
            problems.append(f"{stage}: VERSIONS[{stage!r}] is {now['version']} but tests/data/stage_code.json "
                            f"records {was['version']} for the same code: run `make stage-versions`")
        elif now["code"] != was["code"] or now["version"] != was["version"]:
            problems.append(f"{stage}: version bumped to {now['version']} and code changed: run `make stage-versions`")
    assert not problems, "\n".join(problems)


def test_the_digest_sees_a_change_in_a_round_module_but_not_in_a_docstring(monkeypatch):
    base = stage_code_digest("gft_round")
    assert "pipeline.rounds.gft" in base[1] and "pipeline.model.loop" in base[1] and "pipeline.algo.losses" in base[1]
    real = Path.read_text

    def edited(self, *a, **k):
        text = real(self, *a, **k)
        if self.name == "losses.py" and self.parent.name == "algo":
            return text.replace('"""', '"""Docstrings do not count. ', 1)
        return text

    monkeypatch.setattr(Path, "read_text", edited)
    assert stage_code_digest("gft_round") == base  # a docstring edit needs no bump

    def changed(self, *a, **k):
        text = real(self, *a, **k)
        return text + "\nX = 1\n" if self.name == "losses.py" and self.parent.name == "algo" else text

    monkeypatch.setattr(Path, "read_text", changed)
    assert stage_code_digest("gft_round")[0] != base[0]
    assert stage_code_digest("prepare_data")[0] == stage_code_digest("prepare_data")[0]


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    SNAPSHOT.write_text(json.dumps(current(), indent=2, sort_keys=True) + "\n")
    print(f"recorded {SNAPSHOT.relative_to(ROOT)}: " + ", ".join(f"{s} v{v['version']}" for s, v in current().items()))
elif __name__ == "__main__":
    sys.exit("usage: python tests/unit/test_stage_versions.py --update")
