"""`gft run` owns its Prefect API: a kill -9 of the run takes the server with it, and the rerun resumes; the
finished root made read-only is refused by name before anything starts. Before the API stops, Prefect's log and
event workers have sent what they hold: no run or experiment ends retrying a stopped API ("Error logging to API").
Two `gft run` of one config into two fresh roots write the same bytes (every stage output's digest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kill_trials import ENV, command, digests

TINY = Path(__file__).parents[1] / "data" / "tiny_run.toml"
pytestmark = pytest.mark.slow
API_ERRORS = ("Error logging to API", "All connection attempts failed")
PROBE = """import sys
from flows.cli import main
code = main(sys.argv[1:])
from prefect._internal.concurrency.services import QueueService
print("prefect services left:", sorted(type(s).__name__ for s in QueueService._instances.values()), flush=True)
sys.exit(code)
"""
"""`gft` in a process that, once the command has returned, prints the Prefect services still holding records."""


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (read from /proc, so nothing is found or killed by name)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _api_server(pid: int) -> int | None:
    for child in _children(pid):
        try:
            if b"prefect.server.api.server:create_app" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_run_takes_its_prefect_api_with_it_and_the_rerun_resumes(tmp_path, two_roots):
    """kill -9 of a `gft run` mid-stage: its API dies with it, and the rerun resumes to the bytes of an uninterrupted
    `gft run` (two_roots' root a): the kill trial through Prefect, not only in process."""
    gft = str(Path(sys.executable).parent / "gft")
    cmd = [gft, "run", str(TINY), "--root", str(tmp_path / "root"), "--no-progress"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        assert _wait(lambda: _api_server(run.pid) is not None, 180), "gft run started no Prefect API"
        server = _api_server(run.pid)
        assert _wait(lambda: (tmp_path / "root" / "bootstrap_models").is_dir(), 300), "no stage started"
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert _wait(lambda: not _alive(server), 60), f"the Prefect API (pid {server}) outlived the killed run"
    finally:
        if run.poll() is None:
            run.kill()
        if server and _alive(server):
            os.kill(server, signal.SIGKILL)  # by its pid, so the failure does not leak a server
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Work done this time" in again.stdout
    uninterrupted = digests(two_roots[0] / "a")
    assert digests(tmp_path / "root") == uninterrupted and len(uninterrupted) == 9

    # the finished root, read-only: refused by name before anything starts, and left as it was
    from tests.system.test_read_only_root import read_only, tree_digest

    root = tmp_path / "root"
    before = tree_digest(root)
    with read_only(root):
        refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and f"run root {root} is read-only" in refused.stderr, refused.stderr[-3000:]
    assert tree_digest(root) == before


@pytest.fixture(scope="module")
def two_roots(tmp_path_factory):
    """`gft run` of the tiny config into two fresh roots, one after the other, each with its own Prefect API."""
    base = tmp_path_factory.mktemp("two-roots")
    env = {**ENV, "PREFECT_HOME": str(base / "prefect")}
    runs = {name: subprocess.run(command(base / name, prefect=True), env=env, capture_output=True, text=True,
                                 timeout=900) for name in ("a", "b")}
    return base, env, runs


def _probe(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=900)


def _no_api_errors(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert not [e for e in API_ERRORS if e in out], out[-3000:]


def test_gft_run_and_experiment_exit_without_retrying_a_stopped_api(two_roots, tmp_path):
    """Fresh runs, the cached rerun and an experiment: each ends with its summary, no Prefect service left holding
    records for the stopped API, and no "Error logging to API" (which came 70-80 s after the summary)."""
    base, env, runs = two_roots
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
        _no_api_errors(proc)
    again = _probe(command(base / "a", prefect=True)[1:], env)
    assert again.returncode == 0 and "Work done this time" in again.stdout, again.stderr[-3000:]
    assert "prefect services left: []" in again.stdout, again.stdout[-2000:]
    _no_api_errors(again)
    exp = tmp_path / "exit.toml"
    exp.write_text(f'name = "exit"\nbase = "{TINY}"\n[variants.base]\nchain = []\n')
    ran = _probe(["experiment", str(exp), "--root", str(base / "a"), "--no-progress"], env)
    assert ran.returncode == 0 and "report and plots" in ran.stdout, ran.stderr[-3000:]
    assert "prefect services left: []" in ran.stdout, ran.stdout[-2000:]
    _no_api_errors(ran)


def test_a_failed_flow_run_says_what_to_fix_when_a_rerun_cannot(tmp_path):
    """A data error inside the Prefect flow: the exception is read from the flow run's state, and the advice is to
    fix the data (a rerun meets the same error), not to rerun."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"question": "{i} + 1 = ?", "answer": "{i + 1}"}}\n' for i in range(8)))
    config = tmp_path / "run.toml"
    config.write_text(TINY.read_text().replace('source = "synthetic"', f'source = "{data}"'))
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run(command(tmp_path / "root", prefect=True, config=config), env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1 and "The run failed" in proc.stderr, proc.stderr[-3000:]
    assert "A rerun will not fix this (DataError" in proc.stderr and "Rerun the same command" not in proc.stderr
    _no_api_errors(proc)


def test_two_gft_runs_on_fresh_roots_write_the_same_bytes(two_roots):
    """Same config, same keys, same bytes under Prefect too (issue 26 item 2): every stage output of root a has the
    digest of root b's."""
    base, _, runs = two_roots
    assert all(p.returncode == 0 for p in runs.values())
    a, b = digests(base / "a"), digests(base / "b")
    assert len(a) == 9 and set(a) == set(b), sorted(set(a) ^ set(b))  # data, models, teacher, sft, 2 rounds, 3 evals
    assert {k: a[k] for k in a if a[k] != b[k]} == {}
