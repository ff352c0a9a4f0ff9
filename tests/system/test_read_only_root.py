"""A read-only run root is refused before any server or stage starts, with the root named and the way out (copy it,
or `gft ui --root`), and nothing in it changes. Read-only is made for real: a read-only bind mount when the tests
run as root (permissions do not stop root), else the permission bits."""

from __future__ import annotations

import hashlib
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.run import RootError, check_root

TINY = Path(__file__).parents[1] / "data" / "tiny_run.toml"


@contextmanager
def read_only(root: Path):
    """`root` read-only for the duration (every file and folder under it)."""
    if os.geteuid() != 0:
        paths = [root, *root.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield root
        finally:
            for p in reversed(paths):
                p.chmod(modes[p])
        return
    if subprocess.run(["mount", "--bind", str(root), str(root)], capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to bind-mount: no way to make a folder read-only")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True, capture_output=True)
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True, capture_output=True)


def tree_digest(root: Path) -> str:
    """Names and bytes of everything under `root`."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def finished_like(tmp_path) -> Path:
    """A root shaped like a finished run's: a stage folder and an MLflow database file."""
    root = tmp_path / "root"
    (root / "prepare_data" / "abc").mkdir(parents=True)
    (root / "prepare_data" / "abc" / "train.parquet").write_bytes(b"rows")
    (root / "mlflow.db").write_bytes(b"SQLite format 3\0")
    return root


def test_a_read_only_root_is_refused_by_name(finished_like):
    before = tree_digest(finished_like)
    with read_only(finished_like), pytest.raises(RootError) as err:
        check_root(finished_like)
    assert f"run root {finished_like} is read-only" in str(err.value)
    assert f"gft ui --root {finished_like}" in str(err.value)
    assert tree_digest(finished_like) == before


def test_a_missing_root_under_a_read_only_folder_is_refused(tmp_path):
    parent = tmp_path / "shelf"
    parent.mkdir()
    with read_only(parent), pytest.raises(RootError, match="is read-only"):
        check_root(parent / "new-root")


def test_a_writable_root_passes_and_is_created(tmp_path):
    check_root(tmp_path / "a" / "root")
    assert (tmp_path / "a" / "root").is_dir() and not list((tmp_path / "a" / "root").iterdir())  # no probe left


@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["prefect", "in-process"])
def test_both_ways_of_running_exit_2_before_starting_anything(finished_like, capsys, mode):
    from flows import cli

    before = tree_digest(finished_like)
    with read_only(finished_like):
        assert cli.main(["run", str(TINY), "--root", str(finished_like), "--no-progress", *mode]) == 2
        assert "is read-only" in capsys.readouterr().err
    assert tree_digest(finished_like) == before  # no logs/, no Prefect server, no MLflow run
