"""`gft`: the one command line: run, schedule and look at post-training runs, and join a launched job's nodes.

    gft run CONFIG [--refresh STAGE] [--root DIR] [--dry-run]   one pipeline run as a Prefect flow run
    gft run CONFIG --in-process                                 the same DAG in this process, without Prefect
    gft experiment EXPERIMENT [--only a,b] [--dry-run]          a grid of runs, summarised over seeds
    gft experiment EXPERIMENT --deployment post-train/NAME      ... each trial a deployment run, on the workers
    gft experiment EXPERIMENT --in-process                      ... every trial in this process, without Prefect
    gft serve CONFIG --cron "0 2 * * *"                         a scheduled deployment (needs a Prefect server)
    gft ui [CONFIG | --root DIR] [--prefect]                    MLflow UI (and Prefect's) on 127.0.0.1
    gft join JOB_JSON                                           another node's agent of one job of several nodes
    gft follow RUN_ROOT                                         another node: join every such job of a run

Without PREFECT_API_URL, `gft run` starts a Prefect API of its own for the run (the app of Prefect's ephemeral
mode, over ~/.prefect/prefect.db, which `gft ui --prefect` serves afterwards), stopped when the run ends however it
ends, after Prefect's log and event workers have sent what they hold (`flows/servers.py`).

A config or experiment file that does not load is one line on stderr (exit code 2). A failed run says whether a
rerun can fix it (an interrupted or crashed stage: the rerun resumes from the cache) or what to fix first (a
config or data error: a rerun would fail the same way).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flows import servers
from pipeline.config import RunConfig, load_run_config

__all__ = ["main", "ConfigError", "failure_advice"]

# On a 2-core machine the ephemeral Prefect API can take longer than Prefect's default 20 s to start.
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"}


class ConfigError(Exception):
    """A config or experiment file that does not load, or an option it does not allow: one line, exit code 2."""


def _load(config: Path, root: Path | None) -> tuple[RunConfig, Path]:
    from pipeline.run import resolve_root

    try:
        cfg = load_run_config(config)
    except (ValueError, OSError) as exc:  # pydantic's ValidationError and TOML's decode error are ValueErrors
        raise ConfigError(str(exc)) from None
    return cfg, resolve_root(config, cfg, root)


RERUN_CANNOT_FIX = (ValueError, TypeError, LookupError, FileNotFoundError, NotADirectoryError, ImportError)
"""Errors of the config, the data or the code a run is given (pydantic's ValidationError, a bad row, a prompt too
long for the engine, a missing file or reward module): a rerun meets them again. Anything else (a killed or
crashed stage, a failed launched job, a full disk, a lost server) a rerun can get past."""


def failure_advice(error: BaseException | None) -> str:
    """What to do after a failed run: fix the config or data first when a rerun cannot fix the error, else rerun."""
    if isinstance(error, RERUN_CANNOT_FIX):
        return (f"A rerun will not fix this ({type(error).__name__}: an error in the config, the data or the code "
                "they name): fix what the message above names, then run the same command again; finished stages "
                "are served from the cache.")
    return ("Rerun the same command: finished stages are served from the cache, and only what failed or changed "
            "runs again.")


def _state_error(state) -> BaseException | None:
    """The exception a failed Prefect state holds, if it holds one."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception as exc:  # a state whose result cannot be read: its own error is the best we have
        return exc
    return error if isinstance(error, BaseException) else None


def _writable(root: Path) -> bool:
    """Whether the run root can be written (else the reason, on stderr), before a server or flow starts."""
    from pipeline.run import RootError, check_root

    try:
        check_root(root)
    except RootError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    cfg, root = _load(args.config, args.root)
    from pipeline.run import check_refresh

    try:
        check_refresh(cfg, args.refresh)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.dry_run:
        return _dry_run(cfg, root, args.refresh)
    from pipeline import progress

    progress.use_rich(not args.no_progress)
    if not _writable(root):
        return 2
    return (_run_in_process if args.in_process else _run_flow)(args, cfg, root)


def _run_flow(args: argparse.Namespace, cfg: RunConfig, root: Path) -> int:
    """The run as a Prefect flow run, on the API of `PREFECT_API_URL` or on one of its own."""
    start = time.perf_counter()
    with servers.run_api(root / "logs", meanwhile=_importer("flows.post_train")):  # imports overlap its start
        from flows.post_train import post_train

        state = post_train(config=str(args.config.resolve()), refresh=args.refresh, root=str(root),
                           progress=not args.no_progress, return_state=True)
    if not state.is_completed():
        print(f"\nThe run failed: {state.message}\n{failure_advice(_state_error(state))}", file=sys.stderr)
        return 1
    _where_to_look(cfg, root, state.result(), time.perf_counter() - start)
    return 0


def _run_in_process(args: argparse.Namespace, cfg: RunConfig, root: Path) -> int:
    """The same DAG in this process (`pipeline.run.run`): no Prefect, no server."""
    from pipeline.run import run

    _quiet_libraries()
    start = time.perf_counter()
    try:
        result = run(cfg, root=root, progress=not args.no_progress, refresh=args.refresh)
    except Exception as exc:
        if not isinstance(exc, RERUN_CANNOT_FIX):
            logging.getLogger("gft").exception("the run failed")  # the traceback of a crash, for its report
        print(f"\nThe run failed: {type(exc).__name__}: {exc}\n{failure_advice(exc)}", file=sys.stderr)
        return 1
    out = {"summary": str(result.summary_path), "calls": result.calls, "mlflow": result.mlflow_url}
    _where_to_look(cfg, root, out, time.perf_counter() - start, prefect=False)
    return 0


def _where_to_look(cfg: RunConfig, root: Path, out: dict, seconds: float, *, prefect: bool = True) -> None:
    summary = Path(out["summary"])
    print(summary.read_text())
    print(f"Finished in {seconds:.0f} s. Work done this time (cached stages do none): {out['calls']}")
    print(f"- summary and plots: {summary.parent}")
    print(f"- stage outputs (each with manifest.json): {root}")
    if out.get("mlflow"):
        print(f"- MLflow: start the UI with `gft ui --root {root}`, then open {out['mlflow']}")
    elif not cfg.tracking.enabled:
        print("- MLflow: tracking is disabled in this config ([tracking] enabled = false)")
    if prefect:
        print(f"- Prefect: `gft ui --prefect` -> http://127.0.0.1:{servers.UI_PORT} (flow `post-train`)")


def _dry_run(cfg: RunConfig, root: Path, refresh: str | None) -> int:
    from pipeline.memory.plan import MemoryBudgetError, check
    from pipeline.run import plan

    print(f"# resolved config ({cfg.digest()[:12]}), run root {root}\n")
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    print("\n# stage calls in order (key: the stage's cache key; '-' until an input it depends on exists; peak: "
          "the planned peak per device in GB, docs/memory.md)\n")
    calls, forced = plan(cfg, root), False
    width = max((len(c.key or "-") for c in calls), default=1)
    for c in calls:
        forced = forced or c.name == refresh
        status = "refresh" if forced else ("cached" if c.cached else "to run")
        peaks = "  ".join(f"{p.device} {p.total:6.2f}" for p in c.memory) or "-"
        largest = max(c.memory, key=lambda p: p.total).largest if c.memory else None
        most = f"  (largest: {largest.name} {largest.gb:.2f})" if largest else ""
        print(f"{c.name:<18} {c.stage:<18} {status:<8} {c.key or '-':<{width}}  {peaks}{most}")
    try:
        check(cfg, [c.memory for c in calls])
    except MemoryBudgetError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from pipeline.experiment.trials import open_experiment, print_plan

    try:
        opened = open_experiment(args.config, args.root, args.only)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    if args.dry_run:
        print_plan(opened.exp, opened.root, opened.only)
        return 0
    if args.deployment and not os.environ.get("PREFECT_API_URL"):
        print("--deployment runs trials on a work pool's workers: export PREFECT_API_URL=http://<host>:4200/api "
              "(the server the deployment is on; infra/README.md) and run this again.", file=sys.stderr)
        return 2
    from pipeline import progress

    progress.use_rich(not args.no_progress)
    if not _writable(opened.root):
        return 2
    return (_experiment_in_process if args.in_process else _experiment_flow)(args, opened)


def _experiment_flow(args: argparse.Namespace, opened) -> int:
    start = time.perf_counter()
    with servers.run_api(opened.root / "logs", meanwhile=_importer("flows.experiment")):
        from flows.experiment import experiment

        state = experiment(config=str(args.config.resolve()), root=str(opened.root), only=opened.only,
                           progress=not args.no_progress, deployment=args.deployment, return_state=True)
    report = opened.root / "reports" / opened.exp.name / "results.md"
    if report.is_file():
        print(report.read_text())
    print(f"Finished in {time.perf_counter() - start:.0f} s.\n- report and plots: {report.parent}\n"
          f"- MLflow: `gft ui --root {opened.root}`, experiment {opened.exp.name!r} (one parent run, a child run "
          f"per trial)\n- Prefect: `gft ui --prefect` -> flow `experiment`, a `post-train` subflow per trial")
    if not state.is_completed():
        error = _state_error(state)
        advice = failure_advice(error) if error else _TRIALS_FAILED
        print(f"\nThe experiment failed: {state.message}\n{advice}", file=sys.stderr)
        return 1
    return 0


_TRIALS_FAILED = ("The report names each failed trial's error. Fix a config or data error it names first (a rerun "
                  "meets it again); for any other, rerun the same command: finished stages are served from the cache.")


def _experiment_in_process(args: argparse.Namespace, opened) -> int:
    """Every trial in this process (`pipeline.run.run`), one after the other: no Prefect, no server."""
    from pipeline.experiment.trials import local_trial, run_experiment, where_to_look

    _quiet_libraries()
    start = time.perf_counter()
    result = run_experiment(opened.exp, opened.root, local_trial(opened.root, progress=not args.no_progress),
                            only=opened.only, progress=not args.no_progress)
    print(where_to_look(result, time.perf_counter() - start))
    if result.failed:
        print(f"\nThe experiment failed: {len(result.failed)} trial(s).\n{_TRIALS_FAILED}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print("Schedules need a Prefect server: start one with `gft ui --prefect` (or `prefect server start`), "
              "then export PREFECT_API_URL=http://127.0.0.1:4200/api and run this again.", file=sys.stderr)
        return 2
    cfg, root = _load(args.config, args.root)
    from flows.post_train import post_train

    post_train.serve(name=args.name or f"{cfg.name}-scheduled", cron=args.cron,
                     parameters={"config": str(args.config.resolve()), "root": str(root), "progress": False})
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    """This node's agent of one launched job of several nodes (the command the job's first node prints)."""
    from pipeline.rounds.launch import join

    return join(args.job)


def cmd_follow(args: argparse.Namespace) -> int:
    """Join every job of several nodes launched under the run root, one at a time, until Ctrl-C."""
    from pipeline.rounds.launch import follow
    from pipeline.store.jobs import job_files

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        follow(lambda: job_files(args.run_root))
    except KeyboardInterrupt:
        return 0
    return 0


def ui_commands(root: Path, port: int, prefect_port: int | None) -> list[tuple[str, list[str], dict, str]]:
    """(name, command, env, health url) of the MLflow server on the run root's database, and Prefect's."""
    bin_dir = Path(sys.executable).parent
    mlflow = [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
              "--artifacts-destination", str(root / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
              "--workers", "1"]
    out = [("MLflow", mlflow, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, f"http://127.0.0.1:{port}/health")]
    if prefect_port:
        prefect = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
        out.append(("Prefect", prefect, {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                    f"http://127.0.0.1:{prefect_port}/api/health"))
    return out


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_ui(args: argparse.Namespace) -> int:
    from pipeline.tracking import experiment_addresses, sqlite_uri

    root = args.root or (_load(args.config, None)[1] if args.config else Path("runs").resolve())
    if not (root / "mlflow.db").is_file():
        print(f"{root / 'mlflow.db'}: no MLflow database yet; run `gft run CONFIG` first", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _interrupt)  # stop the servers the same way on SIGTERM as on Ctrl-C
    try:
        for name, cmd, env, health in ui_commands(root, args.port, args.prefect_port if args.prefect else None):
            procs.append(servers.start(cmd, env, root / "logs" / f"{name.lower()}-ui.log"))
            servers.wait_http(health, procs[-1], args.timeout)
            print(f"{name} UI: {health.rsplit('/', 2 if name == 'Prefect' else 1)[0]}", flush=True)
        mlflow_ui = f"http://127.0.0.1:{args.port}"
        for name, address in experiment_addresses(sqlite_uri(root / "mlflow.db"), mlflow_ui):
            print(f"  experiment {name}: {address}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return 1  # a server died on its own; its log says why
    except KeyboardInterrupt:
        return 0
    finally:
        servers.stop(procs)


def _importer(module: str) -> Callable[[], None]:
    """Import a flow's module and what it imports (torch, transformers, the stages): seconds, spent while the
    API starts."""
    def load() -> None:
        _quiet_libraries()
        importlib.import_module(module)
    return load


def _quiet_libraries() -> None:
    logging.getLogger("pipeline").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; ours stay


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gft", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the pipeline (a Prefect flow run)")
    r.add_argument("config", type=Path, help="RunConfig TOML, e.g. configs/default.toml")
    r.add_argument("--root", type=Path, help="run root (default: the config's `root`)")
    r.add_argument("--refresh", metavar="STAGE", help="recompute STAGE and everything after it")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and stage keys; run nothing")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--in-process", action="store_true", help="run the DAG in this process, without Prefect")
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("experiment", help="run an experiment: variants x seeds, a table and plots")
    e.add_argument("config", type=Path, help="experiment TOML, e.g. experiments/paper_table.toml")
    e.add_argument("--root", type=Path, help="artifact store (default: the experiment's or its base config's)")
    e.add_argument("--only", help="comma-separated variant or sweep names to run")
    e.add_argument("--dry-run", action="store_true", help="list every trial and what it changes; run nothing")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--deployment", metavar="NAME", help="run each trial as a run of this post-train deployment "
                   "(e.g. post-train/nightly) on its work pool's workers, all at once; needs PREFECT_API_URL")
    e.add_argument("--in-process", action="store_true", help="run every trial in this process, without Prefect")
    e.set_defaults(fn=cmd_experiment)
    s = sub.add_parser("serve", help="serve a scheduled deployment of the flow")
    s.add_argument("config", type=Path)
    s.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    s.add_argument("--name", help="deployment name (default: <run name>-scheduled)")
    s.add_argument("--root", type=Path)
    s.set_defaults(fn=cmd_serve)
    u = sub.add_parser("ui", help="start the MLflow UI (and with --prefect, Prefect's) on 127.0.0.1")
    u.add_argument("config", type=Path, nargs="?", help="a RunConfig TOML (its run root's database)")
    u.add_argument("--root", type=Path, help="a run root holding mlflow.db")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--prefect", action="store_true", help="also start `prefect server start`")
    u.add_argument("--prefect-port", type=int, default=servers.UI_PORT)
    u.add_argument("--timeout", type=float, default=180, help="seconds to wait for each server")
    u.set_defaults(fn=cmd_ui)
    j = sub.add_parser("join", help="another node's agent of one launched job of several nodes")
    j.add_argument("job", type=Path, metavar="JOB_JSON", help="the job.json the job's first node names")
    j.set_defaults(fn=cmd_join)
    f = sub.add_parser("follow", help="another node: join every job of several nodes a run launches")
    f.add_argument("run_root", type=Path, metavar="RUN_ROOT", help="the run root, shared with the first node")
    f.set_defaults(fn=cmd_follow)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line (`argv` None: the process's own, from the `gft` script) or a call with its arguments."""
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    p = parser()
    args = p.parse_args(argv)
    if getattr(args, "in_process", False) and getattr(args, "deployment", None):
        p.error("--in-process and --deployment exclude each other")
    try:
        code = args.fn(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    if argv is None and args.command in ("run", "experiment"):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the `gft` process once its command is done: the exit handlers run (logging's, Prefect's, MLflow's), the
    output is flushed, and the interpreter's teardown of torch and transformers (2-3 s of freeing modules, after
    everything is written) is skipped."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
