"""What filters, keywords and the v2 -> v3 migration cost (issue 14).

    python scripts/bench_query.py                 # 100k catalog rows, 2,000 files for the migration
    python scripts/bench_query.py --size 1000000   # slower to build (several minutes)

Part 1 builds a real catalog of ``--size`` rows (random unit vectors, 512-d; paths, dates, cameras and types spread
like a photo library) and a flat FAISS index over it, then times, median of repeats: the SQL that turns a filter into
allowed ids, the vector search with and without those ids, and the FTS5 keyword ranking. Part 2 writes
``--files`` small JPEGs with EXIF, catalogues them as schema 2, and times the first open that migrates them (header
reads, keyword table fill, one transaction).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from retrieval.store.catalog import Catalog, ImageRow  # noqa: E402
from retrieval.store.filters import Filters, allowed_ids, keyword_ranking, passing  # noqa: E402
from retrieval.store.vectors import VectorIndex  # noqa: E402
from retrieval.unit import unit_rows  # noqa: E402

DIM = 512
CAMERAS = [("Canon", "Canon EOS 80D"), ("Apple", "iPhone 12"), ("Apple", "iPhone 15"), ("SONY", "ILCE-7M3")] + [
    ("Maker", f"Model {i}") for i in range(6)
]
TYPES = ["jpg"] * 6 + ["png"] * 3 + ["heic"]


def median_ms(run, repeats: int = 7) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def build_catalog(path: Path, size: int, rng: np.random.Generator) -> Catalog:
    catalog = Catalog(path, create=True)
    start = np.datetime64("2010-01-01T00:00:00")
    with catalog.session() as session, session.begin():
        for first in range(0, size, 20_000):
            rows = []
            for i in range(first, min(size, first + 20_000)):
                when = str(start + np.timedelta64(int(rng.integers(0, 15 * 365 * 86_400)), "s")).replace("T", " ")
                make, model = CAMERAS[int(rng.integers(len(CAMERAS)))]
                kind = TYPES[int(rng.integers(len(TYPES)))]
                rows.append(
                    {
                        "path": f"/photos/{when[:4]}/{when[:10]}/IMG_{i:06d}.{kind}",
                        "size": 1,
                        "mtime_ns": 1,
                        "status": "ok",
                        "width": int(rng.integers(640, 6000)),
                        "height": int(rng.integers(480, 4000)),
                        "embedding": unit_rows(rng.standard_normal((1, DIM)).astype(np.float32))[0]
                        .astype(np.float16)
                        .tobytes(),
                        "indexed_at": 0.0,
                        "taken_at": when,
                        "date_source": "exif",
                        "camera_make": make,
                        "camera_model": model,
                        "file_type": kind,
                    }
                )
            session.execute(insert(ImageRow), rows)
    return catalog


def bench_search(size: int) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        catalog = build_catalog(Path(folder) / "catalog.sqlite", size, rng)
        built = time.perf_counter() - started
        vectors = VectorIndex.build(DIM, catalog.iter_embeddings(), "flat")
        query = unit_rows(rng.standard_normal((1, DIM)).astype(np.float32))
        print(f"catalog: {size:,} rows written in {built:.1f} s (keyword triggers included)")
        print(f"vector search, no filter, k=10: {median_ms(lambda: vectors.search(query, 10)):.1f} ms")
        cases = {
            "camera=iphone (20%)": Filters(camera="iphone"),
            "type=png (30%)": Filters(types=("png",)),
            "one month (0.6%)": Filters(after="2019-06", before="2019-06"),
            "canon + 2019 + min 4000 px wide": Filters(camera="canon", after="2019", before="2019", min_width=4000),
        }
        for name, filters in cases.items():
            allowed = allowed_ids(catalog, filters)
            sql = median_ms(lambda filters=filters: allowed_ids(catalog, filters))
            search = median_ms(lambda allowed=allowed: vectors.search(query, 10, allowed))
            print(f"filter {name}: {len(allowed):,} allowed; ids {sql:.1f} ms + search {search:.1f} ms")
        for name in ["camera=iphone (20%)", "type=png (30%)"]:
            filters = cases[name]

            def over_fetch(filters=filters):  # the engine's first round for a wide filter, k=10
                scores, ids = vectors.search(query, 40)
                return passing(catalog, [int(i) for i in ids[0]], filters)

            kept = len(over_fetch())
            print(f"filter {name} by over-fetching 40 deep: {kept} pass; {median_ms(over_fetch):.1f} ms in all")
        for text in ["IMG_004123", "2019-06-1", "2019"]:
            hits = keyword_ranking(catalog, text, Filters(), 1000)
            took = median_ms(lambda text=text: keyword_ranking(catalog, text, Filters(), 1000))
            print(f"keywords {text!r}: {len(hits)} hits (limit 1000) in {took:.1f} ms")
        catalog.close()


def bench_migration(files: int) -> None:
    dump = (ROOT / "tests" / "fixtures" / "robust" / "catalog_v2.sql").read_text()
    schema = "\n".join(
        line for line in dump.splitlines() if not line.startswith(('INSERT INTO "images"', 'INSERT INTO "roots"'))
    )
    with tempfile.TemporaryDirectory() as folder:
        photos = Path(folder) / "photos"
        photos.mkdir()
        rng = np.random.default_rng(1)
        rows = []
        for i in range(files):
            path = photos / f"IMG_{i:05d}.jpg"
            tags = Image.Exif()
            tags[0x010F], tags[0x0110] = "Canon", "Canon EOS 80D"
            tags.get_ifd(0x8769)[0x9003] = f"2019:07:{1 + i % 28:02d} 12:00:00"
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, exif=tags, quality=85)
            facts = os.stat(path)
            rows.append((str(path), facts.st_size, facts.st_mtime_ns, 640, 480, "ok", b"\0" * 64, 0.0))
        catalog = Path(folder) / "index" / "catalog.sqlite"
        catalog.parent.mkdir()
        connection = sqlite3.connect(catalog)
        connection.executescript(schema)
        connection.executemany(
            "INSERT INTO images (path, size, mtime_ns, width, height, status, embedding, indexed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        connection.commit()
        connection.close()
        started = time.perf_counter()
        Catalog(catalog).close()
        took = time.perf_counter() - started
        print(f"migration v2 -> v3: {files:,} files in {took:.2f} s ({took / files * 1000:.2f} ms a file, warm cache)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=2000)
    args = parser.parse_args()
    bench_search(args.size)
    bench_migration(args.files)


if __name__ == "__main__":
    main()
