"""A fresh `clipsearch index` of a folder against its decode+encode bound, read around each run (issue 27).

    python scripts/bench_bound.py --folder ~/.cache/clipsearch-bench/photos-12mp --model local-dir:MODEL --rounds 3

The bound (``scripts/bench_onnx_index.bound_onnx``: the encoder as a run opens it, one decode thread on one core,
on the first 32 photos of --bound-folder, default --folder) is read twice before and twice after each run, and the
run is compared with their median: one reading moves by up to 10 % on a shared machine. Prints one JSON line a run:
images/s, wall, CPU, peak tree PSS, the four bound readings and ``of_bound``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_onnx_index import bound_onnx, clipsearch, run_measured  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="JPEG photos (photo_*.jpg for the bound)")
    parser.add_argument("--bound-folder", type=Path, default=None, help="the bound's photos (default: --folder)")
    parser.add_argument("--model", required=True, help="a model whose image tower is exported (the ONNX path)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bound_folder = args.bound_folder or args.folder
    count = sum(1 for path in args.folder.iterdir() if path.suffix.lower() in (".jpg", ".jpeg"))
    scratch = Path(tempfile.mkdtemp(prefix="bench-bound-"))
    try:
        for round_ in range(args.rounds):
            bounds = [bound_onnx(bound_folder, args.model)["bound"] for _ in range(2)]
            index_dir = scratch / f"index-{round_}"
            command, env = clipsearch(ROOT, "index", str(args.folder), "--index", str(index_dir), "-q")
            result = run_measured([*command, "--model", args.model], env, ROOT)
            bounds += [bound_onnx(bound_folder, args.model)["bound"] for _ in range(2)]
            rate = count / result["wall_s"]
            line = {"round": round_, "images": count, "images_per_s": round(rate, 2), "wall_s": result["wall_s"]}
            line |= {"cpu_s": result["cpu_s"], "peak_tree_pss_mb": result["peak_tree_pss_mb"], "bounds": bounds}
            line |= {"of_bound": round(rate / statistics.median(bounds), 3), "load": round(os.getloadavg()[0], 2)}
            print(json.dumps(line), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
