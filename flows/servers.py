"""Local servers the CLI starts and stops: the UIs of `gft ui`, and the Prefect API a `gft run` owns.

Every server runs in its own process group and is stopped by that group's id, never by name. The Prefect API of a
run without PREFECT_API_URL is the same uvicorn app Prefect's ephemeral mode starts, with one difference: Prefect
stops its ephemeral server at interpreter exit (`atexit`), so a `kill -9` of the run left it running. Ours is
started with the kernel's parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`): however the run ends, the server
gets SIGTERM. Elsewhere (macOS) the run falls back to Prefect's own ephemeral mode.

Before the API stops, Prefect's background services that talk to it (the log worker, the events worker, the task
and flow run waiters) send what they still hold and stop (`drain_prefect`): stopped after the server, they retried
against it for over a minute before giving up with "Error logging to API", and the run only then exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["start", "wait_http", "stop", "run_api", "drain_prefect", "UI_PORT"]

UI_PORT = 4200
"""Where `gft ui --prefect` serves Prefect's UI: the flow-run links a run records point there."""
_PR_SET_PDEATHSIG = 1


def start(cmd: list[str], env: dict[str, str], log_path: Path, *, die_with_parent: bool = False) -> subprocess.Popen:
    """A server in its own process group, output to a log file; with `die_with_parent`, SIGTERM when we die."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    hook = functools.partial(_die_with_parent, os.getpid()) if die_with_parent else None
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=hook)


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: ask for SIGTERM when the parent dies; exit if it already has (the race before)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0 or os.getppid() != parent:
        os._exit(1)


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until `url` answers 200; fails naming the address when the server exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url}: no answer after {timeout_s:.0f} s")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each server's process group, SIGKILL what is left after 15 s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_api(log_dir: Path, timeout_s: float = 180, meanwhile: Callable[[], None] = lambda: None,
            ) -> Iterator[str | None]:
    """A Prefect API on 127.0.0.1 for the duration of the block, in Prefect's settings as PREFECT_API_URL (and the
    UI address `gft ui --prefect` serves); yields its URL, or None when an API is already set (PREFECT_API_URL, the
    Prefect profile's, a test harness's) or the platform has no parent-death signal (Prefect then uses its server,
    or its ephemeral one). The server starts before Prefect is imported (a second of its start, on 2 cores) and
    reads the same environment and profile; `meanwhile` runs while it starts (the caller's slow imports)."""
    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux"):
        meanwhile()
        yield None
        return
    port = _free_port()
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    proc = start(cmd, env, log_dir / "prefect-api.log", die_with_parent=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, get_current_settings, temporary_settings

        configured = get_current_settings().api.url is not None
        if configured:  # an API of the profile or a harness: ours is not needed
            stop([proc])
        meanwhile()
        if configured:
            yield None
            return
        wait_http(f"{url}/health", proc, timeout_s)
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: f"http://127.0.0.1:{UI_PORT}"}):
            try:
                yield url
            finally:
                drain_prefect()
    finally:
        stop([proc])


DRAIN_TIMEOUT_S = 30.0
"""How long the services may take to send what they hold while the API still answers (a second, typically)."""


def drain_prefect(timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Send what Prefect's queue services (the API log worker, the events worker) hold and stop them, and stop the
    task and flow run waiters' event subscriptions: everything that would talk to the API after it stops. A
    service used later starts afresh."""
    from prefect._internal.concurrency.services import QueueService
    from prefect._internal.waiters import FlowRunWaiter
    from prefect.task_runs import TaskRunWaiter

    QueueService.drain_all(timeout=timeout_s, at_exit=False)  # one registry: every subclass's instances
    for waiter in (TaskRunWaiter, FlowRunWaiter):
        instance = waiter._instance
        if instance is not None and instance._loop is not None:  # its task lives on Prefect's loop thread
            instance._loop.call_soon_threadsafe(instance.stop)
