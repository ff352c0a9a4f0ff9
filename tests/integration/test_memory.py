"""pipeline/memory/measure.py with the runtime and a launched job's reporting: a measured block sees what it
allocated (by the kernel's high-water mark, and by the sampling fallback where the reset is refused), nested blocks
keep their enclosing block's peak, a launched job's processes' peaks reach the stage's measurement, and every
computed stage's manifest and MLflow child run carry perf/peak_rss_gb.

These check the instrument (it sees a known allocation), never a figure of the pipeline: no memory threshold of a
stage is asserted here (bench/ measures those)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import runtime
from pipeline.config import DataConfig
from pipeline.memory import measure as measure_mod
from pipeline.memory.measure import Peak, measure, report_child
from pipeline.rounds import launch
from pipeline.rounds.job import TrainJob
from pipeline.store.artifacts import StageStore
from pipeline.store.cache import derive_spec
from pipeline.tracking import MlflowTracker, sqlite_uri

MB200 = 200 * 2**20


def _touch(n: int) -> bytearray:
    """n bytes, every page written (resident)."""
    buf = bytearray(n)
    buf[::4096] = b"\x01" * len(range(0, n, 4096))
    return buf


def _allocate_and_free(n: int = MB200) -> None:
    buf = _touch(n)
    del buf


@pytest.mark.parametrize("resettable", [True, False], ids=["hwm", "sampled"])
def test_a_block_sees_what_it_allocated_and_freed(monkeypatch, resettable):
    if not resettable:  # a /proc that refuses clear_refs: the sampling thread measures
        monkeypatch.setattr(measure_mod, "_reset_hwm", lambda: False)
        monkeypatch.setattr(measure_mod, "SAMPLE_S", 0.001)
    before = measure_mod.current_rss_gb()
    with measure() as peak:
        buf = _touch(MB200)
        if not resettable:
            import time
            time.sleep(0.05)  # the sampler's view of the spike
        del buf
    assert peak.method == ("hwm" if resettable else "sampled")
    assert peak.rss >= before + 0.9 * MB200 / 1e9  # the freed 200 MB counted at its peak
    assert set(peak.metrics()) >= {"perf/peak_rss_gb"} and "perf/peak_child_rss_gb" not in peak.metrics()


def test_a_nested_block_keeps_the_enclosing_blocks_peak():
    with measure() as outer:
        _allocate_and_free()
        with measure() as inner:  # resets the kernel's mark: the outer block must keep the 200 MB it saw
            pass
    assert outer.rss >= inner.rss + 0.9 * MB200 / 1e9


def test_a_fresh_block_does_not_carry_an_earlier_peak():
    _allocate_and_free()
    with measure() as peak:
        pass
    assert peak.rss < measure_mod.current_rss_gb() + 0.5 * MB200 / 1e9


def test_children_peaks_are_summed_and_devices_max_merged():
    with measure() as outer:
        report_child(Peak(rss=1.5, cuda_allocated={0: 2.0}, cuda_reserved={0: 3.0}))
        report_child(Peak(rss=0.5, cuda_allocated={0: 1.0, 1: 4.0}, cuda_reserved={1: 5.0}))
    assert outer.child_rss == 2.0
    m = outer.metrics()
    assert m["perf/peak_child_rss_gb"] == 2.0
    assert m["perf/peak_cuda_allocated_gb"] == 4.0 and m["perf/peak_cuda_allocated_gb/cuda0"] == 2.0
    assert m["perf/peak_cuda_reserved_gb/cuda1"] == 5.0


def test_a_launched_jobs_peak_files_reach_the_stages_measurement(tmp_path):
    """What each process of a launched job writes after `train` (`launch._write_peak`) is what the stage's side
    adds to its open measurement once the job exits (`launch._report_peaks`); another host's ranks are left out."""
    job = TrainJob(phase="sft", config={}, model="m", folder=str(tmp_path), out=str(tmp_path / "out"))
    launch._write_peak(job, 0, Peak(rss=1.25, cuda_allocated={0: 0.5}, cuda_reserved={0: 0.75}))
    launch._write_peak(job, 1, Peak(rss=1.0, cuda_allocated={1: 0.25}, cuda_reserved={1: 0.5}))
    (tmp_path / "peak-2.json").write_text(json.dumps({"host": "another-node", "rss": 9.0, "cuda_allocated": {},
                                                       "cuda_reserved": {}}))
    with measure() as peak:
        launch._report_peaks(tmp_path)
    assert peak.child_rss == 2.25
    assert peak.cuda_allocated == {0: 0.5, 1: 0.25} and peak.cuda_reserved == {0: 0.75, 1: 0.5}


def test_a_computed_stage_records_its_peak_in_its_manifest_and_mlflow_run(tmp_path):
    """`runtime.cached` measures the build: the manifest's metrics carry perf/peak_rss_gb (at least the 200 MB the
    build allocated), and the stage's MLflow child run carries the same value; a cached serve adds nothing."""
    tracker = MlflowTracker(sqlite_uri(tmp_path / "mlflow.db"), "t", artifact_location=(tmp_path / "mla").as_uri())
    tracker.start_pipeline("p", {}, {})
    res = runtime.Resources(StageStore(tmp_path / "runs"), progress=False, tracker=tracker)
    spec = derive_spec("prepare_data", "prompts", {"cfg": DataConfig(), "marker": "memory-test"})

    def build(out, key):
        (out / "x.txt").write_text("x")
        _allocate_and_free()
        return {"rows": 1.0}

    ref = runtime.cached(res, spec, build)
    manifest = res.store.manifest(ref)
    assert manifest.metrics["rows"] == 1.0
    assert manifest.metrics["perf/peak_rss_gb"] >= 0.9 * MB200 / 1e9
    c = tracker.client
    run = c.search_runs([tracker.experiment_id], "tags.`pipeline.stage` = 'prepare_data'")[0]
    assert run.data.metrics["perf/peak_rss_gb"] == pytest.approx(manifest.metrics["perf/peak_rss_gb"])
    tracker.end_pipeline("FINISHED")


# ---------------------------------------------------------------------------------------------------------
# The plan in a run: the dry run prints it, a budget it exceeds is refused before any work
# ---------------------------------------------------------------------------------------------------------

TINY = Path(__file__).parents[1] / "data" / "tiny_run.toml"


def _tiny(tmp_path, **memory) -> Path:
    """tiny_run.toml with a [memory] table, in its own folder (its root beside it)."""
    text = TINY.read_text() + "\n[memory]\n" + "".join(f"{k} = {v}\n" for k, v in memory.items())
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def test_the_dry_run_prints_each_calls_planned_peak(tmp_path, capsys):
    from flows.cli import main

    assert main(["run", str(TINY), "--root", str(tmp_path / "root"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("prepare_data ", "sft ", "evaluate "))]
    assert len(rows) == 1 + 1 + 3 and all(" cpu " in line and "(largest: " in line for line in rows), rows
    assert not (tmp_path / "root" / "sft").exists()


def test_a_run_over_its_memory_budget_is_refused_before_any_work_naming_the_stage(tmp_path, capsys):
    """The budget sits just under the plan's largest stage: the run fails before prepare_data computes, naming
    the first stage over it and its largest item; the dry run refuses the same. A budget above the plan passes."""
    from flows.cli import main
    from pipeline.config import load_run_config
    from pipeline.memory.plan import MemoryBudgetError
    from pipeline.run import check_memory, plan, run

    peaks = [p for c in plan(load_run_config(TINY), tmp_path / "probe") for p in c.memory]
    budget = round(max(p.total for p in peaks) - 0.005, 3)
    first = next(p for p in peaks if p.total > budget)
    path = _tiny(tmp_path, cpu_gb=budget)
    with pytest.raises(MemoryBudgetError) as err:
        run(load_run_config(path), root=tmp_path / "root", progress=False)
    assert f"stage {first.label} ({first.stage}, {first.phase})" in str(err.value)
    assert first.largest.name in str(err.value)
    assert not any((tmp_path / "root").glob("prepare_data/*/manifest.json"))  # nothing computed
    assert main(["run", str(path), "--root", str(tmp_path / "root"), "--dry-run"]) == 2
    assert f"stage {first.label}" in capsys.readouterr().err
    check_memory(load_run_config(_tiny(tmp_path, cpu_gb=budget + 0.01)), tmp_path / "root")  # fits: no error


def test_large_frees_go_back_to_the_system_once_the_threshold_is_fixed():
    """glibc keeps a freed 8 MiB block in the heap once its dynamic threshold has risen past it; with the threshold
    fixed at 1 MiB (what every run's Resources sets) the block is unmapped on free and the RSS falls back."""
    import subprocess
    import sys
    import textwrap

    probe = textwrap.dedent("""
        import ctypes, sys
        from pipeline.memory.measure import current_rss_gb, return_large_frees
        if sys.argv[1] == "fixed":
            assert return_large_frees()
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(libc.malloc(16 << 20))  # a large free raises glibc's dynamic threshold to 16 MiB
        blocks = [libc.malloc(8 << 20) for _ in range(32)]  # 256 MiB, from the heap unless the threshold is fixed
        for b in blocks:
            ctypes.memset(b, 1, 8 << 20)
        before = current_rss_gb()
        for b in blocks[:-1]:
            libc.free(b)  # the last block stays: the heap's top cannot shrink past it (holes, as a trainer leaves)
        print(before - current_rss_gb())
    """)
    freed = {how: float(subprocess.run([sys.executable, "-c", probe, how], capture_output=True, text=True,
                                       check=True).stdout) for how in ("default", "fixed")}
    assert freed["fixed"] > 0.2 and freed["default"] < 0.05, freed
