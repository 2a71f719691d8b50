"""A fresh `clipsearch index` of a folder against its decode+encode bound, read around each run (issue 27).

    python scripts/bench_bound.py --folder ~/.cache/clipsearch-bench/photos-12mp --model local-dir:MODEL --rounds 3

The bound (``scripts/bench_onnx_index.bound_onnx``: the encoder as a run opens it, decoding on the run's decode
threads, on the first 32 photos of --bound-folder, default --folder; ``of_bound_per_core``: against the earlier
form, which took decoding as one thread's rate times the cores) is read twice before and twice after each run, and
the run is compared with their median: one reading moves by up to 10 % on a shared machine. Prints one JSON line a run:
images/s, wall, CPU, peak tree PSS, the four bound readings and ``of_bound``. ``--in-process``: the same index
made by ``index_paths`` in this process, imports done and the session opened beforehand (``preload_encoder``): the
pipeline alone, without a process's start (wall and CPU of this process; no PSS). ``--account``: a CPU account
instead, per round in one process: every photo of --folder decoded on one thread (D) and encoded as a run encodes
(E), the same index made in-process and by a fresh `clipsearch index`; what the process spends beyond D + E is
its fixed cost (imports, the session, the exit).
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


def account(folder: Path, scratch: Path, model: str, round_: int) -> dict:
    """CPU seconds of decoding (one thread) and encoding (as a run does) every photo, then wall and CPU of the
    index made in-process and by a fresh process."""
    import resource

    import numpy as np

    from indexer.pipeline import default_batch_size
    from retrieval.images import ImageFileDataset
    from retrieval.model.device import CPU
    from retrieval.model.image_onnx import cached_image_tower, indexing_encoder
    from retrieval.model.spec import ModelSpec, spec_key

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    encoder = indexing_encoder(cached_image_tower(spec_key(ModelSpec(model, None), check=False)))
    batch = default_batch_size(CPU, onnx=True)
    paths = [str(path) for path in sorted(folder.iterdir()) if path.suffix.lower() in (".jpg", ".jpeg")]
    dataset = ImageFileDataset(paths, encoder.crop, encoder.side)
    started = cpu()
    crops = np.stack([dataset[i].pixels for i in range(len(paths))])
    decode = cpu() - started
    started = cpu()
    for start in range(0, len(crops), batch):
        encoder.encode_crops(crops[start : start + batch])
    encode = cpu() - started
    del crops
    inside = in_process(folder, scratch / f"account-in-{round_}", model)
    command, env = clipsearch(ROOT, "index", str(folder), "--index", str(scratch / f"account-{round_}"), "-q")
    fresh = run_measured([*command, "--model", model], env, ROOT)
    return {
        "round": round_, "decode_cpu_s": round(decode, 2), "encode_cpu_s": round(encode, 2),
        "in_process_wall_s": inside["wall_s"], "in_process_cpu_s": inside["cpu_s"],
        "process_wall_s": fresh["wall_s"], "process_cpu_s": fresh["cpu_s"],
        "process_beyond_d_e_cpu_s": round(fresh["cpu_s"] - decode - encode, 2), "load": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="JPEG photos (photo_*.jpg for the bound)")
    parser.add_argument("--bound-folder", type=Path, default=None, help="the bound's photos (default: --folder)")
    parser.add_argument("--model", required=True, help="a model whose image tower is exported (the ONNX path)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--in-process", action="store_true", help="index_paths here, imports and session warm")
    parser.add_argument("--account", action="store_true", help="CPU of D, E, in-process and fresh-process runs")
    args = parser.parse_args()
    bound_folder = args.bound_folder or args.folder
    count = sum(1 for path in args.folder.iterdir() if path.suffix.lower() in (".jpg", ".jpeg"))
    scratch = Path(tempfile.mkdtemp(prefix="bench-bound-"))
    try:
        for round_ in range(args.rounds):
            if args.account:
                print(json.dumps(account(args.folder, scratch, args.model, round_)), flush=True)
                continue
            readings = [bound_onnx(bound_folder, args.model) for _ in range(2)]
            index_dir = scratch / f"index-{round_}"
            if args.in_process:
                result = in_process(args.folder, index_dir, args.model)
            else:
                command, env = clipsearch(ROOT, "index", str(args.folder), "--index", str(index_dir), "-q")
                result = run_measured([*command, "--model", args.model], env, ROOT)
            readings += [bound_onnx(bound_folder, args.model) for _ in range(2)]
            bounds, per_core = [each["bound"] for each in readings], [each["bound_per_core"] for each in readings]
            rate = count / result["wall_s"]
            line = {"round": round_, "images": count, "images_per_s": round(rate, 2), "wall_s": result["wall_s"]}
            line |= {"cpu_s": result["cpu_s"], "peak_tree_pss_mb": result["peak_tree_pss_mb"], "bounds": bounds}
            line |= {"of_bound": round(rate / statistics.median(bounds), 3)}
            line |= {"of_bound_per_core": round(rate / statistics.median(per_core), 3)}
            line["load"] = round(os.getloadavg()[0], 2)
            print(json.dumps(line), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
