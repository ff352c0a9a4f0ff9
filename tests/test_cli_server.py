"""`gft run` owns its Prefect API: a kill -9 of the run takes the server with it, and the rerun resumes; the
finished root made read-only is refused by name before anything starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = Path(__file__).parent / "data" / "tiny_run.toml"
pytestmark = pytest.mark.slow


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
def test_a_killed_run_takes_its_prefect_api_with_it_and_the_rerun_resumes(tmp_path):
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

    # the finished root, read-only: refused by name before anything starts, and left as it was
    from tests.test_read_only_root import read_only, tree_digest

    root = tmp_path / "root"
    before = tree_digest(root)
    with read_only(root):
        refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and f"run root {root} is read-only" in refused.stderr, refused.stderr[-3000:]
    assert tree_digest(root) == before
