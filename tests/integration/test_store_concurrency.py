"""The store's compute lock (`StageStore.computing`, used by `pipeline.runtime.cached`): two processes that need the
same stage key at once: one computes, the other waits and is served its output; nothing is computed twice. The
same across workers of a Prefect work pool: tests/system/test_team_stack.py."""

import multiprocessing
import time
from pathlib import Path

import pytest

from pipeline import runtime, stages
from pipeline.config import DataConfig, SyntheticConfig
from pipeline.store.artifacts import StageStore

SYNTH = SyntheticConfig(n_train=8, n_eval=4, teacher_steps=2, base_steps=1, batch_size=4, warmup_steps=0)
DATA = DataConfig(synthetic_rows=12, eval_fraction=0.25)
pytestmark = pytest.mark.slow  # spawned interpreters: about 20 s


def _spec():
    return stages.bind("prepare_data", DATA, *stages.prepare_data_inputs(DATA, SYNTH)).spec


def _slow_build(log: Path):
    def build(out: Path, key: str) -> dict[str, float]:
        with log.open("a") as fh:
            fh.write(f"start {time.time()}\n")
        time.sleep(1.5)  # long enough for the other process to arrive while this one computes
        (out / "value.txt").write_text(key)
        for name in _spec().datasets:  # the files prepare_data declares
            (out / name).write_bytes(b"")
        return {"rows": 1.0}
    return build


def _worker(root: str, log: str, out: multiprocessing.Queue) -> None:
    res = runtime.Resources(StageStore(Path(root)), progress=False)
    try:
        ref = runtime.cached(res, _spec(), _slow_build(Path(log)))
        out.put((ref.sha256, dict(res.calls)))
    finally:
        res.close()


def test_two_processes_on_one_key_compute_it_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like two workers' flow runs
    results = ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "root"), str(log), results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = [results.get(timeout=5) for _ in procs]
    assert log.read_text().count("start") == 1  # one build; the other process waited and was served
    assert got[0][0] == got[1][0]
    assert sorted(sum(calls.values()) for _, calls in got) == [0, 1]
    key = _spec().key
    ref = StageStore(tmp_path / "root").lookup("prepare_data", key)
    assert ref is not None and (Path(ref.uri) / "value.txt").read_text() == key
    leftovers = sorted(p.name for p in (tmp_path / "root" / "prepare_data").iterdir() if p.name.startswith("."))
    assert leftovers == [f".compute-{key}.lock"]  # no temp folder left behind


def test_a_writer_waits_while_another_holds_the_key(tmp_path):
    """While one holder (here this process) has the key's lock, another process that misses waits: it builds only
    after the lock is released."""
    store = StageStore(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with store.computing("prepare_data", _spec().key):
        p = ctx.Process(target=_worker, args=(str(tmp_path), str(tmp_path / "log"), results))
        p.start()
        time.sleep(3.0)
        assert not (tmp_path / "log").exists()  # still waiting for our lock
    p.join(60)
    assert p.exitcode == 0 and (tmp_path / "log").read_text().count("start") == 1
    assert sum(results.get(timeout=5)[1].values()) == 1
