"""Headless Chromium for UI tests (a helper module, not a test file): find Debian's `chromium`, render a page.

    from tests.browser import find_chromium, mlflow_urls, render, visible_text
    urls = mlflow_urls("http://127.0.0.1:5000", experiment_id, parent_run_id)
    text = visible_text(render(urls["runs"], out / "mlflow-runs.png"))
    assert "stage-sft" in text and "groups-round-0 (abc123)" in text

Install the browser with `apt-get install -y chromium` (Debian 12: about 30 s, about 480 MB with its libraries).
MLflow 3.17 UI pages that work (checked against a SQLite-backed `mlflow server`, see `mlflow_urls`):

- runs list, flat: `#/experiments/<id>/runs?orderByKey=tags.%60mlflow.runName%60&orderByAsc=true` shows the parent
  and every child run by name, each with its dataset inputs as "<name> (<digest>)". Sorted by start time (the
  default) the children are folded under a collapsed parent and are not in the DOM.
- a run: `#/experiments/<id>/runs/<run_id>` shows "Child runs <a> , <b>" on a parent and "Datasets <name>
  (<digest>) <context>" on any run.
- `#/experiments/<id>` alone opens the GenAI "Overview" (traces) tab, with no runs in it.

`render` runs Chromium twice, once with `--dump-dom` (the DOM after scripts ran, printed to stdout) and once with
`--screenshot`, each in a fresh profile folder and its own process group, so a hung browser is killed whole on
timeout. `--virtual-time-budget` lets the page's timers and fetches settle before the dump (virtual time stands
still while a fetch is pending, so the budget is not a wall-clock sleep; see `MLFLOW_WAIT_MS`).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["CHROMIUM_ENV", "INSTALL_HINT", "MLFLOW_WAIT_MS", "BrowserError", "find_chromium", "render",
           "dump_dom", "mlflow_urls", "screenshot", "visible_text", "wait_http"]

CHROMIUM_ENV = "GFT_CHROMIUM"
"""Environment variable naming a Chromium binary to use instead of the one on PATH."""

INSTALL_HINT = "install Debian's chromium: apt-get install -y chromium"

MLFLOW_WAIT_MS = 5_000
"""Virtual-time budget for MLflow 3.17 UI pages. Virtual time does not advance while fetches are pending, so even
500 ms rendered every run; 5 s leaves margin. Each render takes about 4 s of wall time on 2 busy cores."""

_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium", "/usr/lib/chromium/chromium")

_BASE_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in a container: the setuid sandbox is unavailable
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
)


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or timed out."""


def find_chromium() -> str | None:
    """Path of a Chromium binary: $GFT_CHROMIUM, else `chromium` on PATH (Debian's), else None."""
    override = os.environ.get(CHROMIUM_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def mlflow_urls(base_url: str, experiment_id: str, run_id: str | None = None) -> dict[str, str]:
    """MLflow 3 UI addresses: `runs` (flat run table, all runs and their datasets) and, with a run id, `run`."""
    base = base_url.rstrip("/")
    urls = {"runs": f"{base}/#/experiments/{experiment_id}/runs?orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"}
    if run_id is not None:
        from pipeline.tracking import ui_address

        urls["run"] = ui_address(base, experiment_id, run_id)  # the address the pipeline prints
    return urls


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run Chromium in its own process group with a fresh profile; kill the whole group on timeout."""
    binary = find_chromium()
    if binary is None:
        raise BrowserError(f"no chromium found; {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="gft-chromium-") as profile:
        cmd = [binary, *_BASE_FLAGS, f"--user-data-dir={profile}", *args]
        env = {**os.environ, "HOME": profile}  # crash reports and caches stay in the temp profile
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            raise BrowserError(f"chromium timed out after {timeout_s:.0f} s: {' '.join(cmd)}\n{err[-2000:]}") from None
        finally:
            if proc.poll() is None:
                _kill_group(proc)
        _kill_group(proc)  # a leftover helper (zygote, crashpad) of this browser only: the group is its own
    if proc.returncode != 0:
        raise BrowserError(f"chromium exited {proc.returncode}: {' '.join(cmd)}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the browser's own process group (it was started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group already exited
    if proc.poll() is None:
        proc.wait(timeout=10)


def dump_dom(url: str, *, wait_ms: int = MLFLOW_WAIT_MS, timeout_s: float = 120.0,
             window: tuple[int, int] = (1600, 1000)) -> str:
    """The serialized DOM of `url` after `wait_ms` of virtual time (scripts ran, fetches answered)."""
    result = _run([f"--virtual-time-budget={wait_ms}", f"--window-size={window[0]},{window[1]}", "--dump-dom",
                   url], timeout_s)
    return result.stdout


def screenshot(url: str, path: str | Path, *, wait_ms: int = MLFLOW_WAIT_MS, timeout_s: float = 120.0,
               window: tuple[int, int] = (1600, 1000)) -> Path:
    """A PNG of `url` after `wait_ms` of virtual time, written to `path` (parent folders created)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    _run([f"--virtual-time-budget={wait_ms}", f"--window-size={window[0]},{window[1]}", f"--screenshot={path}",
          url], timeout_s)
    if not path.is_file() or path.stat().st_size == 0:
        raise BrowserError(f"chromium wrote no screenshot to {path}")
    return path


def render(url: str, screenshot_path: str | Path | None = None, *, wait_ms: int = MLFLOW_WAIT_MS,
           timeout_s: float = 120.0, window: tuple[int, int] = (1600, 1000)) -> str:
    """The rendered DOM of `url` (HTML text); with `screenshot_path`, also a PNG of the same page state."""
    dom = dump_dom(url, wait_ms=wait_ms, timeout_s=timeout_s, window=window)
    if screenshot_path is not None:
        screenshot(url, screenshot_path, wait_ms=wait_ms, timeout_s=timeout_s, window=window)
    return dom


_SCRIPT_STYLE = re.compile(r"<(script|style|noscript)\b.*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")


def visible_text(dom: str) -> str:
    """The page's text without tags, scripts and styles, whitespace collapsed (for `"stage-sft" in text`)."""
    text = _TAG.sub(" ", _SCRIPT_STYLE.sub(" ", dom))
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def wait_http(url: str, *, timeout_s: float = 180.0, interval_s: float = 0.5, expect: str | None = None,
              proc: subprocess.Popen | None = None) -> str:
    """Poll `url` until it answers 200 (and its body contains `expect`); returns the body. Fails early if
    `proc` (the server) exits."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrowserError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode("utf-8", "replace")
                if resp.status == 200 and (expect is None or expect in body):
                    return body
                last = f"HTTP {resp.status}: {body[:200]}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = exc
        time.sleep(interval_s)
    raise BrowserError(f"{url} did not answer within {timeout_s:.0f} s (last: {last})")
