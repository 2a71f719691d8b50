"""The lean image graph against the tower exported as written (issue 27): CPU time per image, side by side.

    nice -n 19 python scripts/bench_lean_graph.py --export DIR [--model ViT-B-32-256]   # both graphs, checked
    flock /work/notes/bench.lock python scripts/bench_lean_graph.py --time DIR [--rounds 9]

``--export`` writes ``as-written.onnx`` and ``lean.onnx`` (``retrieval.model.image_export.export_image_onnx``) of
the open_clip model with seeded random weights (the same cost as trained ones) into DIR and prints each graph's
smallest cosine to torch on 16 random batches of pixels. ``--time`` (or ``--graphs A B ...``: any graphs) opens one
session per graph as indexing does (``cpu_session``: 1 intra-op thread, no arena) and runs a batch of
``--batch-size`` random pixels per graph per round, alternated A,B / B,A; printed per graph: the median and range
of CPU time (this process) and wall time per image, and the CPU saved against the first graph. The load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMS = ("as-written", "lean")


def export_both(folder: Path, model_name: str) -> None:
    import onnxruntime
    import open_clip
    import torch

    from retrieval.model.image_export import export_image_onnx

    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval()
    side = model.visual.image_size[0]
    pixels = np.random.default_rng(3).standard_normal((16, 3, side, side)).astype(np.float32)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    for form in FORMS:
        started = time.perf_counter()
        written = export_image_onnx(model, folder / f"{form}.onnx", lean=form == "lean")
        seconds = time.perf_counter() - started
        session = onnxruntime.InferenceSession(str(folder / f"{form}.onnx"), providers=["CPUExecutionProvider"])
        (features,) = session.run(None, {"pixels": pixels})
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        cosine = float(np.min(np.sum(reference * features, axis=1)))
        print(f"{model_name} {form}: written as {written} in {seconds:.1f} s, min cosine to torch {cosine:.7f}")


def time_graphs(graphs: list[Path], batch: int, rounds: int) -> None:
    from retrieval.model.text_onnx import cpu_session

    sessions = [cpu_session(graph, threads=1, arena=False) for graph in graphs]
    side = int(sessions[0].get_inputs()[0].shape[-1])
    pixels = np.random.default_rng(0).standard_normal((batch, 3, side, side)).astype(np.float32)
    for session in sessions:
        session.run(None, {"pixels": pixels})  # warm-up
    cpu: dict[Path, list[float]] = {graph: [] for graph in graphs}
    wall: dict[Path, list[float]] = {graph: [] for graph in graphs}
    for round_ in range(rounds):
        order = list(zip(graphs, sessions))
        for graph, session in order if round_ % 2 == 0 else order[::-1]:
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            session.run(None, {"pixels": pixels})
            cpu[graph].append((time.process_time() - started_cpu) / batch * 1000)
            wall[graph].append((time.perf_counter() - started_wall) / batch * 1000)
    first = statistics.median(cpu[graphs[0]])
    for graph in graphs:
        median = statistics.median(cpu[graph])
        print(
            f"{graph}: CPU {median:.1f} ms an image (range {min(cpu[graph]):.1f}-{max(cpu[graph]):.1f}), "
            f"wall {statistics.median(wall[graph]):.1f} ms, {100 * (1 - median / first):+.1f} % CPU saved "
            f"against the first"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, help="write both graphs of --model into this folder")
    parser.add_argument("--model", default="ViT-B-32-256")
    parser.add_argument("--time", type=Path, help="time the two graphs --export wrote in this folder")
    parser.add_argument("--graphs", type=Path, nargs="+", help="time these graphs instead (the first: the baseline)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()}", flush=True)
    if args.export:
        export_both(args.export, args.model)
    graphs = args.graphs or ([args.time / f"{form}.onnx" for form in FORMS] if args.time else None)
    if graphs:
        time_graphs(graphs, args.batch_size, args.rounds)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
