"""The retention policy through the run: earlier rounds lose their state/ (and model/ unless kept), a cached rerun
serves the pruned chain without work, and a round that must be recomputed from a pruned one first recomputes that
one, to the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import report, run, runtime
from pipeline.config import apply_overrides, load_run_config
from pipeline.store.artifacts import PRUNED, StageStore

TINY = Path(__file__).parents[1] / "data" / "tiny_run.toml"
pytestmark = pytest.mark.slow


def _execute(root: Path, **overrides):
    cfg = apply_overrides(load_run_config(TINY), {"chain": ["gft"], "gft.rounds": 3, "eval.max_prompts": 2,
                                                 "tracking.enabled": False, **overrides})
    res = runtime.Resources(StageStore(root), progress=False)
    try:
        refs = run.execute(cfg, run.local_ops(res), res)
    finally:
        res.close()
    return refs, dict(res.calls), [o.ref for o in report.chain_outputs(refs, "gft").outputs]


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    refs, calls, rounds = _execute(root)
    manifests = {r.sha256: json.loads((r.path / "manifest.json").read_text())["files"] for r in rounds}
    return root, refs, calls, rounds, manifests


def _files(ref) -> set[str]:
    return {p.relative_to(ref.path).as_posix() for p in ref.path.rglob("*") if p.is_file()}


def test_earlier_rounds_keep_their_model_and_lose_their_state(pruned_run):
    _, _, calls, rounds, manifests = pruned_run
    assert calls["gft_round"] == 3
    for ref in rounds[:-1]:
        listed = set(manifests[ref.sha256])
        assert not any(f.startswith("state/") for f in _files(ref)) and (ref.path / PRUNED).is_file()
        assert _files(ref) - {"manifest.json", PRUNED} == {f for f in listed if not f.startswith("state/")}
    assert _files(rounds[-1]) - {"manifest.json"} == set(manifests[rounds[-1].sha256])  # the last: complete


def test_a_cached_rerun_serves_the_pruned_chain_without_work(pruned_run):
    root, refs, *_ = pruned_run
    again, calls, _ = _execute(root)
    assert calls == {} and again == refs


def test_a_lost_last_round_recomputes_the_pruned_chain_to_the_same_bytes(pruned_run):
    root, refs, _, rounds, _ = pruned_run
    (rounds[-1].path / "groups.parquet").unlink()  # the newest round is damaged; rounds 0 and 1 have no state
    again, calls, chain = _execute(root)
    assert calls["gft_round"] == 3  # round 0 from the initial model, round 1 from it, then round 2
    assert chain == rounds and again["gft"] == refs["gft"]  # same keys, same bytes
    assert all(not any(f.startswith("state/") for f in _files(r)) for r in chain[:-1])  # pruned again
    assert (chain[-1].path / "state").is_dir()


def test_model_every_and_keeping_all_state(tmp_path):
    _, _, rounds = _execute(tmp_path, **{"retention.state": "all", "retention.model_every": 2})
    kept = [(any(f.startswith("model/") for f in _files(r)), any(f.startswith("state/") for f in _files(r)))
            for r in rounds]
    assert kept == [(False, True), (True, True), (True, True)]  # round 1 is an every-2nd round; the last stays
