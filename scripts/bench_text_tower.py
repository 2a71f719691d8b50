"""The exported text tower: what int8 costs in recall, and what each tower costs per query and at start-up.

    python scripts/bench_text_tower.py            # shapes-clip recall + ViT-B-32 (random weights) speed, ~5 min

1. Recall: data/models/shapes-clip indexes the held-out test split of data/samples (200 images, 1,000 captions);
   text->image recall@1/5/10 with the torch tower, the float32 ONNX export and the int8 one, and the int8 top-10
   overlap with float32 on the 200 probe captions (indexer.text_export.probe_captions) and the test captions.
2. Speed: ViT-B-32 with seeded random weights (same cost as trained ones), exported as float32 and int8: session
   load, warm encoding of one caption (p50), and the resident memory of a process that loads it and encodes once.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.pipeline import IndexSettings, index_paths  # noqa: E402
from indexer.text_export import export_text_tower, probe_captions  # noqa: E402
from retrieval.model.encoder import Encoder  # noqa: E402
from retrieval.model.spec import ModelSpec  # noqa: E402
from retrieval.model.text_onnx import OnnxTextEncoder, TextTowerRecord, graph_files  # noqa: E402
from retrieval.store.catalog import Catalog, MetaKey  # noqa: E402
from retrieval.store.layout import IndexLayout  # noqa: E402
from retrieval.store.topk import top_k  # noqa: E402
from retrieval.store.tuning import recall_at_k  # noqa: E402

SHAPES = ROOT / "data" / "models" / "shapes-clip"
SAMPLES = ROOT / "data" / "samples"


def tower(index_dir: Path) -> OnnxTextEncoder:
    catalog = Catalog(IndexLayout(index_dir).catalog)
    record = TextTowerRecord.from_json(catalog.get_meta(MetaKey.TEXT_TOWER))
    catalog.close()
    return OnnxTextEncoder(index_dir / record.folder, record)


def top_ids(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return top_k(queries @ database.T, k)[1]


def overlap(database: np.ndarray, a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of ``a``'s top-k that ``b`` finds too."""
    return recall_at_k(top_ids(database, b, k), top_ids(database, a, k))


def recall(database: np.ndarray, owners: np.ndarray, queries: np.ndarray) -> dict:
    ranked = top_ids(database, queries, 10)
    return {f"R@{k}": round(float(np.mean([o in r[:k] for o, r in zip(owners, ranked)])), 4) for k in (1, 5, 10)}


def shapes_recall(work: Path) -> dict:
    dataset = json.loads((SAMPLES / "dataset.json").read_text())
    test = [image for image in dataset["images"] if image["split"] == "test"]
    folder = work / "shapes-test"
    folder.mkdir()
    for image in test:
        os.symlink(SAMPLES / "images" / image["filename"], folder / image["filename"])
    spec = ModelSpec(f"local-dir:{SHAPES}", None)
    index_dir = work / "shapes-index"
    index_paths(index_dir, [folder], IndexSettings(model=spec, workers=0, export_text=False), progress=False)
    from retrieval.search.engine import SearchEngine

    with SearchEngine(index_dir, device="cpu") as engine:
        database = engine.vectors_for_paths([folder / image["filename"] for image in test])
    captions = [s["raw"] for image in test for s in image["sentences"]]
    owners = np.array([i for i, image in enumerate(test) for _ in image["sentences"]])
    probes = probe_captions()
    by_torch = Encoder.load_text_only(spec).encode_texts(captions)
    float_report = export_text_tower(index_dir, precision="float32").record
    as_float = tower(index_dir)
    float_captions, float_probes = as_float.encode_texts(captions), as_float.encode_texts(probes)
    int8_report = export_text_tower(index_dir, precision="int8", force=True).record
    as_int8 = tower(index_dir)
    int8_captions, int8_probes = as_int8.encode_texts(captions), as_int8.encode_texts(probes)
    return {
        "images": len(test),
        "captions": len(captions),
        "recall_torch": recall(database, owners, by_torch),
        "recall_onnx_float32": recall(database, owners, float_captions),
        "recall_onnx_int8": recall(database, owners, int8_captions),
        "float32_min_cosine_vs_torch": float_report.min_cosine,
        "int8_min_cosine_vs_float32": round(float(np.min(np.sum(float_captions * int8_captions, axis=1))), 4),
        "int8_top10_overlap_probes": round(overlap(database, float_probes, int8_probes), 4),
        "int8_top10_overlap_captions": round(overlap(database, float_captions, int8_captions), 4),
        "int8_overlap_recorded_at_export": int8_report.int8_overlap,
    }


SPEED_CHILD = """
import json, sys, time
started = time.perf_counter()
def peak_kib():  # VmHWM: this process's own peak (ru_maxrss would include the forked parent)
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])
from pathlib import Path
from retrieval.model.text_onnx import OnnxTextEncoder, TextTowerRecord
folder = Path(sys.argv[1])
tower = OnnxTextEncoder(folder, TextTowerRecord(folder.name, "", "", ""))
loaded = time.perf_counter()
tower.encode_texts(["a dog on a beach at sunset"])
first = time.perf_counter()
times = []
for i in range(100):
    t = time.perf_counter()
    tower.encode_texts([f"a photo of a dog number {i} on a beach"])
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"import_and_load_s": round(loaded - started, 3), "first_query_ms": round((first - loaded) * 1e3, 1),
                  "warm_p50_ms": round(times[50] * 1e3, 2),
                  "peak_rss_mib": round(peak_kib() / 1024, 1)}))
"""


def vitb32_speed(work: Path) -> dict:
    """Export ViT-B-32 (random weights) both ways into a small synthetic index, then time each in a fresh process."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_search import load_text_encoder
    from sqlalchemy import insert

    from retrieval.store.catalog import STATUS_OK, ImageRow, encode_embedding

    identity = load_text_encoder(None).identity
    index_dir = work / "vitb32-index"
    catalog = Catalog(IndexLayout(index_dir).catalog, create=True)
    catalog.set_model_identity(identity)
    vectors = np.random.default_rng(0).standard_normal((2000, identity.embed_dim)).astype(np.float32)
    rows = [{"path": f"/x/{i}.jpg", "size": 1, "mtime_ns": 1, "status": STATUS_OK, "embedding": encode_embedding(v)}
            for i, v in enumerate(vectors)]  # fmt: skip
    with catalog.session() as session, session.begin():
        session.execute(insert(ImageRow), rows)
        catalog.bump_generation(session)
    catalog.close()
    results = {}
    torch_encoder = Encoder.load_text_only(identity.spec())
    torch_encoder.encode_texts(["warm up"])
    times = []
    for i in range(100):
        started = time.perf_counter()
        torch_encoder.encode_texts([f"a photo of a dog number {i} on a beach"])
        times.append(time.perf_counter() - started)
    results["torch"] = {"warm_p50_ms": round(float(np.median(times)) * 1e3, 2)}
    for precision in ("float32", "int8"):
        started = time.perf_counter()
        record = export_text_tower(index_dir, precision=precision, force=True).record
        exported_s = time.perf_counter() - started
        kept = work / f"vitb32-{precision}"
        shutil.copytree(index_dir / record.folder, kept)
        done = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(kept)], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
        results[precision] = json.loads(done.stdout) | {
            "export_s": round(exported_s, 1),
            "file_mb": round(sum((kept / name).stat().st_size for name in graph_files(kept, "text.onnx")) / 1e6, 1),
            "int8_top10_overlap_probes": record.int8_overlap,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-recall", action="store_true")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-text-tower-"))
    try:
        if not args.skip_recall:
            print("shapes-clip, held-out test split:", json.dumps(shapes_recall(work), indent=1), flush=True)
        if not args.skip_speed:
            print("ViT-B-32 (random weights):", json.dumps(vitb32_speed(work), indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
