"""Hostile trials of the run root (not a pytest file: minutes of runs): kill -9 or SIGTERM `gft run --in-process`
(or, with --gft, `gft run`: the Prefect flow with its own API) of the tiny config at random moments, rerun it on the
same root, and compare every stage output's digest with an uninterrupted run; then start two runs together on one
fresh root. Prints a table.

    .venv/bin/python tests/kill_trials.py [--trials 8] [--seed 0] [--out /tmp/kill-trials] [--gft]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_run.toml"
GFT = Path(sys.executable).parent / "gft"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("PREFECT_API_URL", None)  # with --gft, each run starts its own Prefect API


def command(root: Path, prefect: bool = False, config: Path = TINY) -> list[str]:
    """`gft run` of `config` into `root`: the Prefect flow (`prefect`) or the same DAG in process."""
    return [str(GFT), "run", str(config), "--root", str(root), "--no-progress", *([] if prefect else ["--in-process"])]


def start(root: Path, prefect: bool = False) -> subprocess.Popen:
    return subprocess.Popen(command(root, prefect), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def digests(root: Path) -> dict[str, str]:
    """{stage/key: output sha256} of every published stage output under `root`."""
    out = {}
    for manifest in root.glob("*/*/manifest.json"):
        if not manifest.parent.name.startswith("."):
            out[f"{manifest.parent.parent.name}/{manifest.parent.name[:12]}"] = json.loads(
                manifest.read_text())["output"]["sha256"]
    return out


def finish(root: Path, prefect: bool = False) -> tuple[int, float, str]:
    t = time.perf_counter()
    proc = start(root, prefect)
    _, err = proc.communicate(timeout=900)
    return proc.returncode, time.perf_counter() - t, err[-400:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/kill-trials"))
    p.add_argument("--gft", action="store_true", help="kill `gft run` (Prefect, its own API), not the in-process run")
    args = p.parse_args()
    if args.gft:
        ENV["PREFECT_HOME"] = str(args.out / "prefect-home")  # the trials' flow runs, not the user's database
    rng = random.Random(args.seed)
    code, ref_s, err = finish(args.out / "reference", args.gft)
    assert code == 0, err
    ref = digests(args.out / "reference")
    print(f"reference: {len(ref)} stage outputs in {ref_s:.0f} s")
    print("| trial | signal | at (s) | resumed | same digests |\n|---|---|---|---|---|")
    clean = 0
    for i in range(args.trials):
        root, sig = args.out / f"trial-{i}", rng.choice([signal.SIGKILL, signal.SIGTERM])
        at = rng.uniform(0.5, ref_s * 0.9)
        proc = start(root, args.gft)
        time.sleep(at)
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        code, _, err = finish(root, args.gft)
        same = digests(root) == ref
        clean += code == 0 and same
        print(f"| {i} | {sig.name} | {at:.1f} | {'yes' if code == 0 else 'NO: ' + err[-120:]!s} | {same} |")
    both = [start(args.out / "together", args.gft), start(args.out / "together", args.gft)]
    codes = [proc.wait(timeout=900) for proc in both]
    together = digests(args.out / "together") == ref
    print(f"\nkills: {args.trials}, clean resumes with identical digests: {clean}/{args.trials}")
    print(f"two runs started together on one fresh root: exit codes {codes}, digests equal the reference: {together}")
    return 0 if clean == args.trials and codes == [0, 0] and together else 1


if __name__ == "__main__":
    sys.exit(main())
