"""A catalog of millions of images through the real writer, then auto's index, measured: the issue 29 table.

    python scripts/bench_scale.py --dir /work/big/scale --rows 10M --stage ingest    # long: run it at nice 19
    python scripts/bench_scale.py --dir /work/big/scale --stage exact                # only after a stopped ingest
    python scripts/bench_scale.py --dir /work/big/scale --stage build                # auto's choice, tuned
    python scripts/bench_scale.py --dir /work/big/scale --stage retune               # tune the built index again
    python scripts/bench_scale.py --dir /work/big/scale --stage measure              # latency: under the bench lock
    python scripts/bench_scale.py --dir /work/big/scale --stage table                # the markdown table

Each stage runs in its own process (its peak RSS is that stage's) and writes ``DIR/STAGE.json``.

ingest   synthetic CLIP-like 512-d vectors (``retrieval.testing.EmbeddingSpace``), rows as a cluster streams them
         back (``scripts/bench_ingest.py``: taken dates over 120 months, one broken file in 500), committed by
         ``indexer.pipeline.ingest_encoded`` without a FAISS index (what a run that ends as another type does);
         meanwhile the exact top-10 of 1,000 evaluation queries is found by brute force over the same float16
         vectors. Reported: writer time alone (generation and brute force excluded), catalog bytes on disk.
build    ``auto``'s choice for this size (``indexer.reindex.planned_type``) built by ``rebuild_as`` as a run ends,
         tuned on 120 text-like probes (``content`` 0.25): build seconds, CPU seconds, peak RSS, file bytes.
measure  in a fresh process: the index opened memory-mapped as ``clipsearch search`` opens it (``SearchEngine``),
         1,000 evaluation queries from another distribution (``content`` 0.4, another seed) one at a time:
         recall@10 against the exact top-10, warm p50/p99; the cold open + first query in fresh processes; a
         one-month filtered query (``--after 2021-03 --before 2021-03``).
duplicates  ``clipsearch duplicates``'s candidate pass (``retrieval.search.duplicates.candidate_pairs`` at the
         default cosine) over the catalog: wall, CPU, peak RSS, pairs; recall of the planted copies (ingest
         ``--copies``) and of every pair at the threshold of 500 sampled rows, found by brute force.
filter   the one-month filtered query (as ``measure``), both ways in one process, alternating: every allowed
         vector fetched from the catalog and scored exactly (how a filter under 20,000 images was searched before
         issue 29's round 4) and the FAISS selector with nprobe scaled by the share let through (now): p50/p99,
         and recall@10 against the exact top-10 of the allowed images. Needs ``build``.
check    ``clipsearch check`` (``indexer.check.check_index``): wall, CPU, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the clipsearch command does (docs/benchmarks.md)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_ingest import encoded_rows, fresh_catalog  # noqa: E402

from retrieval.testing import EmbeddingSpace  # noqa: E402

DIM = 512
TUNE_SEED, EVAL_SEED = 5, 6
TUNE_CONTENT, EVAL_CONTENT = 0.25, 0.4  # two distributions of text-like queries
FAILED_EVERY = 500
MONTH = ("2021-03", "2021-03")
COLD_RUNS = 5


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def space() -> EmbeddingSpace:
    return EmbeddingSpace.make(DIM, clusters=2000, seed=0)


def tune_queries() -> np.ndarray:
    return space().text_queries(120, seed=TUNE_SEED, content=TUNE_CONTENT)


def eval_queries(n: int = 1000) -> np.ndarray:
    return space().text_queries(n, seed=EVAL_SEED, content=EVAL_CONTENT)


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def disk_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def stage_ingest(args) -> dict:
    from indexer.pipeline import ingest_encoded
    from retrieval.store.topk import empty_top_k, merge_top_k, pad_top_k

    index_dir = args.dir / "index"
    if index_dir.exists():
        raise SystemExit(f"{index_dir} exists: remove it first")
    catalog, layout = fresh_catalog(index_dir, DIM)
    queries = eval_queries()
    best = empty_top_k(len(queries))
    rng, planted = np.random.default_rng(9), []
    aside = {"wall": 0.0, "thread": 0.0}  # time spent making rows and the exact top-10, on the writing thread

    def chunks():
        nonlocal best
        first = 0
        for block in space().images(args.rows, seed=1, chunk=args.chunk):
            wall, thread = time.perf_counter(), time.thread_time()
            positions = np.arange(first, first + len(block))
            ok = positions % FAILED_EVERY != FAILED_EVERY - 1  # encoded_rows' broken files
            planted.append(plant_copies(block, ok, args.copies, rng) + first + 1)  # ids follow positions
            stored = block.astype(np.float16).astype(np.float32)  # as the catalog keeps them
            best = merge_top_k(best, queries @ stored[ok].T, positions[ok] + 1, 10)  # ids follow positions
            rows = encoded_rows(stored, FAILED_EVERY, first, dated=True)
            first += len(block)
            aside["wall"] += time.perf_counter() - wall
            aside["thread"] += time.thread_time() - thread
            yield rows
            if first % 1_000_000 < args.chunk:
                print(f"{first:,} rows, {time.strftime('%H:%M:%S')}", flush=True)

    wall, cpu, thread = time.perf_counter(), cpu_s(), time.thread_time()
    summary = ingest_encoded(catalog, layout, chunks(), None, save_every_s=1e9)
    wall, cpu, thread = time.perf_counter() - wall, cpu_s() - cpu, time.thread_time() - thread
    catalog.close()
    np.save(args.dir / "exact.npy", pad_top_k(best, 10)[1])
    np.save(args.dir / "copies.npy", np.concatenate(planted))
    writer_wall, writer_cpu = wall - aside["wall"], thread - aside["thread"]
    return {
        "rows": args.rows,
        "added": summary.added,
        "failed": summary.failed,
        "chunk": args.chunk,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "writer_wall_s": round(writer_wall, 1),
        "writer_cpu_s": round(writer_cpu, 1),
        "writer_rows_per_s_wall": round(args.rows / writer_wall),
        "writer_rows_per_s_cpu": round(args.rows / writer_cpu),
        "catalog_bytes": disk_bytes(index_dir),
        "peak_rss_mib": peak_rss_mib(),
    }


def plant_copies(block: np.ndarray, ok: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Overwrite ``share`` of the block's rows with near copies of other rows of it (re-encodes and crops:
    cosines about 0.90 to 0.998, as scripts/bench_hostile.py plants them), the copies before or after their
    originals; returns the (original, copy) positions."""
    count = int(len(block) * share)
    if count == 0:
        return np.zeros((0, 2), dtype=np.int64)
    chosen = rng.choice(np.flatnonzero(ok), size=2 * count, replace=False)
    originals, copies = chosen[:count], chosen[count:]
    noise = rng.uniform(0.003, 0.02, (count, 1)) * rng.standard_normal((count, block.shape[1]))
    moved = block[originals] + noise.astype(np.float32)
    block[copies] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    return np.stack([originals, copies], axis=1)


def stage_duplicates(args) -> dict:
    from retrieval.search.duplicate_defaults import DEFAULT_THRESHOLD
    from retrieval.search.duplicates import candidate_pairs
    from retrieval.store.catalog import STATUS_OK, Catalog
    from retrieval.store.layout import IndexLayout
    from retrieval.store.sync import fetch_vectors

    catalog = Catalog(IndexLayout(args.dir / "index").catalog, create=False)
    wall, cpu = time.perf_counter(), cpu_s()
    pairs = candidate_pairs(catalog, DEFAULT_THRESHOLD)
    wall, cpu, rss = time.perf_counter() - wall, cpu_s() - cpu, peak_rss_mib()
    found = set(zip(pairs.first.tolist(), pairs.second.tolist()))
    planted = np.load(args.dir / "copies.npy") if (args.dir / "copies.npy").is_file() else np.zeros((0, 2))
    planted = {(int(min(a, b)), int(max(a, b))) for a, b in planted}
    sample_ids, _ = catalog.sample_embeddings(500, seed=3)
    sample = fetch_vectors(catalog, sample_ids)
    exact = set()
    for ids, vectors in catalog.iter_embeddings():
        rows, columns = np.nonzero(sample @ vectors.T >= DEFAULT_THRESHOLD)
        exact |= {(min(a, b), max(a, b)) for a, b in zip(sample_ids[rows].tolist(), ids[columns].tolist()) if a != b}
    row = {
        "vectors": catalog.count(STATUS_OK),
        "threshold": DEFAULT_THRESHOLD,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mib": rss,
        "pairs": len(found),
        "planted_copies": len(planted),
        "planted_recall": round(len(found & planted) / len(planted), 4) if planted else None,
        "sample_exact_pairs": len(exact),
        "sample_recall": round(len(found & exact) / len(exact), 4) if exact else None,
    }
    catalog.close()
    return row


def stage_filter(args) -> dict:
    import retrieval.store.vectors as vector_module
    from retrieval.search.engine import SearchEngine
    from retrieval.store.filters import Filters, allowed_ids
    from retrieval.store.sync import fetch_vectors
    from retrieval.store.topk import top_k
    from retrieval.store.tuning import recall_at_k

    queries = eval_queries(100)
    ways = {"exact_from_catalog": 1 << 62, "selector": vector_module.EXACT_FILTER_LIMIT}
    row: dict = {"load_before": os.getloadavg()[0]}
    with SearchEngine(args.dir / "index", device="cpu") as engine:
        filters = engine._resolved(Filters(after=MONTH[0], before=MONTH[1]))
        allowed_times = []
        for _ in range(20):
            wall = time.perf_counter()
            allowed = allowed_ids(engine.catalog, filters)
            allowed_times.append(time.perf_counter() - wall)
        exact = top_k(queries @ fetch_vectors(engine.catalog, allowed).T, 10, allowed)[1]  # not timed
        times: dict[str, list[float]] = {way: [] for way in ways}
        found: dict[str, list[np.ndarray]] = {way: [] for way in ways}
        for limit in ways.values():  # warm: the catalog's pages and the index's lists read once
            vector_module.EXACT_FILTER_LIMIT = limit
            for query in eval_queries(5 + len(queries))[-5:]:
                engine._filtered_search(query[None, :], 10, filters)
        for query in queries:
            for way, limit in ways.items():
                vector_module.EXACT_FILTER_LIMIT = limit
                wall = time.perf_counter()
                _, ids = engine._filtered_search(query[None, :], 10, filters)
                times[way].append(time.perf_counter() - wall)
                found[way].append(np.pad(ids, (0, 10 - len(ids)), constant_values=-1))
        row |= {"index_type": engine.vectors.index_type, "vectors": len(engine.vectors), "allowed": len(allowed)}
    row["allowed_ids_p50_ms"] = _ms(allowed_times, 50)
    for way in ways:
        row |= {
            f"{way}_p50_ms": _ms(times[way], 50),
            f"{way}_p99_ms": _ms(times[way], 99),
            f"{way}_recall_at_10": round(recall_at_k(np.stack(found[way]), exact), 4),
        }
    return row | {"load_after": os.getloadavg()[0], "peak_rss_mib": peak_rss_mib()}


def stage_check(args) -> dict:
    from indexer.check import check_index

    wall, cpu = time.perf_counter(), cpu_s()
    report = check_index(args.dir / "index")
    return {
        "healthy": report.healthy,
        "images": report.images,
        "problems": report.problems[:3],
        "notices": report.notices[:3],
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(cpu_s() - cpu, 1),
        "peak_rss_mib": peak_rss_mib(),
    }


def stage_exact(args) -> dict:
    """The exact top-10 of the evaluation queries by brute force over the catalog's stored vectors (for a catalog
    whose ingest was stopped before its end: ingest writes them only when it finishes)."""
    from retrieval.store.catalog import STATUS_OK, Catalog
    from retrieval.store.layout import IndexLayout
    from retrieval.store.tuning import exact_top_k

    catalog = Catalog(IndexLayout(args.dir / "index").catalog, create=False)
    wall, cpu = time.perf_counter(), cpu_s()
    np.save(args.dir / "exact.npy", exact_top_k(catalog.iter_embeddings(), eval_queries()))
    row = {"vectors": catalog.count(STATUS_OK), "catalog_bytes": disk_bytes(args.dir / "index")}
    catalog.close()
    return row | {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_s() - cpu, 1)}


def stage_build(args) -> dict:
    from indexer.reindex import planned_type, rebuild_as
    from retrieval.model.device import CPU
    from retrieval.store.catalog import Catalog, MetaKey
    from retrieval.store.index_types import choose_index_type
    from retrieval.store.layout import IndexLayout
    from retrieval.store.write_lock import write_lock

    layout = IndexLayout(args.dir / "index")
    wall, cpu = time.perf_counter(), cpu_s()
    with write_lock(layout, True):
        catalog = Catalog(layout.catalog, create=False)
        auto = planned_type(catalog, DIM)
        chosen = args.index_type or auto
        summary = rebuild_as(catalog, layout, chosen, CPU, probes=(tune_queries(), "text"))
        catalog.close()
    print(summary.line(), flush=True)
    return {
        "auto_choice": auto,
        "auto_choice_at_10m": choose_index_type(10_000_000, DIM),
        "index_type": summary.index_type,
        "params": json.loads(_meta(layout, MetaKey.PARAMS) or "{}"),
        "build_wall_s": round(time.perf_counter() - wall, 1),
        "build_cpu_s": round(cpu_s() - cpu, 1),
        "faiss_file_bytes": summary.file_bytes,
        "tuned_recall": summary.recall.recall if summary.recall else None,
        "search_effort": summary.recall.effort if summary.recall else None,
        "rescore_depth": summary.recall.rescore if summary.recall else None,
        "note": summary.note,
        "peak_rss_mib": peak_rss_mib(),
    }


def stage_retune(args) -> dict:
    """Tune the built index again with the current tuning code, its vectors unchanged (a build at 10M takes ~20
    minutes here; the tuning is what changes between runs)."""
    from retrieval.store.catalog import STATUS_OK, Catalog
    from retrieval.store.layout import IndexLayout
    from retrieval.store.sync import attach_catalog, record_build, save_vectors
    from retrieval.store.tuning import exact_top_k, tune
    from retrieval.store.vectors import VectorIndex
    from retrieval.store.write_lock import write_lock

    layout = IndexLayout(args.dir / "index")
    wall, cpu = time.perf_counter(), cpu_s()
    with write_lock(layout, True):
        catalog = Catalog(layout.catalog, create=False)
        index = attach_catalog(VectorIndex.load(layout.vectors), catalog)
        before = {"search_effort_before": index.search_effort(), "rescore_before": index.params.rescore}
        report = tune(index, tune_queries(), exact_top_k(catalog.iter_embeddings(), tune_queries()), "text")
        save_vectors(catalog, layout, index, catalog.vectors_generation())
        record_build(catalog, index, catalog.count(STATUS_OK), report)
        catalog.close()
    return before | {
        "tuned_recall": report.recall,
        "search_effort": report.effort,
        "rescore_depth": report.rescore,
        "retune_wall_s": round(time.perf_counter() - wall, 1),
        "retune_cpu_s": round(cpu_s() - cpu, 1),
        "peak_rss_mib": peak_rss_mib(),
    }


def _meta(layout, key: str) -> str | None:
    from retrieval.store.catalog import Catalog

    catalog = Catalog(layout.catalog, create=False)
    try:
        return catalog.get_meta(key)
    finally:
        catalog.close()


COLD_CHILD = """
import json, sys, time
started = time.perf_counter()
from retrieval.search.engine import SearchEngine
import numpy as np
imported = time.perf_counter()
engine = SearchEngine(sys.argv[1], device="cpu")
query = np.load(sys.argv[2])[:1]
engine.vectors.search(query, 10)
done = time.perf_counter()
print(json.dumps({"import_s": imported - started, "open_and_query_s": done - imported}))
"""


def stage_measure(args) -> dict:
    from retrieval.search.engine import SearchEngine
    from retrieval.store.filters import Filters
    from retrieval.store.tuning import recall_at_k

    queries, exact = eval_queries(), np.load(args.dir / "exact.npy")
    np.save(args.dir / "one_query.npy", queries[:1])
    cold = []
    for _ in range(COLD_RUNS):
        out = subprocess.run(
            [sys.executable, "-c", COLD_CHILD, str(args.dir / "index"), str(args.dir / "one_query.npy")],
            cwd=ROOT, capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        cold.append(json.loads(out.stdout.strip().splitlines()[-1]))
    row: dict = {"vectors_file_mapped": True, "load_before": os.getloadavg()[0]}
    with SearchEngine(args.dir / "index", device="cpu") as engine:
        vectors = engine.vectors
        row |= {"index_type": vectors.index_type, "vectors": len(vectors), "effort": vectors.search_effort()}
        for query in queries[:20]:
            vectors.search(query[None, :], 10)
        times, cpu, found = [], [], []
        for query in queries:
            wall, used = time.perf_counter(), time.process_time()
            found.append(vectors.search(query[None, :], 10)[1][0])
            times.append(time.perf_counter() - wall)
            cpu.append(time.process_time() - used)
        filters = Filters(after=MONTH[0], before=MONTH[1])
        filtered = []
        resolved = engine._resolved(filters)
        for query in queries[:50]:
            wall = time.perf_counter()
            _, ids = engine._filtered_search(query[None, :], 10, resolved)
            filtered.append(time.perf_counter() - wall)
        allowed = len(_allowed(engine, resolved))
    row |= {
        "recall_at_10": round(recall_at_k(np.stack(found), exact), 4),
        "queries": len(queries),
        "warm_p50_ms": _ms(times, 50),
        "warm_p99_ms": _ms(times, 99),
        "warm_cpu_p50_ms": _ms(cpu, 50),
        "cold_open_and_query_p50_s": round(float(np.median([c["open_and_query_s"] for c in cold])), 3),
        "cold_import_p50_s": round(float(np.median([c["import_s"] for c in cold])), 3),
        "filtered_month_images": allowed,
        "filtered_p50_ms": _ms(filtered, 50),
        "filtered_p99_ms": _ms(filtered, 99),
        "load_after": os.getloadavg()[0],
        "peak_rss_mib": peak_rss_mib(),
    }
    return row


def _allowed(engine, filters):
    from retrieval.store.filters import allowed_ids

    return allowed_ids(engine.catalog, filters)


def _ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 2)


def stage_table(args) -> str:
    done = {name: json.loads((args.dir / f"{name}.json").read_text()) for name in STAGES
            if (args.dir / f"{name}.json").is_file()}  # fmt: skip
    lines = ["| measure | value |", "|---|---|"]
    for stage, values in done.items():
        lines += [f"| {stage}: {key} | {value} |" for key, value in values.items()]
    return "\n".join(lines)


STAGES = {
    "ingest": stage_ingest,
    "exact": stage_exact,
    "build": stage_build,
    "retune": stage_retune,
    "measure": stage_measure,
    "duplicates": stage_duplicates,
    "filter": stage_filter,
    "check": stage_check,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="working folder (the catalog goes in DIR/index)")
    parser.add_argument("--rows", type=parse_size, default=10_000_000)
    parser.add_argument("--chunk", type=int, default=16_384, help="rows per commit")
    parser.add_argument("--stage", choices=[*STAGES, "table"], required=True)
    parser.add_argument("--index-type", default=None, help="build this type instead of auto's choice")
    parser.add_argument("--copies", type=float, default=0.0, help="ingest: share of rows that are near copies")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.stage == "table":
        print(stage_table(args))
        return
    row = STAGES[args.stage](args) | {"load_end": os.getloadavg()[0], "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    (args.dir / f"{args.stage}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
