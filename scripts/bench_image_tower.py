"""The exported image tower against the torch one on the CPU: encoding speed, start-up and peak memory.

    nice -n 10 python scripts/bench_image_tower.py            # ViT-B-32 (random weights), ~3 min on 2 cores

ViT-B-32 with seeded random weights (the same cost as trained ones) is exported with ``indexer.image_export``
(into a cache inside a temporary folder), then each backend runs in a fresh process: import and model/session
load, then ``--images`` preprocessed images encoded in batches of ``--batch-size`` (the first batch is a warm-up
and not timed). Printed per backend: load seconds, images per second (wall) and CPU seconds per image, the peak
resident memory of the process (VmHWM) and whether torch was imported. rclip 4 (the issue's reference) is not
installable offline: the comparison is with this project's torch path. Speed figures taken while other work runs
are "loaded": the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.image_export import export_image_tower  # noqa: E402
from retrieval.model.text_onnx import graph_files  # noqa: E402
from retrieval.store.catalog import Catalog  # noqa: E402
from retrieval.store.layout import IndexLayout  # noqa: E402

CHILD = """
import json, os, sys, time
started = time.perf_counter()
def peak_mib():  # VmHWM: this process's own peak (ru_maxrss would include the forked parent)
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024
backend, where, images, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import numpy as np
if backend == "onnx":
    from retrieval.model.image_onnx import cached_image_tower
    encoder = cached_image_tower(where).open()
else:
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec
    encoder = Encoder.load(ModelSpec(where, None), CPU)
loaded = time.perf_counter()
pixels = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
encoder.encode_images(pixels)  # warm-up
cpu, wall = time.process_time(), time.perf_counter()
for _ in range(images // batch):
    encoder.encode_images(pixels)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
done = (images // batch) * batch
print(json.dumps({"import_and_load_s": round(loaded - started, 2), "img_per_s": round(done / wall, 2),
                  "cpu_s_per_img": round(cpu / done, 4), "peak_rss_mib": round(peak_mib()),
                  "imported_torch": "torch" in sys.modules}))
"""


def model_dir() -> Path:
    """ViT-B-32 with seeded random weights, kept between runs (scripts/bench_search.py makes the same one)."""
    import open_clip

    from retrieval.testing import make_random_model_dir

    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipsearch-bench" / "vit-b-32"
    if not (folder / "open_clip_model.safetensors").is_file():
        make_random_model_dir(folder, model_cfg=open_clip.get_model_config("ViT-B-32"), seed=0)
    return folder


def exported(work: Path, model: str) -> tuple[str, dict]:
    """Export the image tower into a cache under ``work``; (model key, what the export reported)."""
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec

    identity = Encoder.load(ModelSpec(model, None), CPU).identity
    index_dir = work / "index"
    catalog = Catalog(IndexLayout(index_dir).catalog, create=True)
    catalog.set_model_identity(identity)
    catalog.close()
    started = time.perf_counter()
    report = export_image_tower(index_dir, force=True)
    Encoder.unload_all()
    graph = Path(report.record.folder) / "image.onnx"
    return identity.key(), {
        "export_and_check_s": round(time.perf_counter() - started, 1),
        "file_mb": round(
            sum((graph.parent / name).stat().st_size for name in graph_files(graph.parent, graph.name)) / 1e6, 1
        ),
        "min_cosine_vs_torch": report.record.min_cosine,
        "same_top10": report.record.top10_same,
    }


def run_child(backend: str, where: str, images: int, batch: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, backend, where, str(images), str(batch)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs per backend, alternated torch,onnx / onnx,torch")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()}", flush=True)
    model = f"local-dir:{model_dir()}"
    work = Path(tempfile.mkdtemp(prefix="bench-image-tower-"))
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # the export's cache: this run's own
    try:
        key, export = exported(work, model)
        print("ViT-B-32 (random weights) image tower export:", json.dumps(export), flush=True)
        for round_ in range(args.rounds):
            order = ("torch", "onnx") if round_ % 2 == 0 else ("onnx", "torch")
            for backend in order:
                result = run_child(backend, key if backend == "onnx" else model, args.images, args.batch_size)
                print(f"round {round_ + 1} {backend:5}:", json.dumps(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
