"""What a newcomer waits for, in fresh processes, for one or two checkouts side by side (issue 25, items 2 and 9):

  api_index      index the 300 bundled sample images through the Python API (as the demo does)
  text_query     `clipsearch search` on that index (median of 3 fresh processes): ONNX when the API exported
  refresh_2      `clipsearch index` after 1 photo added and 1 changed
  serve_answers  `clipsearch serve` from start until the page answers; serve_search: until the first search does
  watch_first    `clipsearch index --watch`: from copying a photo in (after the first run) to its row in the catalog

    python scripts/bench_newcomer.py [--before /path/to/older/checkout] [--work DIR]

Each figure is wall seconds with the children's CPU seconds beside it; the load average is printed, since a
figure taken on a busy machine is not a speed claim. The older checkout runs with this checkout's .venv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples" / "images"
MODEL = ROOT / "data" / "models" / "shapes-clip"
QUERY = "a large green triangle at the top right of the image"


def cli_module(root: Path) -> str:
    return "clipsearch.cli" if (root / "clipsearch" / "cli").is_dir() else "retrieval.cli"


def env_for(root: Path) -> dict[str, str]:
    """Run from ``root`` (its packages come first on sys.path) with this checkout's interpreter."""
    return {**os.environ, "PYTHONPATH": str(root), "OMP_WAIT_POLICY": "PASSIVE", "CLIPSEARCH_EXPORT_TEXT": "1"}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], root: Path, **kwargs) -> tuple[float, float]:
    cpu, started = children_cpu(), time.perf_counter()
    done = subprocess.run(command, env=env_for(root), cwd=root, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, children_cpu() - cpu


def clipsearch(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", f"from {cli_module(root)} import main; main()", *args]


def api_index(root: Path, photos: Path, index: Path) -> tuple[float, float]:
    code = (
        "import sys; from pathlib import Path; from indexer.pipeline import IndexSettings, index_paths; "
        "from retrieval.model.spec import ModelSpec; "
        f"index_paths(Path({str(index)!r}), [Path({str(photos)!r})], "
        f"IndexSettings(model=ModelSpec('local-dir:{MODEL}', None), workers=0), progress=False)"
    )
    return timed([sys.executable, "-c", code], root)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer counts (a 401 without the token is an answer)
    except OSError:
        return False


def wait(condition, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.05)


def serve_times(root: Path, index: Path) -> tuple[float, float]:
    port = free_port()
    args = ["serve", "--index", str(index), "--port", str(port), "--device", "cpu"]
    if "--no-token" in subprocess.run(clipsearch(root, "serve", "--help"), env=env_for(root), cwd=root,
                                      capture_output=True, text=True).stdout:  # fmt: skip
        args.append("--no-token")
    started = time.perf_counter()
    server = subprocess.Popen(clipsearch(root, *args), env=env_for(root), cwd=root, stderr=subprocess.DEVNULL)
    try:
        wait(lambda: answers(f"http://127.0.0.1:{port}/"))
        page = time.perf_counter() - started
        search = f"http://127.0.0.1:{port}/api/search?q=circle&k=5"

        def searched() -> bool:
            try:
                urllib.request.urlopen(search, timeout=60).close()
                return True
            except urllib.error.HTTPError as error:
                return error.code not in (409, 503)
            except OSError:
                return False

        wait(searched)
        return page, time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(30)


def catalog_rows(index: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0])
    except sqlite3.Error:
        return -1


def watch_first(root: Path, photos: Path, index: Path) -> float:
    before = catalog_rows(index)
    watcher = subprocess.Popen(
        clipsearch(root, "index", str(photos), "--index", str(index), "--watch", "-q"),
        env=env_for(root),
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        watcher.stdout.readline()  # the first run's summary line: watching from here on
        time.sleep(1.0)  # a user copies a photo a moment later
        shutil.copy(SAMPLES / "shape_00007.png", photos / "copied-in.png")
        started = time.perf_counter()
        wait(lambda: catalog_rows(index) > before)
        return time.perf_counter() - started
    finally:
        watcher.terminate()
        watcher.wait(30)


def measure(root: Path, work: Path) -> dict[str, tuple[float, float] | float]:
    photos, index = work / "photos", work / "index"
    shutil.copytree(SAMPLES, photos)
    out: dict[str, tuple[float, float] | float] = {"api_index": api_index(root, photos, index)}
    runs = [timed(clipsearch(root, "search", QUERY, "--index", str(index), "--json"), root) for _ in range(3)]
    out["text_query"] = min(runs, key=lambda run: abs(run[0] - statistics.median(r[0] for r in runs)))
    shutil.copy(SAMPLES / "shape_00003.png", photos / "new-photo.png")
    shutil.copy(SAMPLES / "shape_00004.png", photos / "shape_00005.png")  # changed in place
    out["refresh_2"] = timed(clipsearch(root, "index", str(photos), "--index", str(index), "-q"), root)
    out["serve_answers"], out["serve_search"] = serve_times(root, index)
    out["watch_first"] = watch_first(root, photos, index)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="an older checkout to measure side by side")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-newcomer-", dir=args.work))
    sides = ([("before", args.before.resolve())] if args.before else []) + [("after", ROOT)]
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    results = {name: measure(root, work / name) for name, root in sides}
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(f"{'':<14}" + "".join(f"{name:>22}" for name, _ in sides) + ("       ratio" if len(sides) == 2 else ""))
    for key in results[sides[-1][0]]:
        cells, walls = "", []
        for name, _ in sides:
            value = results[name][key]
            wall, cpu = value if isinstance(value, tuple) else (value, None)
            walls.append(wall)
            cells += f"{wall:>10.2f} s" + (f" ({cpu:5.1f} cpu)" if cpu is not None else " " * 11)
        ratio = f"  {walls[0] / walls[1]:8.2f}x" if len(walls) == 2 and walls[1] else ""
        print(f"{key:<14}{cells}{ratio}")
    print(json.dumps({name: results[name] for name, _ in sides}))


if __name__ == "__main__":
    main()
