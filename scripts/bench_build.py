"""Building a large index from stored embeddings: clipsearch's IVF-PQ build against autofaiss, on the same vectors.

    python scripts/bench_build.py --n 200000
    python scripts/bench_build.py --n 200000 --autofaiss-python /tmp/afvenv/bin/python   # adds autofaiss

The vectors are CLIP-like (``retrieval.testing.EmbeddingSpace``), 512-d, stored as float16 as the catalog stores
them; the queries are text-like (another modality, as real searches are). clipsearch's side is what
``clipsearch reindex --index-type ivfpq`` does: ``VectorIndex.build`` streams (ids, vectors) batches, trains on a
sample, adds the rest, then ``tune`` picks the search effort and the rescoring depth for recall@10 >= 0.95 on half
the probes and measures recall on the other half; rescoring reads the exact vectors (here a memory-mapped float16
file, in a real index the catalog). autofaiss runs in its own interpreter (it pins numpy < 2, which this
project's environment does not; there it also needs faiss-cpu 1.7.x and pyarrow < 16) on the same .npy files, with
a memory budget equal to clipsearch's index size, and is scored on the same queries and ground truth. Reported:
build seconds, index bytes, recall@10, and peak RSS of each side.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.store.index_types import default_params  # noqa: E402
from retrieval.store.tuning import exact_top_k, recall_at_k, tune  # noqa: E402
from retrieval.store.vectors import VectorIndex  # noqa: E402
from retrieval.testing import EmbeddingSpace  # noqa: E402
from retrieval.unit import unit_rows  # noqa: E402

BATCH = 20_000  # rows per batch, as Catalog.iter_embeddings reads them
AUTOFAISS = """
import json, sys, time, resource, numpy as np
from autofaiss import build_index
folder, budget = sys.argv[1], sys.argv[2]
vectors = np.load(folder + "/vectors.npy", mmap_mode="r").astype("float32")
queries = np.load(folder + "/queries.npy")[1::2]  # the half clipsearch measures on
exact = np.load(folder + "/exact.npy")[1::2]
started = time.perf_counter()
index, infos = build_index(vectors, save_on_disk=False, max_index_memory_usage=budget, metric_type="ip",
                           current_memory_available="8G", verbose=40)
seconds = time.perf_counter() - started
_, found = index.search(queries, 10)
hits = [len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist())]
print(json.dumps({"side": "autofaiss", "seconds": seconds, "recall_at_10": float(np.mean(hits)),
                  "index_key": infos.get("index_key"), "index_bytes": infos.get("size in bytes"),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_vectors(folder: Path, n: int, queries: int) -> tuple[np.memmap, np.ndarray, np.ndarray]:
    space = EmbeddingSpace.make(512)
    stored = np.lib.format.open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float16, shape=(n, 512))
    at = 0
    for chunk in space.images(n, seed=1):
        stored[at : at + len(chunk)] = chunk
        at += len(chunk)
    stored.flush()
    probes = space.text_queries(queries).astype(np.float32)
    exact = exact_top_k(batches(stored), probes)
    np.save(folder / "queries.npy", probes)
    np.save(folder / "exact.npy", exact)
    return stored, probes, exact


def batches(stored: np.ndarray):
    """(ids, unit float32 vectors) in batches from float16 storage: what a rebuild reads from the catalog."""
    for start in range(0, len(stored), BATCH):
        yield np.arange(start, min(start + BATCH, len(stored))), unit_rows(stored[start : start + BATCH])


def build_ours(stored: np.ndarray, probes: np.ndarray, exact: np.ndarray, folder: Path) -> dict:
    started = time.perf_counter()
    params = default_params("ivfpq", len(stored), 512)
    index = VectorIndex.build(512, batches(stored), "ivfpq", params)
    index.rescore_source = lambda ids: unit_rows(stored[np.asarray(ids)])
    report = tune(index, probes, exact, "text")
    seconds = time.perf_counter() - started
    index.save(folder / "ours.faiss")
    index.rescore_source = None  # the PQ codes alone, as autofaiss answers
    plain = recall_at_k(index.search(probes[1::2], 10)[1], exact[1::2])
    return {
        "side": "clipsearch ivfpq",
        "seconds": seconds,
        "recall_at_10": report.recall,
        "recall_at_10_without_rescoring": plain,
        "nlist": params.nlist,
        "nprobe": report.effort,
        "rescore": report.rescore,
        "index_bytes": (folder / "ours.faiss").stat().st_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--autofaiss-python", help="an interpreter with autofaiss installed (its own venv)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-build-") as name:
        folder = Path(name)
        stored, probes, exact = make_vectors(folder, args.n, args.queries)
        results = [build_ours(stored, probes, exact, folder)]
        if args.autofaiss_python:
            budget = f"{max(1, results[0]['index_bytes'] // 1_000_000 + 1)}MB"
            run = subprocess.run([args.autofaiss_python, "-c", AUTOFAISS, name, budget], capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"autofaiss failed:\n{run.stderr[-3000:]}")
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(json.dumps({"n": args.n, "queries": args.queries, "results": results}, indent=2))


if __name__ == "__main__":
    main()
