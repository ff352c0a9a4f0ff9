"""The team stack on 127.0.0.1, started by the tests themselves (a helper module, not a test file): PostgreSQL from
Debian's packages in a throwaway cluster, a Prefect server and an MLflow tracking server on it, a process work pool
with workers. infra/README.md, "Run it on one machine", is the same recipe as shell commands.

    with TeamStack(tmp_dir) as stack:            # PostgreSQL, Prefect and MLflow servers (started together)
        stack.work_pool("gft-process")           # prefect work-pool create gft-process --type process
        stack.worker("gft-process", "worker-1")  # prefect worker start --pool gft-process --name worker-1
        stack.prefect(["deploy", ...])           # any prefect CLI command against the server
    # every process stopped by its process group (SIGTERM, then SIGKILL), the ports free again

Each process starts in its own session (`start_new_session=True`) and is stopped by its process-group id, never by
name; a worker's flow runs are its children, in its group. PostgreSQL refuses to run as root: as root the cluster
belongs to Debian's `postgres` user (else `nobody`). Logs go to `<base>/logs/<name>.log`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.browser import wait_http

__all__ = ["INSTALL_HINT", "StackError", "TeamStack", "find_pg_bin", "free_port", "group_members", "port_is_free"]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
INSTALL_HINT = "install Debian's PostgreSQL: `make postgres` (apt-get install -y postgresql)"
START_TIMEOUT_S = 300  # first starts run schema migrations (MLflow's take about a minute on 2 busy cores)

# Settings of every process of the stack: offline hubs, one torch thread, no telemetry, fast worker polling.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "true"}
SERVER_ENV = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # a new schedule's runs within seconds
              "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false"}
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
              "PREFECT_WORKER_HEARTBEAT_SECONDS": "10"}


class StackError(RuntimeError):
    """A server of the stack failed to start or a command against it failed; the message holds its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port again (as servers do, with SO_REUSEADDR: TIME_WAIT is fine)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def find_pg_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (Debian: /usr/lib/postgresql/<version>/bin), newest first."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def _pg_user() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL: None (this user) unless root, which PostgreSQL refuses: then `postgres`, else `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise StackError("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM  # PostgreSQL: SIGINT, its fast shutdown (SIGTERM waits for clients)


@dataclass
class TeamStack:
    """PostgreSQL + Prefect server + MLflow server under `base`, then work pools and workers on request."""

    base: Path
    pg_port: int = field(default_factory=free_port)
    prefect_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    procs: list[_Proc] = field(default_factory=list)

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def ports(self) -> list[int]:
        return [self.pg_port, self.prefect_port, self.mlflow_port]

    def pg_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.pg_port}/{database}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a client of the stack: the Prefect CLI, a worker, this test process."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # not another test
        # file's Prefect settings (test_flows.py turns logging to the API off for its whole process)
        return {**inherited, **BASE_ENV, "PREFECT_API_URL": self.prefect_api, "PREFECT_UI_URL": self.prefect_ui,
                "PREFECT_HOME": str(self.base / "home"), "MLFLOW_TRACKING_URI": self.mlflow_url, **extra}

    # -- start --------------------------------------------------------------------------------------------------

    def __enter__(self) -> TeamStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """PostgreSQL with databases `prefect` and `mlflow`, then both servers, started together, waited for."""
        (self.base / "logs").mkdir(parents=True, exist_ok=True)
        self._start_postgres()
        for db in ("prefect", "mlflow"):
            self._check([str(self._pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres",
                         db], f"createdb {db}")
        prefect = self._spawn("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                 "--port", str(self.prefect_port)],
                              {**self.env(), **SERVER_ENV, "PREFECT_UI_API_URL": self.prefect_api,
                               "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.pg_url("prefect", "postgresql+asyncpg")})
        mlflow = self._spawn("mlflow-server", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                               self.pg_url("mlflow", "postgresql+psycopg2"), "--artifacts-destination",
                                               str(self.base / "mlartifacts"), "--host", "127.0.0.1", "--port",
                                               str(self.mlflow_port), "--workers", "2"],
                             {**self.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self._wait(f"{self.prefect_api}/health", prefect)
        self._wait(f"{self.mlflow_url}/health", mlflow)

    def _start_postgres(self) -> None:
        """initdb a fresh cluster (trust auth, no fsync: it is thrown away) and run `postgres` on 127.0.0.1 only."""
        pg_bin = find_pg_bin()
        if pg_bin is None:
            raise StackError(f"PostgreSQL's server binaries are not installed; {INSTALL_HINT}")
        self._pg_bin, user = pg_bin, _pg_user()
        # the cluster lives outside pytest's 0700 temp folders, where the postgres user can reach it
        self._pg_dir = Path(tempfile.mkdtemp(prefix="gft-pg-"))
        data, sockets = self._pg_dir / "data", self._pg_dir / "sockets"
        sockets.mkdir()
        if user is not None:
            for path in (self._pg_dir, sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        init = subprocess.run([str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                               "--no-sync", "--locale=C"], capture_output=True, text=True, cwd=self._pg_dir,
                              **as_user)
        if init.returncode != 0:
            raise StackError(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        proc = self._spawn("postgres", [str(pg_bin / "postgres"), "-D", str(data), "-p", str(self.pg_port), "-h",
                                        "127.0.0.1", "-k", str(sockets), "-c", "fsync=off", "-c",
                                        "synchronous_commit=off", "-c", "full_page_writes=off", "-c",
                                        "max_connections=200"], dict(os.environ), cwd=self._pg_dir, **as_user)
        proc.stop_signal = signal.SIGINT
        deadline = time.monotonic() + 60
        while subprocess.run([str(pg_bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.pg_port)]).returncode:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"PostgreSQL did not start:\n{self.tail(proc)}")
            time.sleep(0.3)

    def work_pool(self, name: str) -> None:
        """`prefect work-pool create NAME --type process` (idempotent: --overwrite)."""
        self.prefect(["work-pool", "create", name, "--type", "process", "--overwrite"])

    def worker(self, pool: str, name: str, **env: str) -> _Proc:
        """`prefect worker start --pool POOL --name NAME --limit 1`: runs the pool's flow runs, one at a time, each
        as its own subprocess (a child of the worker, in its process group)."""
        proc = self._spawn(name, [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, "--type",
                                  "process", "--limit", "1"], self.env(**WORKER_ENV, **env), cwd=REPO)
        return proc

    def psql(self, database: str, sql: str) -> str:
        """Run one SQL statement on the stack's PostgreSQL; its rows, one a line."""
        return self._check([str(self._pg_bin / "psql"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres",
                            "-d", database, "-At", "-c", sql], f"psql {database}")

    def prefect(self, args: list[str], *, timeout_s: float = 300, cwd: Path = REPO) -> str:
        """Run the `prefect` CLI against the stack's server; returns its output, raises StackError on failure."""
        return self._check([str(BIN / "prefect"), "--no-prompt", *args], f"prefect {' '.join(args)}",
                           env=self.env(), timeout_s=timeout_s, cwd=cwd)

    def _check(self, cmd: list[str], what: str, *, env: dict | None = None, timeout_s: float = 120,
               cwd: Path | None = None) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=cwd)
        if proc.returncode != 0:
            raise StackError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout + proc.stderr

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None, **kw) -> _Proc:
        log = self.base / "logs" / f"{name}.log"
        with log.open("ab") as fh:
            popen = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=cwd, **kw)
        proc = _Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _wait(self, url: str, proc: _Proc) -> None:
        try:
            wait_http(url, timeout_s=START_TIMEOUT_S, proc=proc.popen)
        except Exception as exc:
            raise StackError(f"{proc.name}: {exc}\n{self.tail(proc)}") from exc

    @staticmethod
    def tail(proc: _Proc, chars: int = 4000) -> str:
        return proc.log.read_text(errors="replace")[-chars:] if proc.log.is_file() else "(no log)"

    # -- stop ---------------------------------------------------------------------------------------------------

    def stop_proc(self, proc: _Proc, timeout_s: float = 30) -> None:
        """SIGTERM the process's group, SIGKILL it if still running after `timeout_s`; then reap it."""
        if proc.popen.poll() is None or _group_alive(proc.popen.pid):
            _killpg(proc.popen.pid, proc.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout_s)
            _killpg(proc.popen.pid, signal.SIGKILL)  # what is left of the group: flow runs, uvicorn workers
        proc.popen.wait()
        deadline = time.monotonic() + 10
        while _group_alive(proc.popen.pid) and time.monotonic() < deadline:  # SIGKILL is asynchronous
            time.sleep(0.1)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop(self) -> None:
        """Workers first (their flow runs with them), then the servers, PostgreSQL last; its cluster removed."""
        for proc in reversed(list(self.procs)):
            self.stop_proc(proc)
        pg_dir = getattr(self, "_pg_dir", None)
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command) of the live processes of a process group (zombies, already dead, left out), from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append((int(stat.parent.name), text[text.index("(") + 1:text.rindex(")")]))
    return members
