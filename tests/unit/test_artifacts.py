"""pipeline/store/artifacts.py: digests, stage keys, and a stage store that never serves a killed, altered or
half-written output."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

import pipeline
from pipeline.store import artifacts
from pipeline.store import locks
from pipeline.store.artifacts import (ArtifactError, ArtifactRef, Manifest, StageStore, file_sha256, files_sha256,
                                      hash_tree, manifest_digest, stage_key, tree_sha256)

REPO = Path(__file__).resolve().parents[2]
D = "0" * 64  # a well-formed digest


def write_output(store: StageStore, stage: str, key: str, files: dict[str, bytes], **kw) -> ArtifactRef:
    kw = {"kind": "test", "version": 1, "config": {"lr": 0.1}, "inputs": [], **kw}
    with store.write(stage, key, **kw) as out:
        for rel, data in files.items():
            (out.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (out.path / rel).write_bytes(data)
    return out.ref


def leftovers(store: StageStore, stage: str) -> list[str]:
    return sorted(p.name for p in (store.root / stage).glob(".tmp-*"))


@pytest.fixture
def store(tmp_path) -> StageStore:
    return StageStore(tmp_path / "runs")


# ---------------------------------------------------------------------------------------------------------
# References, digests, keys
# ---------------------------------------------------------------------------------------------------------


def test_ref_json_round_trip_and_frozen():
    ref = ArtifactRef(kind="prompts", uri="/x/y", sha256=D, schema_version=2)
    assert ArtifactRef.model_validate_json(ref.model_dump_json()) == ref
    with pytest.raises(ValidationError):
        ref.kind = "other"
    with pytest.raises(ValidationError):
        ArtifactRef(kind="prompts", uri="/x", sha256="abc", schema_version=1)
    with pytest.raises(ValidationError):
        ArtifactRef(kind="prompts", uri="/x", sha256=D, schema_version=1, extra=1)


def test_file_and_tree_digests(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, order in ((a, ["x", "sub/y"]), (b, ["sub/y", "x"])):  # creation order does not matter
        for rel in order:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(rel.encode())
    assert file_sha256(a / "x") == hashlib.sha256(b"x").hexdigest()
    assert tree_sha256(a) == tree_sha256(b) == files_sha256(hash_tree(a))
    assert set(hash_tree(a)) == {"x", "sub/y"}
    (a / "manifest.json").write_text("{}")  # the top-level manifest is excluded
    assert tree_sha256(a) == tree_sha256(b)
    (b / "sub" / "y").rename(b / "sub" / "z")  # a rename changes the digest
    assert tree_sha256(a) != tree_sha256(b)
    with pytest.raises(ArtifactError, match="not a folder"):
        tree_sha256(a / "x")


def test_stage_key_changes_with_every_part():
    base = stage_key("gft", 1, "cfg", ["in1", "in2"])
    assert base == stage_key("gft", 1, "cfg", ("in1", "in2")) and len(base) == 64
    variants = [stage_key("sft", 1, "cfg", ["in1", "in2"]), stage_key("gft", 2, "cfg", ["in1", "in2"]),
                stage_key("gft", 1, "cfg2", ["in1", "in2"]), stage_key("gft", 1, "cfg", ["in1", "inX"]),
                stage_key("gft", 1, "cfg", ["inX", "in2"]), stage_key("gft", 1, "cfg", ["in2", "in1"]),
                stage_key("gft", 1, "cfg", ["in1"]), stage_key("gft", 1, "cfg", [])]
    assert len({base, *variants}) == 1 + len(variants)


@pytest.mark.parametrize("stage", ["", "../x", "a/b", ".tmp", "-x"])
def test_stage_key_rejects_unsafe_stage_names(stage):
    with pytest.raises(ValueError, match="safe folder name"):
        stage_key(stage, 1, "cfg", [])


def test_stage_key_rejects_bad_digests():
    with pytest.raises(ValueError, match=r"input_digests\[1\]"):
        stage_key("gft", 1, "cfg", ["a", ""])
    with pytest.raises(TypeError, match="not one string"):
        stage_key("gft", 1, "cfg", "abc")


def test_git_commit_is_best_effort(monkeypatch, tmp_path):
    commit = artifacts.git_commit()
    assert commit is None or len(commit) == 40
    artifacts.git_commit.cache_clear()
    monkeypatch.setattr(pipeline, "__file__", str(tmp_path / "pipeline" / "__init__.py"))  # not in a repo
    try:
        assert artifacts.git_commit() is None
    finally:
        artifacts.git_commit.cache_clear()


# ---------------------------------------------------------------------------------------------------------
# Writing and serving
# ---------------------------------------------------------------------------------------------------------


def test_write_then_lookup_serves_the_same_ref(store):
    inp = ArtifactRef(kind="prompts", uri="/data/p.parquet", sha256=D, schema_version=1)
    key = stage_key("sft", 3, "cfg", [inp.sha256])
    assert store.lookup("sft", key) is None
    with store.write("sft", key, kind="checkpoint", version=3, config={"lr": 1e-6}, inputs=[inp]) as out:
        (out.path / "model.bin").write_bytes(b"weights")
        (out.path / "tok").mkdir()
        (out.path / "tok" / "vocab.json").write_text("{}")
        out.metrics.update(loss=0.25, grad_norm=float("nan"))
    ref = out.ref
    assert ref.uri == str(store.root / "sft" / key) and ref.kind == "checkpoint" and ref.schema_version == 1
    assert ref.sha256 == tree_sha256(ref.uri)
    assert store.lookup("sft", key) == ref
    assert ArtifactRef.model_validate_json(ref.model_dump_json()) == ref
    m = store.manifest(ref)
    assert Manifest.model_validate_json(m.model_dump_json()).files == m.files
    assert (m.stage, m.key, m.version, m.config, m.inputs) == ("sft", key, 3, {"lr": 1e-6}, {"input0": inp})
    assert m.datasets == {}
    assert set(m.files) == {"model.bin", "tok/vocab.json"} and m.output == ref
    assert m.metrics["loss"] == 0.25 and math.isnan(m.metrics["grad_norm"])
    assert m.package_version == pipeline.__version__ and m.wall_time_s >= 0 and m.created_at.tzinfo
    assert leftovers(store, "sft") == []


def test_inputs_by_role_and_declared_datasets_are_recorded(store):
    prompts = ArtifactRef(kind="prompts", uri="/p", sha256=D, schema_version=1)
    prev = ArtifactRef(kind="model", uri="/m", sha256="1" * 64, schema_version=1)
    with store.write("gft_round", "k", kind="model", version=1, config={}, inputs={"prompts": prompts, "prev": prev},
                     datasets={"groups.parquet": "training"}) as out:
        (out.path / "groups.parquet").write_bytes(b"g")
    m = store.manifest(out.ref)
    assert m.inputs == {"prompts": prompts, "prev": prev} and list(m.inputs) == ["prompts", "prev"]
    assert m.datasets == {"groups.parquet": "training"}
    assert Manifest.model_validate_json(m.model_dump_json()) == m


def test_a_declared_dataset_that_was_not_written_fails_the_write(store):
    with pytest.raises(ArtifactError, match=r"declared dataset files \['groups.parquet'\]"):
        with store.write("gft_round", "k", kind="model", version=1, config={}, inputs={},
                         datasets={"groups.parquet": "training"}) as out:
            (out.path / "other.bin").write_bytes(b"x")
    assert store.lookup("gft_round", "k") is None and leftovers(store, "gft_round") == []


def test_an_old_manifest_with_a_list_of_inputs_still_loads(store):
    """Run roots written before inputs had roles: the list reads as input0, input1, ... and the output is served."""
    inp = ArtifactRef(kind="prompts", uri="/p", sha256=D, schema_version=1)
    ref = write_output(store, "evaluate", "k", {"metrics.json": b"{}"}, inputs={"prompts": inp, "model": inp})
    path = Path(ref.uri) / "manifest.json"
    data = json.loads(path.read_text())
    data["inputs"] = list(data["inputs"].values())
    del data["datasets"], data["digest"]  # datasets did not exist then
    data["digest"] = manifest_digest(Manifest.model_validate(data))
    path.write_text(json.dumps(data))
    assert store.lookup("evaluate", "k") == ref
    m = store.manifest(ref)
    assert m.inputs == {"input0": inp, "input1": inp} and m.datasets == {}


@pytest.mark.parametrize("edit", ["metrics", "inputs", "nothing"])
def test_a_manifest_without_its_digest_is_not_served(store, edit):
    """Issue 26 item 6: deleting the digest field must not make an edited manifest verify (it did: a missing digest
    skipped the check, so edited metrics reached MLflow)."""
    inp = ArtifactRef(kind="prompts", uri="/p", sha256=D, schema_version=1)
    with store.write("evaluate", "k", kind="eval", version=1, config={}, inputs={"prompts": inp}) as out:
        (out.path / "metrics.json").write_bytes(b"{}")
        out.metrics["acc"] = 0.1
    ref = out.ref
    path = Path(ref.uri) / "manifest.json"
    data = json.loads(path.read_text())
    del data["digest"]
    if edit == "metrics":
        data["metrics"]["acc"] = 0.99
    elif edit == "inputs":
        data["inputs"]["prompts"]["sha256"] = "1" * 64
    path.write_text(json.dumps(data))
    assert store.lookup("evaluate", "k") is None
    with pytest.raises(ArtifactError, match="no digest"):
        store.manifest(ref)


def test_settings_model_is_stored_resolved(store):
    from pipeline.config import DataConfig

    with store.write("data", "k", kind="prompts", version=1, config=DataConfig(seed=3), inputs=[]) as out:
        (out.path / "f").write_text("x")
    assert store.manifest(out.ref).config == DataConfig(seed=3).model_dump(mode="json")


def test_unserializable_config_fails_before_the_stage_runs(store):
    ran = []
    with pytest.raises(TypeError, match="not JSON-serializable"):
        with store.write("data", "k", kind="x", version=1, config={"f": object()}, inputs=[]):
            ran.append(1)
    assert ran == [] and store.lookup("data", "k") is None


def test_exception_in_the_stage_leaves_nothing(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.write("sft", "k1", kind="x", version=1, config={}, inputs=[]) as out:
            (out.path / "half.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not (store.root / "sft" / "k1").exists()
    assert leftovers(store, "sft") == []
    assert store.lookup("sft", "k1") is None


@pytest.mark.parametrize("damage", ["flip_byte", "delete_file", "extra_file", "delete_manifest", "bad_manifest",
                                    "edit_manifest_digest"])
def test_altered_output_is_not_served_and_others_are(store, damage, caplog):
    ref = write_output(store, "gft", "k1", {"a.bin": b"abcdef", "sub/b.txt": b"hello"})
    other = write_output(store, "sft", "k2", {"a.bin": b"abcdef"})
    folder = Path(ref.uri)
    if damage == "flip_byte":
        data = bytearray((folder / "a.bin").read_bytes())
        data[3] ^= 1
        (folder / "a.bin").write_bytes(bytes(data))
    elif damage == "delete_file":
        (folder / "sub" / "b.txt").unlink()
    elif damage == "extra_file":
        (folder / "stray.txt").write_text("?")
    elif damage == "delete_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        text = (folder / "manifest.json").read_text().replace(ref.sha256, "f" * 64)
        (folder / "manifest.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="pipeline.store.artifacts"):
        assert store.lookup("gft", "k1") is None
    assert "cache miss gft/k1" in caplog.text
    assert store.lookup("sft", "k2") == other


def test_a_key_never_computed_is_no_news_in_the_log(store, caplog):
    """Issue 26 item 7: every stage computation logged "cache miss" three times (the flow and the runtime each look a
    key up); an output that was never written is logged at debug level only, a damaged one still warns."""
    with caplog.at_level(logging.INFO, logger="pipeline.store.artifacts"):
        assert [store.lookup("gft", "k1") for _ in range(3)] == [None] * 3
    assert caplog.records == []


@pytest.mark.parametrize("link", ["file", "folder"])
def test_a_symlink_to_a_matching_copy_outside_the_store_is_not_served(store, tmp_path, link, caplog):
    """Same bytes, wrong place: a file, or the whole stage folder, replaced by a link to an identical copy outside
    the root is refused (the store serves only what lives in it)."""
    import shutil

    ref = write_output(store, "gft", "k1", {"a.bin": b"abcdef", "sub/b.txt": b"hello"})
    folder, outside = Path(ref.uri), tmp_path / "elsewhere"
    shutil.copytree(folder, outside)
    if link == "file":
        (folder / "a.bin").unlink()
        (folder / "a.bin").symlink_to(outside / "a.bin")
    else:
        shutil.rmtree(folder)
        folder.symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.store.artifacts"):
        assert store.lookup("gft", "k1") is None
    assert "symlink" in caplog.text or "outside the store" in caplog.text


def test_rewrite_replaces_an_invalid_output(store):
    ref = write_output(store, "gft", "k1", {"a.bin": b"old"})
    (Path(ref.uri) / "a.bin").write_bytes(b"tampered")
    assert store.lookup("gft", "k1") is None
    new = write_output(store, "gft", "k1", {"a.bin": b"new"})
    assert store.lookup("gft", "k1") == new and new.sha256 != ref.sha256
    assert (Path(new.uri) / "a.bin").read_bytes() == b"new"
    assert leftovers(store, "gft") == []


def test_a_valid_output_written_meanwhile_is_kept(store):
    with store.write("gft", "k1", kind="x", version=1, config={}, inputs=[]) as slow:
        (slow.path / "a.bin").write_bytes(b"slow")
        fast = write_output(store, "gft", "k1", {"a.bin": b"fast"})
    assert slow.ref == fast == store.lookup("gft", "k1")
    assert leftovers(store, "gft") == []


def test_store_can_move(store, tmp_path):
    ref = write_output(store, "gft", "k1", {"a.bin": b"x"})
    shutil.move(store.root, tmp_path / "moved")
    moved = StageStore(tmp_path / "moved").lookup("gft", "k1")
    assert moved is not None and moved.sha256 == ref.sha256 and moved.uri == str(tmp_path / "moved" / "gft" / "k1")


def test_manifest_of_a_ref_that_does_not_match(store):
    ref = write_output(store, "gft", "k1", {"a.bin": b"x"})
    with pytest.raises(ArtifactError, match="describes content"):
        store.manifest(ref.model_copy(update={"sha256": "f" * 64}))
    with pytest.raises(ArtifactError, match="no manifest"):
        store.manifest(ref.model_copy(update={"uri": str(store.root / "nowhere")}))


def test_keys_and_stages_must_be_folder_names(store):
    for stage, key in (("gft", "../escape"), ("gft", ".tmp-x"), ("a/b", "k")):
        with pytest.raises(ValueError, match="safe folder name"):
            store.lookup(stage, key)


# ---------------------------------------------------------------------------------------------------------
# Killed writers and stale temp folders
# ---------------------------------------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pipeline.store.artifacts import StageStore
    with StageStore(sys.argv[1]).write("gft", "k1", kind="x", version=1, config={}, inputs=[]) as out:
        (out.path / "part.bin").write_bytes(b"half written")
        print("ready", flush=True)
        time.sleep(120)
""")


def test_killed_writer_is_never_served_and_cleaned_by_the_next_write(store):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(store.root)], stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len([p for p in leftovers(store, "gft") if not p.endswith(".lock")]) == 1  # its live temp folder
        assert store.clean_stale("gft") == []  # alive: its lock is held, nothing is removed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert not (store.root / "gft" / "k1").exists()
    assert store.lookup("gft", "k1") is None
    ref = write_output(store, "gft", "k1", {"a.bin": b"done"})
    assert store.lookup("gft", "k1") == ref
    assert leftovers(store, "gft") == []


def test_a_live_writer_of_the_same_stage_is_left_alone(store):
    with store.write("gft", "k1", kind="x", version=1, config={}, inputs=[]) as first:
        (first.path / "a.bin").write_bytes(b"first")
        second = write_output(store, "gft", "k2", {"a.bin": b"second"})  # cleans stale temps of "gft"
        assert first.path.is_dir() and (first.path / "a.bin").exists()
    assert store.lookup("gft", "k1") == first.ref and store.lookup("gft", "k2") == second


def test_stale_folders_without_locks_are_removed(store):
    stale = store.root / "gft" / ".tmp-k1-deadbeef"
    (stale / "sub").mkdir(parents=True)
    (store.root / "gft" / ".tmp-k0-cafe.old").mkdir()
    (store.root / "gft" / ".tmp-k9-feed.lock").touch()
    assert len(store.clean_stale("gft")) == 2
    assert leftovers(store, "gft") == []


def test_writer_retries_when_a_cleaner_unlinks_its_fresh_lock(store, monkeypatch):
    real, tried = locks.try_lock, []

    def racy(path):
        lock = real(path)
        if not tried:
            path.unlink()  # a cleaner took the new lock file and removed it between our open and our flock
        tried.append(path)
        return lock

    monkeypatch.setattr(locks, "try_lock", racy)
    ref = write_output(store, "gft", "k1", {"a.bin": b"x"})
    assert len(tried) == 2 and tried[0] != tried[1]
    assert store.lookup("gft", "k1") == ref and leftovers(store, "gft") == []


def test_concurrent_writers_of_one_stage(store):
    from concurrent.futures import ThreadPoolExecutor

    def job(i: int) -> ArtifactRef:
        return write_output(store, "eval", f"k{i % 6}", {"a.bin": str(i % 6).encode() * 1000})

    with ThreadPoolExecutor(8) as pool:
        refs = list(pool.map(job, range(48)))
    for i, ref in enumerate(refs):
        assert store.lookup("eval", f"k{i % 6}") == ref
    assert leftovers(store, "eval") == []


def test_a_write_that_fails_on_a_full_disk_says_the_disk_is_full(store, monkeypatch):
    """torch's writer says "unexpected pos" when the disk fills up; the store says what happened, and leaves
    nothing behind."""
    import shutil

    real = shutil.disk_usage
    with pytest.raises(OSError, match=r"no space left on the device of .*unexpected pos") as info:
        with store.write("sft", "k1", kind="x", version=1, config={}, inputs=[]) as out:
            (out.path / "part.bin").write_bytes(b"x")
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))  # the disk fills up
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed, unexpected pos")
    assert info.value.errno == 28
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert leftovers(store, "sft") == [] and store.lookup("sft", "k1") is None
    with pytest.raises(RuntimeError, match="boom"):  # with room on the disk, the writer's own error stands
        with store.write("sft", "k2", kind="x", version=1, config={}, inputs=[]):
            raise RuntimeError("boom")
