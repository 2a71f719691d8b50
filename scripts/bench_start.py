"""The fixed cost of a command, this checkout against another, in fresh processes alternated A,B / B,A.

    python scripts/bench_start.py --before /tmp/main-before --folder PHOTOS --model local-dir:MODEL --runs 10
    python scripts/bench_start.py --before /tmp/main-before --index INDEX --runs 10

``--folder``: a fresh `clipsearch index FOLDER` into a new index each run (``CLIPSEARCH_EXPORT_TEXT=0``; a small
folder, so that start and exit weigh most); ``--index``: a cold `clipsearch search "a red car at night"` on INDEX.
Prints the median wall and CPU (user + system) of each side, with the min and max. Each side runs in its own
checkout's folder: ``python -c`` imports from the working directory before PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENTRY = ["-m", "clipsearch"]  # as installed: clipsearch.launch where the checkout has it


def timed(command: list[str], checkout: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh process run in ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "CLIPSEARCH_EXPORT_TEXT": "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, *ENTRY, *command], env=env, cwd=checkout, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before (git worktree)")
    parser.add_argument("--folder", type=Path, help="a fresh index of this folder each run")
    parser.add_argument("--model", default=None, help="--model for the fresh index")
    parser.add_argument("--index", type=Path, help="a cold text query on this index each run")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if (args.folder is None) == (args.index is None):
        raise SystemExit("give --folder or --index")
    sides = {"before": args.before.resolve(), "after": Path(__file__).resolve().parents[1]}
    results: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    scratch = Path(tempfile.mkdtemp(prefix="bench-start-"))
    try:
        for round_ in range(args.runs):
            for side in list(sides) if round_ % 2 == 0 else list(sides)[::-1]:
                if args.folder is not None:
                    index_dir = Path(tempfile.mkdtemp(dir=scratch))
                    command = ["index", str(args.folder.resolve()), "--index", str(index_dir), "-q"]
                    command += ["--model", args.model] if args.model else []
                else:
                    command = ["search", "a red car at night", "--index", str(args.index.resolve()), "-k", "5"]
                results[side].append(timed(command, sides[side]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    what = f"fresh index of {args.folder}" if args.folder else f"cold search on {args.index}"
    print(f"{what}, {args.runs} runs a side, load {os.getloadavg()[0]:.2f}")
    for side, runs in results.items():
        walls, cpus = [wall for wall, _ in runs], [cpu for _, cpu in runs]
        print(
            f"  {side:6s} wall median {statistics.median(walls):.3f} s (min {min(walls):.3f}, max {max(walls):.3f}), "
            f"CPU median {statistics.median(cpus):.3f} s"
        )


if __name__ == "__main__":
    main()
