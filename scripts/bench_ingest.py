"""The driver's write-side ceiling: catalog + FAISS ingest of rows that arrive already encoded (as from a cluster).

    python scripts/bench_ingest.py                      # 200k rows of 512-d float16, flat and ivf, ~1 minute
    python scripts/bench_ingest.py --rows 50000 --chunk 256 --chunk 4096

Rows go through ``indexer.pipeline.ingest_encoded``, the very writer a run (local or ``--ray``) commits with: one
SQLite transaction per chunk (rows, float16 embedding blobs, file-name keywords, the generation), then the
in-memory FAISS index. Goal: >= 50,000 rows/s, the output of ~20 GPUs. Reported per index type and chunk size:
  wall   rows/s by the clock (on a shared machine this counts time spent waiting for a core)
  cpu    rows/s of this process's CPU time (user + sys), all threads: the work done, whatever the cores
  writer rows/s of the writing thread's CPU time alone: SQLite (rows, keywords, commit). FAISS adds run on a
         helper thread beside it, so with two free cores this, not cpu, bounds the rate; wall shows what the
         machine's load allowed
  catalog-only is the same without a FAISS index, to split the two costs.
Rows carry their header facts (schema 3), as rows from Ray decode tasks do; a local run's writer reads them per
file itself, at the rate printed on the last line (small JPEGs in the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.pipeline import ingest_encoded  # noqa: E402
from indexer.plan import WorkItem  # noqa: E402
from indexer.scan import FileFacts  # noqa: E402
from retrieval.image_meta import ImageMeta, read_image_meta  # noqa: E402
from retrieval.images import DecodedItem  # noqa: E402
from retrieval.model.spec import ModelIdentity  # noqa: E402
from retrieval.store.catalog import Catalog  # noqa: E402
from retrieval.store.index_types import default_params  # noqa: E402
from retrieval.store.layout import IndexLayout  # noqa: E402
from retrieval.store.vectors import VectorIndex  # noqa: E402
from retrieval.testing import EmbeddingSpace  # noqa: E402

GOAL = 50_000
META = ImageMeta("2023-07-14 18:02:11", "exif", "Canon", "EOS R6", 1, 4032, 3024, True, "jpg")  # read by the worker


MONTHS = [replace(META, taken_at=f"{2015 + m // 12}-{m % 12 + 1:02d}-14 18:02:11") for m in range(120)]


def encoded_rows(
    vectors: np.ndarray, failed_every: int = 500, first: int = 0, dated: bool = False
) -> list[tuple[WorkItem, DecodedItem, np.ndarray | None]]:
    """What the cluster streams back: facts, content hash, size in pixels, the vector (None for a broken file).
    Files are numbered from ``first``, so batches made one after another name distinct files. ``dated``: taken
    dates spread over the 120 months of 2015-2024 (file i in month i % 120), for filtered queries."""
    rows = []
    for i, vector in enumerate(vectors, start=first):
        meta = MONTHS[i % 120] if dated else META
        facts = FileFacts(f"/archive/{i // 1000:05d}/IMG_{i:08d}.jpg", 3_000_000 + i, 1_700_000_000_000_000_000 + i)
        broken = failed_every and i % failed_every == failed_every - 1
        decoded = DecodedItem(i, None, f"{i:064x}", None if broken else 4032, None if broken else 3024,
                              "corrupt or truncated image" if broken else None, None if broken else meta)  # fmt: skip
        rows.append((WorkItem(facts, None), decoded, None if broken else vector))
    return rows


def fresh_catalog(folder: Path, dim: int) -> tuple[Catalog, IndexLayout]:
    layout = IndexLayout(folder)
    catalog = Catalog(layout.catalog, create=True)
    catalog.set_model_identity(ModelIdentity("bench", None, "bench", dim, 224, {}))
    return catalog, layout


def vector_index(kind: str, space: EmbeddingSpace, rows: int, dim: int) -> VectorIndex | None:
    """None for catalog-only; ivf is trained beforehand on a sample."""
    if kind == "none":
        return None
    if kind == "flat":
        return VectorIndex.create(dim, "flat")
    sample = np.concatenate(list(space.images(20_000, seed=7)))
    index = VectorIndex.build(dim, [(np.arange(-len(sample), 0), sample)], kind, default_params(kind, rows, dim))
    index.remove(np.arange(-len(sample), 0))
    return index


def measure(kind: str, chunk: int, rows: list, space: EmbeddingSpace, dim: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder:
        catalog, layout = fresh_catalog(Path(folder), dim)
        vectors = vector_index(kind, space, len(rows), dim)
        chunks = (rows[start : start + chunk] for start in range(0, len(rows), chunk))
        wall, cpu, writer = time.perf_counter(), time.process_time(), time.thread_time()
        summary = ingest_encoded(catalog, layout, chunks, vectors, save_every_s=1e9)
        wall, cpu, writer = time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - writer
        assert summary.added == len(rows) - summary.failed and catalog.count() == len(rows)
        catalog.close()
    return {
        "index": "catalog-only" if kind == "none" else kind,
        "chunk": chunk,
        "rows": len(rows),
        "wall_rows_per_s": round(len(rows) / wall),
        "cpu_rows_per_s": round(len(rows) / cpu),
        "writer_rows_per_s": round(len(rows) / writer),
    }


def header_rate(files: int = 2000) -> float:
    """Files/s of ``read_image_meta`` on small JPEGs in the page cache (the per-file read the writer does)."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench-headers-") as folder:
        paths = []
        for i in range(files):
            path = Path(folder) / f"{i}.jpg"
            Image.new("RGB", (64, 48), (i % 256, 0, 0)).save(path, quality=80)
            paths.append(path)
        started = time.perf_counter()
        for path in paths:
            read_image_meta(path, 0)
        return files / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, action="append", help="rows per commit (repeatable; default 256, 4096)")
    parser.add_argument("--index", action="append", choices=["none", "flat", "ivf"], help="default: all three")
    parser.add_argument("--dated", action="store_true", help="taken dates over 120 months (bench_scale's rows)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    space = EmbeddingSpace.make(args.dim)
    vectors = np.concatenate(list(space.images(args.rows, seed=1))).astype(np.float16).astype(np.float32)
    rows = encoded_rows(vectors, dated=args.dated)
    results = [
        measure(kind, chunk, rows, space, args.dim)
        for kind in args.index or ["none", "flat", "ivf"]
        for chunk in args.chunk or [256, 4096]
    ]
    headers = header_rate()
    if args.json:
        print(json.dumps({"results": results, "header_files_per_s": round(headers)}, indent=2))
        return
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average before: {load} ({os.cpu_count()} cores)")
    print(f"{'index':>12} {'chunk':>6} {'rows':>8} {'wall rows/s':>12} {'cpu rows/s':>11} {'writer rows/s':>14}"
          f"  goal {GOAL:,} (writer)")  # fmt: skip
    for r in results:
        mark = "ok" if r["writer_rows_per_s"] >= GOAL else "below"
        print(f"{r['index']:>12} {r['chunk']:>6} {r['rows']:>8} {r['wall_rows_per_s']:>12,} {r['cpu_rows_per_s']:>11,}"
              f" {r['writer_rows_per_s']:>14,}  {mark}")  # fmt: skip
    print(f"header facts read per file by a local run's writer: {headers:,.0f} files/s (cached small JPEGs)")


if __name__ == "__main__":
    main()
