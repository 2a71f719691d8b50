"""clipsearch side by side with rclip 4 (issue 27): the same seeded ViT-B-32-256 weights, the same folders.

    python scripts/bench_rclip.py --rclip /path/to/venv/bin/rclip --prepare       # weights, exports, checks
    flock /work/notes/bench.lock python scripts/bench_rclip.py --rclip ... --only photos --rounds 2
    flock /work/notes/bench.lock python scripts/bench_rclip.py --rclip ... --only small query

rclip downloads its ONNX models from the model hub at run time; here it is handed the seeded ViT-B-32-256 weights
exported as rclip's own converter does (rclip's scripts/convert_model.py: ``model.visual`` and ``encode_text``
through ``torch.onnx.export``, opset 18, dynamo off, inputs/outputs "input"/"output", a dynamic batch) in an
``RCLIP_DATADIR`` laid out as its downloader leaves it. ``--prepare`` checks that both tools then compute the same
vectors from the same input (max abs difference of the unit vectors, image and text towers).

  photos / small  fresh index of 200 x 12 MP / 1,000 x 500x375 JPEGs (scripts/bench_index.py's), from process start
                  to exit, runs alternated A,B / B,A: images/s, wall, CPU (user + system, children included), peak
                  memory (the process tree's summed PSS, and its max RSS), and of_bound: images/s over the float32
                  decode+encode bound (``bound_onnx``, the median of 3 taken in each round just before that set's runs).
                  clipsearch: ``index`` into a new index (``CLIPSEARCH_EXPORT_TEXT=0``: the text tower export of a
                  first run is not indexing), also ``--int8``; rclip: its first ``rclip QUERY`` in the folder with
                  an empty database (it indexes, then answers the query: its cold query is measured apart, below)
  query           cold text query in a fresh process, median of --query-runs: ``clipsearch search`` (text tower
                  exported) and ``rclip --no-indexing`` on the 200-photo folder
Without rclip (no --rclip and none on PATH) it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_index import CACHE, SETS, _exactly, ensure_photos  # noqa: E402
from scripts.bench_onnx_index import bound_onnx, clipsearch, median_of_runs, run_measured  # noqa: E402

MODEL_NAME = "ViT-B-32-256"  # rclip 4's model (its weights: datacomp_s34b_b86k; here seeded random ones)
RCLIP_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
RCLIP_LEGAL = ("LICENSE", "OPENAI-CLIP-MIT.txt", "README.md", "THIRD_PARTY_NOTICES.md")
QUERY = "a red car at night"


def seeded_model() -> tuple[str, Path]:
    """The seeded ViT-B-32-256 model folder (made once) and its clipsearch spec."""
    import open_clip

    from retrieval.testing import make_random_model_dir

    folder = CACHE / "vit-b-32-256"
    if not (folder / "open_clip_model.safetensors").is_file():
        make_random_model_dir(folder, model_cfg=open_clip.get_model_config(MODEL_NAME), seed=0)
    return f"local-dir:{folder}", folder


def open_clip_model(spec: str):
    """The model as clipsearch loads it (float32, CPU): what both exports are made from."""
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec

    return Encoder.load(ModelSpec(spec, None), CPU).model.float().eval()


def export_for_rclip(spec: str, datadir: Path) -> Path:
    """rclip's model files, exported as rclip's converter does, in an RCLIP_DATADIR (made once)."""
    model_dir = datadir / RCLIP_SUBDIR
    if (model_dir / "textual.onnx").is_file():
        return datadir
    import open_clip
    import torch

    model = open_clip_model(spec)
    model_dir.mkdir(parents=True, exist_ok=True)

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def forward(self, x):
            return self.visual(x)

    class Textual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip_model = model

        def forward(self, x):
            return self.clip_model.encode_text(x)

    side = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    for wrapper, dummy, name in (
        (Visual(), torch.randn(1, 3, side, side), "visual.onnx"),
        (Textual(), torch.zeros(1, 77, dtype=torch.long), "textual.onnx"),
    ):
        torch.onnx.export(
            wrapper.eval(),
            (dummy,),
            str(model_dir / name),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    (datadir / "tokenizer").mkdir(exist_ok=True)
    shutil.copy2(vocab, datadir / "tokenizer" / vocab.name)
    for name in RCLIP_LEGAL:
        (datadir / name).write_text("benchmark stand-in: seeded random weights, not rclip's model\n")
    return datadir


def fresh_rclip_datadir(models: Path, scratch: Path) -> Path:
    """An RCLIP_DATADIR with the model files (linked) and no database: rclip's first run indexes everything."""
    datadir = Path(tempfile.mkdtemp(prefix="rclip-data-", dir=scratch))
    for entry in models.iterdir():
        if entry.name != "db.sqlite3" and not entry.name.startswith("db.sqlite3"):
            (datadir / entry.name).symlink_to(entry)
    return datadir


def rclip_run(rclip: Path, folder: Path, datadir: Path, *extra: str) -> dict:
    env = {**os.environ, "RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"}
    return run_measured([str(rclip), "--top", "5", "--filepath-only", *extra, QUERY], env, folder)


def check_same_vectors(spec: str, models: Path, scratch: Path) -> dict:
    """Max abs difference of unit vectors: rclip's graphs against clipsearch's image tower and torch text tower."""
    import onnxruntime
    import torch

    from retrieval.model.image_onnx import cached_image_tower
    from retrieval.model.spec import ModelSpec, spec_key
    from retrieval.unit import unit_rows

    model_dir = models / RCLIP_SUBDIR
    pixels = np.random.default_rng(0).standard_normal((4, 3, 256, 256)).astype(np.float32)
    rclip_visual = onnxruntime.InferenceSession(str(model_dir / "visual.onnx"), providers=["CPUExecutionProvider"])
    tower = cached_image_tower(spec_key(ModelSpec(spec, None), check=False))
    ours = tower.open(threads=2).encode_images(pixels)
    theirs = unit_rows(rclip_visual.run(None, {"input": pixels})[0])
    tokens = np.zeros((3, 77), dtype=np.int64)
    tokens[:, :4] = [[49406, 320, 736, 49407], [49406, 539, 1929, 49407], [49406, 2102, 49407, 0]]
    rclip_text = onnxruntime.InferenceSession(str(model_dir / "textual.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = unit_rows(open_clip_model(spec).encode_text(torch.from_numpy(tokens)).numpy())
    text = unit_rows(rclip_text.run(None, {"input": tokens})[0])
    return {
        "image_max_abs_diff": float(np.max(np.abs(ours - theirs))),
        "text_max_abs_diff_vs_torch": float(np.max(np.abs(reference - text))),
    }


def prepare(spec: str, scratch: Path, folders: dict) -> tuple[Path, Path]:
    """The rclip model files; clipsearch's image tower (exported by a first index) and a query index with its text
    tower; rclip's database of the photo folder for its cold query. Returns (rclip models, clipsearch index)."""
    models = export_for_rclip(spec, scratch / "rclip-models")
    query_index = scratch / "clipsearch-query-index"
    folder, count = folders["photos"]
    if not (query_index / "catalog.sqlite").is_file():
        command, env = clipsearch(ROOT, "index", str(folder), "--index", str(query_index), "--model", spec, "-q")
        env["CLIPSEARCH_EXPORT_TEXT"] = "1"
        subprocess.run(command, env=env, check=True)
    query_data = scratch / "rclip-query-data"
    if not (query_data / "db.sqlite3").is_file():
        query_data.mkdir(exist_ok=True)
        for entry in models.iterdir():
            if not (query_data / entry.name).exists():
                (query_data / entry.name).symlink_to(entry)
        rclip_run(RCLIP, folder, query_data)
    return models, query_index


def main() -> None:
    global RCLIP
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rclip", type=Path, default=None, help="the rclip executable (default: rclip on PATH)")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1, help="A,B then B,A ... alternated")
    parser.add_argument("--first-round", type=int, default=0, help="1: start with the reversed order")
    parser.add_argument("--only", nargs="*", default=["photos", "small", "query"])
    parser.add_argument("--no-int8", action="store_true", help="leave out clipsearch --int8")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout (main) as a side of its own")
    parser.add_argument("--query-runs", type=int, default=5)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "bench-rclip")
    parser.add_argument("--prepare", action="store_true", help="only make the models, the exports and the checks")
    args = parser.parse_args()
    found = args.rclip or (Path(shutil.which("rclip")) if shutil.which("rclip") else None)
    if found is None or not found.is_file():
        print("rclip is not installed (pass --rclip PATH to its executable): nothing to compare, skipped")
        return
    RCLIP = found
    args.scratch.mkdir(parents=True, exist_ok=True)
    spec, _ = seeded_model()
    folders = {}
    for name, count in (("photos", args.photos), ("small", args.small)):
        width, height, folder = SETS[name]
        ensure_photos(CACHE / folder, count, width, height)
        folders[name] = (_exactly(CACHE / folder, count), count)
    models, query_index = prepare(spec, args.scratch, folders)

    def emit(**values) -> None:
        print(json.dumps(values), flush=True)

    if args.prepare:
        emit(figure="same_weights", **check_same_vectors(spec, models, args.scratch))
        return
    sides = [("clipsearch", ()), ("rclip", ())] + ([] if args.no_int8 else [("clipsearch-int8", ("--int8",))])
    if args.baseline is not None:
        sides.insert(1, ("baseline", ()))
    for round_ in range(args.first_round, args.first_round + args.rounds):
        order = sides if round_ % 2 == 0 else sides[::-1]
        for name in ("photos", "small"):
            if name not in args.only:
                continue
            folder, count = folders[name]
            samples = sorted((bound_onnx(folder, spec) for _ in range(3)), key=lambda each: each["bound"])
            bound = samples[1]  # the median of three, in the same window as the runs: one moves by up to 10 %
            emit(figure="bound", set=name, round=round_, **bound, load=round(os.getloadavg()[0], 2))
            for side, extra in order:
                if side == "rclip":
                    datadir = fresh_rclip_datadir(models, args.scratch)
                    result = rclip_run(RCLIP, folder, datadir)
                    shutil.rmtree(datadir, ignore_errors=True)
                else:
                    index_dir = Path(tempfile.mkdtemp(prefix="clipsearch-", dir=args.scratch))
                    checkout = args.baseline if side == "baseline" else ROOT
                    command, env = clipsearch(checkout, "index", str(folder), "--index", str(index_dir), "-q")
                    # run in the checkout: `python -c` imports from its working directory before PYTHONPATH
                    result = run_measured([*command, "--model", spec, *extra], env, checkout)
                    assert f"added {count}" in result["out"], result["out"]
                    shutil.rmtree(index_dir, ignore_errors=True)
                result.pop("out")
                emit(
                    figure="fresh_index",
                    set=name,
                    side=side,
                    round=round_,
                    images_per_s=round(count / result["wall_s"], 2),
                    of_bound=round(count / result["wall_s"] / bound["bound"], 3),
                    **result,
                )
        if "query" in args.only:
            for side, _ in [entry for entry in order if not entry[1]]:
                if side == "rclip":
                    data = args.scratch / "rclip-query-data"
                    measure = lambda data=data: rclip_run(RCLIP, folders["photos"][0], data, "--no-indexing")  # noqa: E731
                else:
                    command, env = clipsearch(ROOT, "search", QUERY, "--index", str(query_index), "-k", "5")
                    measure = lambda command=command, env=env: run_measured(command, env, ROOT)  # noqa: E731
                values = median_of_runs(measure, args.query_runs)
                emit(figure="cold_text_query", side=side, round=round_, **values, load=round(os.getloadavg()[0], 2))


RCLIP: Path | None = None

if __name__ == "__main__":
    main()
