"""The store's trust boundary beyond file digests: manifest fields under a digest, store-relative references (a
copied or moved root reads its own files), and outputs pruned by a retention policy that still verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.store.artifacts import PRUNED, ArtifactError, ArtifactRef, StageStore, _record_mac
from pipeline.store.outputs import read_chain, read_output
from tests.unit.test_artifacts import write_output

D = "0" * 64


@pytest.fixture
def store(tmp_path) -> StageStore:
    return StageStore(tmp_path / "runs")


def _chain(store: StageStore, n: int = 3) -> list[ArtifactRef]:
    """n rounds of a chain stage, each naming the previous as `prev`, with a model/ and a state/ each."""
    refs, prev = [], ArtifactRef(kind="external_model", uri="/models/base", sha256=D, schema_version=1)
    for r in range(n):
        with store.write("gft_round", f"k{r}", kind="model", version=1, config={"r": r},
                         inputs={"prev": prev}) as out:
            for rel in ("history.jsonl", "model/w.bin", "state/optimizer.pt", "state/digests.json"):
                (out.path / rel).parent.mkdir(parents=True, exist_ok=True)
                (out.path / rel).write_bytes(f"{rel} of round {r}".encode())
            out.metrics["reward"] = r / 10
        refs.append(prev := out.ref)
    return refs


def _edit_manifest(ref: ArtifactRef, edit) -> None:
    path = ref.path / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------------
# Manifest fields under a digest
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit", [
    lambda m: m["metrics"].update(reward=0.9),                 # what plots and the report read
    lambda m: m["inputs"]["prev"].update(uri="gft_round/k0"),  # lineage: another input
    lambda m: m["config"].update(r=7),                          # the settings shown in MLflow
])
def test_an_edited_manifest_field_is_not_served_nor_read(store, edit):
    refs = _chain(store)
    _edit_manifest(refs[2], edit)
    assert store.lookup("gft_round", "k2") is None
    with pytest.raises(ArtifactError, match="digest"):
        read_output(refs[2])


def test_the_digest_covers_every_field_but_itself(store):
    ref = _chain(store, 1)[0]
    m = json.loads((ref.path / "manifest.json").read_text())
    assert m["digest"] and len(m["digest"]) == 64
    _edit_manifest(ref, lambda d: d.update(wall_time_s=d["wall_time_s"] + 1))
    assert store.lookup("gft_round", "k0") is None
    _edit_manifest(ref, lambda d: d.update(wall_time_s=d["wall_time_s"] - 1))  # back as it was
    assert store.lookup("gft_round", "k0") == ref


# ---------------------------------------------------------------------------------------------------------
# Store-relative references
# ---------------------------------------------------------------------------------------------------------


def test_manifests_name_inputs_of_the_same_store_relative_to_it(store):
    refs = _chain(store)
    on_disk = json.loads((refs[1].path / "manifest.json").read_text())
    assert on_disk["inputs"]["prev"]["uri"] == "gft_round/k0" and on_disk["output"]["uri"] == "gft_round/k1"
    first = json.loads((refs[0].path / "manifest.json").read_text())
    assert first["inputs"]["prev"]["uri"] == "/models/base"  # outside the store: as given
    assert read_output(refs[1]).inputs["prev"] == refs[0]  # read back absolute, where the root is


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_relocated_root_reads_its_own_chain(store, tmp_path, how):
    refs = _chain(store)
    new_root = tmp_path / "elsewhere"
    shutil.copytree(store.root, new_root)
    if how == "moved":
        shutil.rmtree(store.root)
    else:  # the old root stays, altered: nothing of it may be read through the new one
        (refs[0].path / "history.jsonl").write_bytes(b"altered")
    moved = StageStore(new_root).lookup("gft_round", "k2")
    chain = read_chain(moved, "gft_round")
    assert [o.path for o in chain.outputs] == [new_root / "gft_round" / f"k{r}" for r in range(3)]
    assert [o.ref.sha256 for o in chain.outputs] == [r.sha256 for r in refs]
    assert chain.round_metrics == [{"reward": 0.0}, {"reward": 0.1}, {"reward": 0.2}]


# ---------------------------------------------------------------------------------------------------------
# Pruned outputs
# ---------------------------------------------------------------------------------------------------------


def test_a_pruned_output_is_served_with_its_reference_and_says_what_is_gone(store):
    refs = _chain(store)
    freed = store.prune(refs[0], ["state/"])
    assert freed == len(b"state/optimizer.pt of round 0") + len(b"state/digests.json of round 0")
    assert not (refs[0].path / "state").exists() and (refs[0].path / "model" / "w.bin").is_file()
    assert store.lookup("gft_round", "k0") == refs[0]  # same reference: the keys downstream do not change
    assert store.pruned(refs[0]) == {"state/optimizer.pt", "state/digests.json"}
    assert store.pruned(refs[1]) == frozenset()
    assert store.prune(refs[0], ["state/"]) == 0  # nothing more to prune
    store.prune(refs[0], ["model/"])
    assert store.pruned(refs[0]) == {"state/optimizer.pt", "state/digests.json", "model/w.bin"}


def test_a_pruned_output_still_fails_on_any_other_damage(store):
    refs = _chain(store)
    store.prune(refs[0], ["state/"])
    (refs[0].path / "model" / "w.bin").write_bytes(b"flipped")
    assert store.lookup("gft_round", "k0") is None
    refs = _chain(StageStore(store.root.parent / "other"))
    other = StageStore(store.root.parent / "other")
    other.prune(refs[0], ["state/"])
    (refs[0].path / "history.jsonl").unlink()  # removed, but not by the policy
    assert other.lookup("gft_round", "k0") is None


def test_a_kill_while_pruning_leaves_an_output_that_verifies(store):
    refs = _chain(store)
    folder = refs[0].path
    store.prune(refs[1], ["state/"])  # (the record is sealed with the root's key, made by the first prune)
    record = {"output_sha256": refs[0].sha256, "files": ["state/digests.json", "state/optimizer.pt"]}
    record["mac"] = _record_mac(store.root, refs[0].sha256, record["files"], create=False)
    (folder / PRUNED).write_text(json.dumps(record))  # recorded first
    (folder / "state" / "digests.json").unlink()  # ... then killed before the second file went
    assert store.lookup("gft_round", "k0") == refs[0]
    (folder / "state" / "optimizer.pt").write_bytes(b"flipped")  # what is left is still verified
    assert store.lookup("gft_round", "k0") is None


def test_an_unreadable_prune_record_excuses_nothing(store):
    refs = _chain(store)
    store.prune(refs[0], ["state/"])
    (refs[0].path / PRUNED).write_text("[not json")
    assert store.lookup("gft_round", "k0") is None


def test_the_complete_output_replaces_a_pruned_one_when_recomputed(store):
    refs = _chain(store)
    store.prune(refs[0], ["state/", "model/"])
    again = _chain(store, 1)[0]  # the same key computed again: same bytes
    assert again == refs[0] and store.pruned(again) == frozenset()
    assert (again.path / "state" / "optimizer.pt").is_file()


def test_only_a_verified_output_is_pruned(store):
    refs = _chain(store)
    (refs[1].path / "history.jsonl").write_bytes(b"flipped")
    with pytest.raises(ArtifactError):
        store.prune(refs[1], ["state/"])
    assert (refs[1].path / "state" / "optimizer.pt").is_file()


# ---------------------------------------------------------------------------------------------------------
# Tampering with the prune record (issue 26 item 6)
# ---------------------------------------------------------------------------------------------------------


def _sft(store: StageStore) -> ArtifactRef:
    """An SFT output (retention never prunes one) with a model/."""
    with store.write("sft", "s", kind="model", version=1, config={}, inputs={}) as out:
        for rel in ("history.jsonl", "model/w.bin", "model/config.json"):
            (out.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (out.path / rel).write_bytes(rel.encode())
    return out.ref


@pytest.mark.parametrize("record", ["list", "named"])
def test_a_planted_prune_record_does_not_excuse_a_deleted_model_of_sft(store, record):
    """The issue's attack: an SFT output's model/ deleted and a pruned.json naming it planted, in the old list form
    or the current one with the right digest. It was served, and the next stage failed in transformers."""
    ref = _sft(store)
    shutil.rmtree(ref.path / "model")
    files = ["model/config.json", "model/w.bin"]
    body = files if record == "list" else {"output_sha256": ref.sha256, "files": files}
    (ref.path / PRUNED).write_text(json.dumps(body))
    assert store.lookup("sft", "s") is None
    assert store.pruned(ref) == set(files)
    with pytest.raises(ArtifactError, match="retention prunes only"):
        store.prune(_sft(StageStore(store.root.parent / "o")), ["model/"])


@pytest.mark.parametrize("how", ["list", "other_digest", "outside_prunable", "unsealed", "copied_record"])
def test_a_round_missing_files_its_record_does_not_legitimately_name_is_recomputed(store, how):
    """The last round of a chain (never pruned) with its model/ deleted and a record planted: in the list form, naming
    other content, outside the prunable folders, in the right form but not sealed with the root's key, or copied
    from a round that was pruned."""
    refs = _chain(store)
    store.prune(refs[1], ["model/"])  # the root has a retention key
    folder = refs[0].path
    if how in ("unsealed", "copied_record"):
        shutil.rmtree(folder / "model")
        body = {"output_sha256": refs[0].sha256, "files": ["model/w.bin"]}
        if how == "copied_record":
            body["mac"] = json.loads((refs[1].path / PRUNED).read_text())["mac"]
    elif how == "outside_prunable":
        (folder / "history.jsonl").unlink()
        body = {"output_sha256": refs[0].sha256, "files": ["history.jsonl"]}
    else:
        shutil.rmtree(folder / "model")
        body = {"output_sha256": refs[1].sha256, "files": ["model/w.bin"]} if how == "other_digest" else ["model/w.bin"]
    (folder / PRUNED).write_text(json.dumps(body))
    assert store.lookup("gft_round", "k0") is None
    assert store.lookup("gft_round", "k1") == refs[1]  # the round the store itself pruned is still served


def test_a_stage_never_computes_from_an_input_that_lost_files(store):
    """A pruned round is served as the chain's history, but a stage that would read it as a model refuses it before
    it runs, naming the role, so the run recomputes it first instead of failing inside the loader."""
    refs = _chain(store)
    store.prune(refs[0], ["model/"])
    assert store.lookup("gft_round", "k0") == refs[0]
    with pytest.raises(ArtifactError, match="input 'prev'.*model/w.bin"):
        with store.write("evaluate", "e", kind="eval", version=1, config={}, inputs={"model": refs[1], "prev": refs[0]}):
            pytest.fail("the body ran")
    with store.write("evaluate", "e", kind="eval", version=1, config={}, inputs={"model": refs[1]}) as out:
        (out.path / "metrics.json").write_text("{}")
    assert store.lookup("evaluate", "e") == out.ref
