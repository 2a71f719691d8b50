"""Search latency, memory and recall at 10k / 100k / 1M vectors.

    python scripts/bench_search.py                      # 10k, 100k, 1M; flat everywhere, ivf/ivfpq from 100k
    python scripts/bench_search.py --sizes 10k,100k     # quicker

10M and more go through the real writer and auto's build: scripts/bench_scale.py.

Vectors are synthetic but CLIP-like (retrieval.testing: clustered, anisotropic, with a text/image
modality gap), 512-d, rounded to float16 as the catalog stores them. Queries are text-like vectors; "one text query"
latency adds the real encoding of a caption with ViT-B-32's text tower (random weights: same cost as trained ones).
Reported per size and index type: build time, memory (size of the FAISS index, which is what stays resident),
warm latency p50/p99 one query at a time and per query in batches of 64, and recall@10 against exact search.
Approximate types are tuned (nprobe / efSearch / rescoring depth) on half the tuning queries and checked on the
other half ("held-out"); latency and recall@10 are then measured on queries from another distribution (text-like
vectors with more weight on their content: ``EmbeddingSpace.text_queries(content=0.4)``, another seed). ivfpq
candidates are rescored from an in-memory float16 copy here (the engine reads them from the catalog). Each size
also prints the type ``auto`` picks here (``choose_index_type``, with the exact scan timed on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.store.index_types import choose_index_type, default_params, exact_scan_seconds  # noqa: E402
from retrieval.store.tuning import exact_top_k, probe_texts, recall_at_k, tune  # noqa: E402
from retrieval.store.vectors import VectorIndex  # noqa: E402
from retrieval.testing import EmbeddingSpace  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the clipsearch command does (docs/benchmarks.md)

DIM = 512
BATCH = 64
EVAL_CONTENT = 0.4  # measuring queries: another distribution than the tuning ones (0.25)
GOALS_MS = {100_000: 20.0, 1_000_000: 50.0}  # p50 of one text query, encoding included


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 2)


def load_text_encoder(model: str | None, bf16: bool = False):
    """ViT-B-32 with seeded random weights unless --model names one; None with --no-model. ``bf16``: the opt-in
    bfloat16 text tower (`clipsearch search --bf16-text`)."""
    if model == "none":
        return None
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec
    from retrieval.testing import make_random_model_dir

    if model is None:
        import open_clip

        folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipsearch-bench" / "vit-b-32"
        if not (folder / "open_clip_model.safetensors").is_file():
            make_random_model_dir(folder, model_cfg=open_clip.get_model_config("ViT-B-32"), seed=0)
        model = f"local-dir:{folder}"
    if bf16:
        return Encoder.load_text_only(ModelSpec(model, None), bf16=True)
    return Encoder.load(ModelSpec(model, None), CPU)


def time_text_encoding(encoder, captions: list[str]) -> list[float]:
    encoder.encode_texts(captions[:3])  # warm up
    times = []
    for caption in captions:
        started = time.perf_counter()
        encoder.encode_texts([caption])
        times.append(time.perf_counter() - started)
    return times


def single_query_times(index: VectorIndex, queries: np.ndarray, encoder, captions: list[str]):
    """Warm, one at a time: (search only, text encoding + search) per query."""
    index.search(queries[:3], 10)
    search, total = [], []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        if encoder is not None:
            encoder.encode_texts([captions[i % len(captions)]])
        encoded = time.perf_counter()
        index.search(query[None, :], 10)
        done = time.perf_counter()
        search.append(done - encoded)
        total.append(done - started)
    return search, total


def batched_ms_per_query(index: VectorIndex, queries: np.ndarray) -> float:
    started = time.perf_counter()
    for start in range(0, len(queries), BATCH):
        index.search(queries[start : start + BATCH], 10)
    return round((time.perf_counter() - started) / len(queries) * 1000, 3)


def bench_size(n: int, types: list[str], space: EmbeddingSpace, args, encoder, captions) -> list[dict]:
    print(f"\n== {n:,} vectors ==", flush=True)
    started = time.perf_counter()
    vectors = space.all_images(n, seed=11).astype(np.float16).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) + 1
    queries = space.text_queries(args.queries, seed=12)  # tuning
    others = space.text_queries(args.queries, seed=13, content=EVAL_CONTENT)  # measuring: another distribution
    print(f"generated in {time.perf_counter() - started:.1f} s", flush=True)
    blocks = [(ids[i : i + 50_000], vectors[i : i + 50_000]) for i in range(0, n, 50_000)]
    exact = (exact_top_k(blocks, queries), others, exact_top_k(blocks, others))
    auto = choose_index_type(n, DIM)
    print(f"auto picks {auto} here (exact scan {exact_scan_seconds(DIM) * n * 1000:.1f} ms a query, timed)")
    rows = []
    for index_type in types:
        if index_type == "hnsw" and n > args.hnsw_max:
            continue
        if index_type in ("ivf", "ivfpq") and n < args.ivf_min:
            continue
        rows.append(bench_type(index_type, n, ids, vectors, queries, exact, encoder, captions, args))
    return rows


def bench_type(index_type, n, ids, vectors, queries, exact, encoder, captions, args) -> dict:
    started = time.perf_counter()
    chunks = [(ids[i : i + 100_000], vectors[i : i + 100_000]) for i in range(0, n, 100_000)]
    index = VectorIndex.build(DIM, chunks, index_type, default_params(index_type, n, DIM))
    build_s = time.perf_counter() - started
    tuned = None
    if index_type != "flat":
        stored = vectors.astype(np.float16)
        index.rescore_source = lambda wanted: stored[np.asarray(wanted) - 1].astype(np.float32)
        tuned = tune(index, queries, exact[0], "text")
    row = measure(index, index_type, n, build_s, exact[1], exact[2], encoder, captions, tuned)
    print(json.dumps(row), flush=True)
    return row


def measure(index: VectorIndex, index_type: str, n: int, build_s: float, queries, exact, encoder, captions, tuned):
    """One result row: latency (alone and with text encoding), batched cost, memory and recall@10."""
    search, total = single_query_times(index, queries, encoder, captions)
    found = np.concatenate([index.search(q[None, :], 10)[1] for q in queries])
    return {
        "vectors": n,
        "index_type": index_type,
        "build_s": round(build_s, 1),
        "memory_mb": round(index_bytes(index) / 1e6, 1),
        "search_p50_ms": percentile_ms(search, 50),
        "search_p99_ms": percentile_ms(search, 99),
        "text_query_p50_ms": percentile_ms(total, 50) if encoder is not None else None,
        "text_query_p99_ms": percentile_ms(total, 99) if encoder is not None else None,
        "batched_ms_per_query": batched_ms_per_query(index, queries),
        "recall_at_10": round(recall_at_k(found, exact), 4),
        "held_out_recall_at_10": tuned.recall if tuned else None,
        "search_effort": tuned.effort if tuned else None,
        "rescore_depth": tuned.rescore if tuned and index_type == "ivfpq" else None,
        "load": os.getloadavg()[0],
    }


def index_bytes(index: VectorIndex) -> int:
    import faiss

    return int(faiss.serialize_index(index.index).nbytes)


def bench_cold(n: int, space: EmbeddingSpace, model: str | None, args) -> dict:
    """The commands from process start to printed results on an index of ``n`` images: a catalog filled with
    synthetic embeddings under the bench model's identity (no encoding), its text tower exported to ONNX (unless
    --no-export: the torch path), then each command ``--cold-runs`` times in a fresh process, with its CPU time
    and peak resident memory. ``--reuse-index`` times an index built by an earlier run instead."""
    if args.reuse_index:
        index_dir, photos = args.reuse_index, args.reuse_index.parent / "photos"
    else:
        index_dir, photos = build_cold_index(n, space, model, args)
    row = {"vectors": n, "index_dir": str(index_dir), "text_tower": None}
    if not args.no_export:
        from indexer.text_export import export_text_tower

        started = time.perf_counter()
        report = export_text_tower(index_dir, precision=args.text_precision)
        print(f"{report.line()} in {time.perf_counter() - started:.0f} s", flush=True)
        row["text_tower"] = report.record.precision
        row["int8_overlap"] = report.record.int8_overlap
        row |= warm_engine_query(index_dir)
    commands = {
        "search": ["search", "a dog on a beach at sunset"],
        "similar": ["similar", str(photos / f"{0:08d}.jpg")],
        "info": ["info"],
    }
    for name, command in commands.items():
        seconds, cpu, peak = [], [], 0
        for _ in range(args.cold_runs):
            elapsed, used, rss = run_cold([*command, "--index", str(index_dir)])
            seconds.append(elapsed)
            cpu.append(used)
            peak = max(peak, rss)
        row[f"cold_{name}_s"] = {"median": round(float(np.median(seconds)), 3), "min": round(min(seconds), 3),
                                 "max": round(max(seconds), 3), "cpu_median": round(float(np.median(cpu)), 3),
                                 "runs": len(seconds)}  # fmt: skip
        row[f"cold_{name}_peak_mib"] = round(peak / 1024, 1)
    row["load"] = os.getloadavg()[0]
    print(json.dumps(row), flush=True)
    return row


def build_cold_index(n: int, space: EmbeddingSpace, model: str | None, args) -> tuple[Path, Path]:
    """An index folder of ``n`` synthetic images (no encoding) and its photos folder, where only the first
    image's file exists (`similar` takes it by path)."""
    import tempfile

    from sqlalchemy import insert

    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec
    from retrieval.store.catalog import STATUS_OK, Catalog, ImageRow, encode_embedding
    from retrieval.store.layout import IndexLayout
    from retrieval.store.sync import open_vectors, save_vectors

    spec_name = load_text_encoder(model).identity.name if model != "none" else None
    identity = Encoder.load_text_only(ModelSpec(spec_name, None)).identity
    scratch = Path(tempfile.mkdtemp(prefix="bench-cold-", dir=args.scratch))
    index_dir, photos = scratch / "index", scratch / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 120, 40)).save(photos / f"{0:08d}.jpg")
    layout = IndexLayout(index_dir)
    catalog = Catalog(layout.catalog, create=True)
    started = time.perf_counter()
    catalog.set_model_identity(identity)
    catalog.add_roots([str(photos)])
    row_id = 0
    for block in space.images(n, seed=21, chunk=50_000):
        rows = [
            {"path": f"{photos}/{row_id + i:08d}.jpg", "size": 1, "mtime_ns": 1, "status": STATUS_OK,
             "embedding": encode_embedding(v), "width": 4000, "height": 3000}
            for i, v in enumerate(block)
        ]  # fmt: skip
        row_id += len(rows)
        with catalog.session() as session, session.begin():
            session.execute(insert(ImageRow), rows)
            catalog.bump_generation(session)
    vectors = open_vectors(catalog, layout, identity.embed_dim, persist=False)
    save_vectors(catalog, layout, vectors, catalog.vectors_generation())
    catalog.close()
    print(f"cold-start index of {n:,} images built in {time.perf_counter() - started:.0f} s", flush=True)
    return index_dir, photos


COLD_CHILD = """
import atexit, os, sys
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss would include the forked bench process)
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    os.write(2, f"\\nPEAK_KIB {line.split()[1]}\\n".encode())
atexit.register(peak)
from clipsearch.launch import main  # the command as installed
main()
"""


def run_cold(arguments: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak resident KiB) of one `clipsearch` command in a fresh process. CPU time
    moves far less with the machine's load than wall time does."""
    import subprocess

    command = [sys.executable, "-c", COLD_CHILD, *arguments]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    errors = process.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"{' '.join(arguments)} failed: {errors}")
    peak = int(errors.rsplit("PEAK_KIB", 1)[1].split()[0])
    return elapsed, usage.ru_utime + usage.ru_stime, peak


def warm_engine_query(index_dir: Path, repeats: int = 200) -> dict:
    """Warm text queries through the engine as `clipsearch serve` runs them: exported tower + flat scan + rows."""
    from indexer.text_export import probe_captions
    from retrieval.search.engine import SearchEngine

    captions = probe_captions()
    with SearchEngine(index_dir, device="cpu") as engine:
        for caption in captions[:5]:
            engine.search_text(caption, k=10)
        times, cpu = [], []
        for i in range(repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            engine.search_text(captions[i % len(captions)], k=10)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    return {
        "warm_text_query_p50_ms": percentile_ms(times, 50),
        "warm_text_query_p99_ms": percentile_ms(times, 99),
        "warm_text_query_cpu_p50_ms": percentile_ms(cpu, 50),  # all threads: less moved by the load than wall time
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10k,100k,1M")
    parser.add_argument("--types", default="flat,ivf,ivfpq,hnsw")
    parser.add_argument("--queries", type=int, default=200, help="text-like queries per measurement")
    parser.add_argument("--model", default=None, help="text encoder (default: random ViT-B-32; none: skip)")
    parser.add_argument("--hnsw-max", type=parse_size, default=100_000, help="largest size to build hnsw at")
    parser.add_argument("--ivf-min", type=parse_size, default=100_000, help="smallest size to build ivf types at")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the --cold index")
    parser.add_argument("--cold", type=parse_size, default=0, help="also time `clipsearch search` cold at this size")
    parser.add_argument("--cold-runs", type=int, default=10, help="fresh processes per cold command")
    parser.add_argument("--reuse-index", type=Path, default=None, help="cold runs on an index --cold built before")
    parser.add_argument("--no-export", action="store_true", help="cold runs without the ONNX text tower (torch)")
    parser.add_argument("--text-precision", default="auto", help="exported text tower: auto, int8 or float32")
    parser.add_argument("--threads", type=int, default=None, help="torch/FAISS threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="write all rows here")
    parser.add_argument("--bf16-text", action="store_true", help="encode queries with the bfloat16 text tower")
    args = parser.parse_args()

    import faiss
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__}")
    captions = probe_texts()
    encoder = load_text_encoder(args.model, args.bf16_text)
    if encoder is not None:
        encode = time_text_encoding(encoder, captions)
        print(f"text encoding, one caption: p50 {percentile_ms(encode, 50)} ms, p99 {percentile_ms(encode, 99)} ms")
    space = EmbeddingSpace.make(DIM, clusters=2000, seed=0)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    rows = []
    for n in [parse_size(s) for s in args.sizes.split(",") if s.strip()]:
        rows.extend(bench_size(n, types, space, args, encoder, captions))
    cold = bench_cold(args.cold, space, args.model, args) if args.cold else None
    print("\nvectors     type    build s  memory MB  search p50/p99 ms  text query p50/p99 ms  batched ms/q  recall@10")
    for r in rows:
        goal = GOALS_MS.get(r["vectors"])
        verdict = "" if goal is None or r["index_type"] != "flat" else f"  (goal p50 <= {goal:.0f} ms)"
        text = f"{r['text_query_p50_ms']}/{r['text_query_p99_ms']}" if r["text_query_p50_ms"] is not None else "-"
        print(
            f"{r['vectors']:>10,}  {r['index_type']:<6} {r['build_s']:>8} {r['memory_mb']:>10}  "
            f"{r['search_p50_ms']:>7}/{r['search_p99_ms']:<9} {text:>21}  {r['batched_ms_per_query']:>12}  "
            f"{r['recall_at_10']:.3f}{verdict}"
        )
    if cold:
        for name in ("search", "similar", "info"):
            print(f"clipsearch {name}, cold, {cold['vectors']:,} images (text tower: {cold['text_tower'] or 'torch'}): "
                  f"{cold[f'cold_{name}_s']} s, peak {cold[f'cold_{name}_peak_mib']} MiB")  # fmt: skip
        if "warm_text_query_p50_ms" in cold:
            print(f"warm text query through the engine, p50/p99: {cold['warm_text_query_p50_ms']}/"
                  f"{cold['warm_text_query_p99_ms']} ms (CPU p50 {cold['warm_text_query_cpu_p50_ms']} ms)")  # fmt: skip
    print(f"load after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cold": cold}, indent=2) + "\n")


if __name__ == "__main__":
    main()
