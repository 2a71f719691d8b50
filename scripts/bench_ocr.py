"""Text in photos (index --ocr): recall of text queries, the OCR pass's speed and memory against RapidOCR's own
default call on the same files, and what --ocr adds to indexing the demo folder.

1. Quality, on two generated sets (scripts/make_text_photos.py: ``tuning`` seed 0 and ``holdout`` seed 7, other
   fonts sizes, angles, grain and JPEG quality): each is indexed with ``--ocr`` (the bundled shapes model for
   CLIP), then every query (a word, a number or a two-word phrase printed in exactly one photo) is searched the way
   ``clipsearch search`` does (``Query.of`` -> ``SearchEngine.search``). Prints R@1, R@5, how often a photo without
   text came first, and how often the text read holds the query (the OCR model alone).
2. Speed, on the tuning set's files: the OCR pass of ``clipsearch index --ocr`` (nothing left to encode, so the run
   is the pass: its worker processes, decoding, probe and full reads, commits) against ``RapidOCR()(path)`` over the
   same files in a fresh process, in the same window; wall and CPU seconds (children included), the peak resident
   memory of the process tree (the pass's workers summed). Then the
   per-photo CPU cost of this reader (one thread) on photos with and without text, beside RapidOCR's default call.
3. The demo folder (data/samples, 300 small images): a full ``clipsearch index`` without and with ``--ocr``, and a
   no-change refresh of the --ocr index, which must not import RapidOCR (checked in the refreshing process).

Run it niced on a shared machine; the load average is printed with the figures.

    python scripts/bench_ocr.py                     # 30 + 10 photos per set
    python scripts/bench_ocr.py --text 60 --blank 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.pipeline import IndexSettings, index_paths  # noqa: E402
from retrieval.model.spec import ModelSpec  # noqa: E402
from retrieval.search.engine import SearchEngine  # noqa: E402
from retrieval.search.query import Query  # noqa: E402
from retrieval.store.image_text import fold  # noqa: E402
from retrieval.testing import load_script  # noqa: E402

SHAPES = ModelSpec(f"local-dir:{ROOT / 'data' / 'models' / 'shapes-clip'}", None)
SAMPLES = ROOT / "data" / "samples" / "images"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPSEARCH_EXPORT_TEXT": "0"}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def quality(folder: Path, variant: str, seed: int, n_text: int, n_blank: int) -> dict:
    queries = load_script("make_text_photos").generate_text_photos(folder / "photos", n_text, n_blank, seed, variant)
    index_dir = folder / "index"
    settings = IndexSettings(model=SHAPES, device="cpu", ocr=True)
    index_paths(index_dir, [folder / "photos"], settings, progress=False)
    at1 = at5 = blank_first = read = 0
    with SearchEngine(index_dir, device="cpu") as engine:
        for item in queries:
            names = [Path(r.path).name for r in engine.search(Query.of(item["query"]), k=5)]
            at1 += names[:1] == [item["target"]]
            at5 += item["target"] in names
            blank_first += names[0].startswith("blank_")
            row = engine.catalog.row_by_path(str((folder / "photos" / item["target"]).resolve()))
            text = fold(" ".join(line["text"] for line in engine.text_of(row.id).lines))
            read += all(fold(word) in text for word in item["query"].split())
    n = len(queries)
    return {"figure": "recall", "set": f"{variant} seed {seed}", "queries": n, "R@1": round(at1 / n, 3),
            "R@5": round(at5 / n, 3), "blank_first": blank_first, "ocr_alone": round(read / n, 3),
            "load": load()}  # fmt: skip


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and every process below it (Linux /proc): the pass with its workers."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= below
        grew = bool(below)
    total = 0
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, with its wall, CPU (its children included) and
    the peak of its process tree's resident memory (sampled every 0.1 s) added here."""
    before, started, peak = children_cpu(), time.perf_counter(), 0.0
    child = subprocess.Popen([sys.executable, "-c", code, *args], env=ENV, stdout=subprocess.PIPE, text=True)
    while child.poll() is None:
        peak = max(peak, tree_rss_mb(child.pid))
        time.sleep(0.1)
    if child.returncode:
        raise SystemExit(f"a measured run failed (exit code {child.returncode})")
    found = json.loads(child.stdout.read().strip().splitlines()[-1])
    return found | {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(children_cpu() - before, 2),
                    "peak_tree_rss_mb": round(peak)}  # fmt: skip


PASS = """
import json, sys
from pathlib import Path
from indexer.pipeline import IndexSettings, index_paths
from retrieval.model.spec import ModelSpec
summary = index_paths(Path(sys.argv[1]), [], IndexSettings(model=ModelSpec(sys.argv[2], None), device="cpu",
                      ocr=True), progress=False)
print(json.dumps({"note": summary.text_note}))
"""

DEFAULT_CALL = """
import json, sys
from rapidocr_onnxruntime import RapidOCR
engine = RapidOCR()
found = sum(bool(engine(path)[0]) for path in sys.argv[1:])
print(json.dumps({"with_text": found}))
"""

REFRESH = """
import json, sys, time
from pathlib import Path
from indexer.pipeline import IndexSettings, index_paths
from retrieval.model.spec import ModelSpec
started = time.perf_counter()
summary = index_paths(Path(sys.argv[1]), [], IndexSettings(model=ModelSpec(sys.argv[2], None), device="cpu"),
                      progress=False)
print(json.dumps({"line": summary.line(), "seconds": round(time.perf_counter() - started, 2),
                  "rapidocr_imported": "rapidocr_onnxruntime" in sys.modules}))
"""


def speed(folder: Path) -> list[dict]:
    photos = sorted((folder / "photos").glob("*.jpg"))
    index_dir = folder / "speed-index"
    index_paths(index_dir, [folder / "photos"], IndexSettings(model=SHAPES, device="cpu"), progress=False)
    figures = [{"figure": "ocr pass (index --ocr, workers: one per core)", "photos": len(photos), "load": load()}]
    figures[-1] |= run_child(PASS, str(index_dir), SHAPES.name)
    figures.append({"figure": "RapidOCR()(path), its default call", "photos": len(photos), "load": load()})
    figures[-1] |= run_child(DEFAULT_CALL, *map(str, photos))
    for figure in figures[-2:]:
        figure["photos_per_s"] = round(len(photos) / figure["wall_s"], 2)
    return figures + per_photo_cost(photos)


def per_photo_cost(photos: list[Path]) -> list[dict]:
    """CPU seconds per photo with and without text: this reader (one thread) and RapidOCR's default call."""
    from rapidocr_onnxruntime import RapidOCR

    from retrieval.images import decode_image_and_size, read_file
    from retrieval.model.device import CPU
    from retrieval.model.ocr import DECODE_MIN_SIDE, TextReader

    reader, default = TextReader(CPU, threads=1), RapidOCR()
    costs: dict[str, dict[str, list[float]]] = {kind: {"ours": [], "default": []} for kind in ("text", "blank")}
    for path in photos:
        kind = "blank" if path.name.startswith("blank_") else "text"
        started = time.process_time()
        image, size = decode_image_and_size(read_file(path), DECODE_MIN_SIDE, reduce=True)
        reader.read(image, size)
        costs[kind]["ours"].append(time.process_time() - started)
        started = time.process_time()
        default(str(path))
        costs[kind]["default"].append(time.process_time() - started)
    mean = {kind: {who: round(sum(v) / len(v), 3) for who, v in by.items() if v} for kind, by in costs.items()}
    figure = {"figure": "cpu s per photo"} | {f"{who}_{kind}": v for kind, by in mean.items() for who, v in by.items()}
    return [figure | {"ours_blank_over_text": round(mean["blank"]["ours"] / mean["text"]["ours"], 2), "load": load()}]


def demo(folder: Path) -> list[dict]:
    figures = []
    for ocr in (False, True):
        index_dir = folder / f"demo-{'ocr' if ocr else 'plain'}"
        command = [sys.executable, "-m", "clipsearch", "index", str(SAMPLES), "--index", str(index_dir), "-q",
                   "--model", SHAPES.name, *(["--ocr"] if ocr else [])]  # fmt: skip
        before, started = children_cpu(), time.perf_counter()
        out = subprocess.run(command, env=ENV, capture_output=True, text=True, check=True).stdout.strip()
        figures.append({"figure": f"demo index {'--ocr' if ocr else 'without --ocr'}", "output": out,
                        "wall_s": round(time.perf_counter() - started, 2),
                        "cpu_s": round(children_cpu() - before, 2), "load": load()})  # fmt: skip
    refresh = run_child(REFRESH, str(folder / "demo-ocr"), SHAPES.name)
    figures.append({"figure": "no-change refresh of the --ocr index", **refresh, "load": load()})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=int, default=30)
    parser.add_argument("--blank", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=(), choices=("quality", "speed", "demo"))
    args = parser.parse_args()
    print(json.dumps({"uptime": os.popen("uptime").read().strip(), "cores": os.cpu_count()}), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "quality" not in args.skip or "speed" not in args.skip:
            print(json.dumps(quality(scratch / "a", "tuning", 0, args.text, args.blank)), flush=True)
        if "quality" not in args.skip:
            print(json.dumps(quality(scratch / "b", "holdout", 7, args.text, args.blank)), flush=True)
        if "speed" not in args.skip:
            for figure in speed(scratch / "a"):
                print(json.dumps(figure), flush=True)
        if "demo" not in args.skip:
            for figure in demo(scratch):
                print(json.dumps(figure), flush=True)
    print(json.dumps({"uptime": os.popen("uptime").read().strip()}), flush=True)


if __name__ == "__main__":
    main()
