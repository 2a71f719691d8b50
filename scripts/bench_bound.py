"""A fresh `clipsearch index` of a folder against its decode+encode bound, read around each run (issue 27).

    python scripts/bench_bound.py --folder ~/.cache/clipsearch-bench/photos-12mp --model local-dir:MODEL --rounds 3

The bound (``scripts/bench_onnx_index.bound_onnx``: the encoder as a run opens it, one decode thread on one core,
on the first 32 photos of --bound-folder, default --folder) is read twice before and twice after each run, and the
run is compared with their median: one reading moves by up to 10 % on a shared machine. Prints one JSON line a run:
images/s, wall, CPU, peak tree PSS, the four bound readings and ``of_bound``. ``--in-process``: the same index
made by ``index_paths`` in this process, imports done and the session opened beforehand (``preload_encoder``): the
pipeline alone, without a process's start (wall and CPU of this process; no PSS).
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


def in_process(folder: Path, index_dir: Path, model: str) -> dict:
    """``index_paths`` in this process, after its imports and with the session opened (it is kept per process)."""
    import time

    from indexer.pipeline import IndexSettings, index_paths, preload_encoder
    from retrieval.model.spec import ModelSpec

    settings = IndexSettings(model=ModelSpec(model, None), export_text=False, export_image=False)
    preload_encoder(settings)
    started, cpu = time.perf_counter(), time.process_time()
    index_paths(index_dir, [folder], settings, progress=False)
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 2), "cpu_s": round(time.process_time() - cpu, 1), "peak_tree_pss_mb": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="JPEG photos (photo_*.jpg for the bound)")
    parser.add_argument("--bound-folder", type=Path, default=None, help="the bound's photos (default: --folder)")
    parser.add_argument("--model", required=True, help="a model whose image tower is exported (the ONNX path)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--in-process", action="store_true", help="index_paths here, imports and session warm")
    args = parser.parse_args()
    bound_folder = args.bound_folder or args.folder
    count = sum(1 for path in args.folder.iterdir() if path.suffix.lower() in (".jpg", ".jpeg"))
    scratch = Path(tempfile.mkdtemp(prefix="bench-bound-"))
    try:
        for round_ in range(args.rounds):
            bounds = [bound_onnx(bound_folder, args.model)["bound"] for _ in range(2)]
            index_dir = scratch / f"index-{round_}"
            if args.in_process:
                result = in_process(args.folder, index_dir, args.model)
            else:
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
