"""MLflow runs of a pipeline run: the experiment, the parent run, one child run per stage computation, their params,
metrics and tags.

A child run names its parent with an explicit `mlflow.parentRunId` tag (MLflow's active run is thread-local, and
Prefect may run a task in another thread). Every run carries the tags of `context_tags()` (the flow sets it to the
Prefect flow-run and task-run ids). A child holds the stage's config as params and its per-step history as metrics
(step = optimizer step).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.store.artifacts import Manifest
from pipeline.tracking.base import sqlite_uri, ui_address

__all__ = ["Runs", "metric_name", "open_experiment", "experiment_addresses", "create_sqlite_store",
           "relocate_sqlite_store", "check_server", "LOCATION_COLUMNS"]

LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "source"),
                    ("model_versions", "storage_location"))
"""Where MLflow's SQL store keeps artifact locations (MLflow 3.x schema); `relocate_sqlite_store` rewrites them."""


def metric_name(key: str) -> str:
    """MLflow's spelling of a metric key: "mean@4" -> "mean_at_4" (MLflow rejects "@")."""
    return key.replace("@", "_at_")


def _process() -> dict[str, str]:
    """Tags naming the process that opens a run, so a later start can tell a killed run from a live one."""
    return {"pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"SFTConfig.train.lr": "0.001", ...} (MLflow params are flat strings of <= 6000 chars)."""
    if isinstance(obj, Mapping):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(obj)[:6000] if not isinstance(obj, str) else obj[:6000]}


def create_sqlite_store(db: Path, artifact_location: str | None = None) -> Path:
    """The MLflow SQLite database at `db`, created and migrated aside and renamed into place under a lock: two runs
    starting together on a fresh root both get it, and a kill during creation leaves no half-migrated `db` behind
    (only an aside file, removed by the next creator)."""
    import fcntl
    import secrets

    db = Path(db)
    if db.exists():
        return db
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if db.exists():
            return db
        for stale in db.parent.glob(f".{db.name}.new-*"):  # a killed creator's, since we hold the lock
            stale.unlink()
        aside = db.with_name(f".{db.name}.new-{secrets.token_hex(4)}")
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(sqlite_uri(aside), artifact_location or (db.parent / "mlartifacts").as_uri())
        store.engine.dispose()
        os.replace(aside, db)
    return db


def relocate_sqlite_store(db: Path, artifact_location: str | None = None) -> list[str]:
    """Re-point a copied or moved root's MLflow database at the root's own artifact folder: every stored artifact
    location under an artifact root of the root's old place is rewritten under `artifact_location` (default:
    `mlartifacts` beside `db`), so the root writes, and reads its runs' artifacts, only inside itself. MLflow has no
    API for it (its `db move-resources` rewrites SQL the same way). Only a database that sits beside its artifact
    folder (a run root's) is re-pointed, never one shared by several roots. Returns the old artifact roots."""
    import fcntl
    import sqlite3
    from urllib.parse import unquote, urlparse

    new = (artifact_location or Path(db).parent.joinpath("mlartifacts").as_uri()).rstrip("/")
    if not new.startswith("file:") or Path(unquote(urlparse(new).path)).parent != Path(db).resolve().parent:
        return []
    with open(Path(db).with_name(f".{Path(db).name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one relocator at a time; the second finds nothing left to move
        with sqlite3.connect(db, timeout=60) as con:
            old = _old_artifact_roots(con, new)
            for prefix in old:
                for table, column in LOCATION_COLUMNS:
                    con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 (fixed names)
                                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                (new, len(prefix) + 1, prefix, len(prefix) + 1, prefix + "/"))
    return old


def _old_artifact_roots(con: Any, new: str) -> list[str]:
    """The file: artifact roots of the database other than `new`: the one it was created with (the parent of the
    Default experiment's location) and every experiment location named like `new`'s folder (`.../mlartifacts`,
    where a run puts its experiment's artifacts)."""
    rows = [r[0].rstrip("/") for r in con.execute("SELECT artifact_location FROM experiments") if r[0]]
    default = con.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()
    found = {default[0].rstrip("/").rsplit("/", 1)[0]} if default and default[0] else set()
    found |= {loc for loc in rows if loc.rsplit("/", 1)[-1] == new.rsplit("/", 1)[-1]}
    return sorted(loc for loc in found if loc.startswith("file:") and loc != new and not loc.startswith(new + "/"))


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, when a tracking server does not answer its health check (MLflow's own
    client would retry for minutes before saying anything)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            response.read(64)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        raise ConnectionError(f"the MLflow tracking server at {uri} does not answer ({exc}): start it, fix "
                              "tracking.uri, or set tracking.enabled = false") from None


def open_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name` on the client's server, created (with `artifact_location`) if missing."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name,
                                                                             artifact_location=artifact_location)


def experiment_addresses(uri: str, ui_url: str) -> list[tuple[str, str]]:
    """(name, UI address) of every experiment on a tracking server that has runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [(e.name, ui_address(ui_url, e.experiment_id)) for e in client.search_experiments()
            if len(client.search_runs([e.experiment_id], max_results=1))]


@dataclass
class Runs:
    """The parent run of one pipeline run and its child runs, in one experiment."""

    client: Any
    experiment_id: str
    context_tags: Callable[[], dict[str, str]] = dict
    parent_run_id: str | None = None

    def start_parent(self, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Open the parent run, with the config as params and as config.json; child runs attach to it explicitly.
        Runs left RUNNING by a killed process on this machine are marked KILLED first."""
        self.reap_orphans()
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"pipeline.stage": "pipeline", **tags, **self.context_tags(), **_process()})
        self.parent_run_id = run.info.run_id
        self.log_params(self.parent_run_id, config)
        self.client.log_dict(self.parent_run_id, dict(config), "config.json")
        return self.parent_run_id

    def end_parent(self, status: str) -> None:
        """Close the parent run, if one was opened."""
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status)

    def start_child(self, stage: str, key: str) -> str:
        """Open the child run of one stage computation under the parent (if any); returns its id."""
        tags = {"pipeline.stage": stage, "pipeline.key": key, **self.context_tags(), **_process()}
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return self.client.create_run(self.experiment_id, run_name=stage, tags=tags).info.run_id

    def reap_orphans(self) -> list[str]:
        """Mark KILLED every RUNNING run of the experiment that a process of this machine opened and that is gone
        (kill -9, OOM, a lost machine's reboot): MLflow would show it running forever. Returns their ids."""
        running = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
        dead = [r.info.run_id for r in running if r.data.tags.get("pipeline.host") == socket.gethostname()
                and not _alive(int(r.data.tags.get("pipeline.pid", "0")))]
        for run_id in dead:
            self.client.set_terminated(run_id, "KILLED")
        return dead

    def end(self, run_id: str, status: str) -> None:
        """Close a run with `status`."""
        self.client.set_terminated(run_id, status)

    def log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        """A nested config as flat params, in batches the REST API accepts."""
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 90):
            self.client.log_batch(run_id, params=params[i:i + 90])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0, run_id: str | None = None) -> None:
        """The numeric entries of `metrics` on a run (the parent by default) at `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(batch), 900):  # the REST API takes at most 1000 metrics per call
            self.client.log_batch(run_id or self.parent_run_id, metrics=batch[i:i + 900])

    def log_stage_metrics(self, run_id: str, history: Sequence[Mapping[str, float]],
                          metrics: Mapping[str, float]) -> None:
        """Each history row as train/<key> at its optimizer step, then the stage metrics not logged per step."""
        stepped: set[str] = set()
        for row in history:
            per_step = {f"train/{k}": v for k, v in row.items() if k != "step"}
            self.log_metrics(per_step, step=int(row["step"]), run_id=run_id)
            stepped.update(per_step)
        self.log_metrics({k: v for k, v in metrics.items() if k not in stepped}, run_id=run_id)

    def log_manifest(self, run_id: str, manifest: Manifest) -> None:
        """The output's manifest as the run's manifest.json."""
        self.client.log_text(run_id, manifest.model_dump_json(indent=2), "manifest.json")

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """A file (plot, table, summary) attached to the parent run."""
        self.client.log_artifact(self.parent_run_id, str(path), folder)

    def tag_parent(self, key: str, value: str) -> None:
        """One tag on the parent run."""
        self.client.set_tag(self.parent_run_id, key, value)
