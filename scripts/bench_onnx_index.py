"""CPU indexing through the ONNX image tower (issue 27) against a checkout of the code before, side by side.

    python scripts/bench_onnx_index.py --before /tmp/main27            # both sets, both sides, one round
    python scripts/bench_onnx_index.py --before /tmp/main27 --only refresh query

For each side, fresh processes of `clipsearch index` on a fresh index (ViT-B-32, seeded random weights, the
photos of scripts/bench_index.py: 200 x 12 MP and 1,000 x 500x375 JPEGs), from process start to exit:
  img/s, wall, CPU (user + system of the process and its decode workers), peak memory of the process tree
  (RSS summed, and PSS summed: forked workers share pages, which RSS counts once per process), load
  bound      the decode+encode bound of that side's encoder: 1 / (1 / E + 1 / D), E the encoder's images/s on
             all C cores on prepared batches, D the images/s of the run's decode threads (bound_onnx; the torch
             side: bench_index.decode_bound)
  refresh    `clipsearch index` of an index of 100 photos after 2 new ones were copied in (text tower current)
  watch      `index --watch`: a photo copied in as soon as it says it is watching, seconds to its committed row
  session    the image session alone, each configuration in a fresh process (memory pattern on/off, weight
             pre-packing, batch 32/16): images/s, CPU s per image, peak RSS (VmHWM: ru_maxrss would carry the
             parent's over the exec)
  query      cold `clipsearch search "a red car at night"`: wall, CPU and max RSS (/usr/bin/time), median of
             --query-runs, on the ViT-B-32 index and on one of the bundled model (data/models/shapes-clip, the
             300 bundled images); each side's index has its text tower exported by that side's own code
The image tower must already be in the per-user cache for the "after" side (any `clipsearch index` of the
model on the CPU exports it; the first one pays for it): `--prepare` does that and the refresh index.
Run it under the bench lock, with the others at nice 19: `flock /work/notes/bench.lock python ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_index import CACHE, SETS, _exactly, ensure_model, ensure_photos  # noqa: E402

QUERY = "a red car at night"


def _tree(pid: int) -> list[int]:
    """``pid`` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over ``pids``, in bytes."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def run_measured(command: list[str], env: dict, cwd: Path) -> dict:
    """Wall, CPU (the process and the children it waited for) and peak tree memory of one command."""
    peak = [0, 0]
    started = time.perf_counter()
    command = ["/usr/bin/time", "-f", "maxrss_kb=%M", *command]  # its own max RSS (the child's: not this process's)
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, pss = _memory(_tree(process.pid))
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = process.stdout.read()
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "sys_s": round(usage.ru_stime, 1),
        "peak_tree_rss_mb": round(peak[0] / 1e6),
        "peak_tree_pss_mb": round(peak[1] / 1e6),
        "main_process_max_rss_mb": round(int(err.rsplit("maxrss_kb=", 1)[1].split()[0]) / 1e3),
        "load": round(os.getloadavg()[0], 2),
        "out": out,
    }


def clipsearch(checkout: Path, *arguments: str) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "CLIPSEARCH_EXPORT_TEXT": "0"}
    return [sys.executable, "-m", "clipsearch", *arguments], env


def fresh_index(checkout: Path, folder: Path, model: str, count: int, scratch: Path, *extra: str) -> dict:
    index_dir = Path(tempfile.mkdtemp(prefix="bench-onnx-", dir=scratch))
    command, env = clipsearch(checkout, "index", str(folder), "--index", str(index_dir), "--model", model, "-q")
    command += list(extra)
    result = run_measured(command, env, checkout)
    assert f"added {count}" in result.pop("out")
    shutil.rmtree(index_dir, ignore_errors=True)
    return result | {"images_per_s": round(count / result["wall_s"], 2)}


def bound_torch(folder: Path, model: str) -> dict:
    from scripts.bench_index import decode_bound

    return decode_bound(folder, model, 32)


def bound_onnx(folder: Path, model: str) -> dict:
    """The same bound for the ONNX path, each half measured as a run does it (``indexer.pipeline``): E, the encoder
    exactly as a run opens it (one session, a lane per core, its default batch; a 2-thread session at batch 32 is
    ~10 % slower here, and a bound taken with it flatters the run); D, decoding on the run's decode threads
    (``default_workers``: one per core). ``bound_per_core`` is the earlier form, which took D as C times one thread's
    rate: two threads decode 12 MP photos at 1.94-2.07x one thread's rate here, 500x375 ones at 1.66-1.70x (the
    GIL), so it assumed more decoding than the cores give."""
    from concurrent.futures import ThreadPoolExecutor

    from indexer.pipeline import default_batch_size, default_workers
    from retrieval.images import ImageFileDataset
    from retrieval.model.device import CPU
    from retrieval.model.image_onnx import cached_image_tower, indexing_encoder
    from retrieval.model.spec import ModelSpec, spec_key

    tower = cached_image_tower(spec_key(ModelSpec(model, None), check=False))
    encoder = indexing_encoder(tower)
    batch = default_batch_size(CPU, onnx=True)
    paths = [str(p) for p in sorted(folder.glob("photo_*.jpg"))[:32]]
    dataset = ImageFileDataset(paths, encoder.crop, encoder.side)
    started = time.perf_counter()
    crops = np.stack([dataset[i].pixels for i in range(len(paths))])
    decode_one = len(paths) / (time.perf_counter() - started)
    with ThreadPoolExecutor(default_workers(CPU, onnx=True)) as threads:
        started = time.perf_counter()
        list(threads.map(dataset.__getitem__, range(len(paths))))
        decode_all = len(paths) / (time.perf_counter() - started)
    batches = [crops[start : start + batch] for start in range(0, len(crops), batch)]
    for pixels in batches:  # warm-up
        encoder.encode_crops(pixels)
    started, done = time.perf_counter(), 0
    while done < 96:
        for pixels in batches:
            encoder.encode_crops(pixels)
            done += len(pixels)
    encode = done / (time.perf_counter() - started)
    cores = os.cpu_count() or 1
    return {
        "encoder_only": round(encode, 2),
        "decode_one_core": round(decode_one, 1),
        "decode_all_cores": round(decode_all, 1),
        "bound": round(1 / (1 / encode + 1 / decode_all), 2),
        "bound_per_core": round(cores / (cores / encode + 1 / decode_one), 2),
    }


def prepare(model: str, scratch: Path) -> Path:
    """The refresh/query index: 100 small photos, text tower exported (this checkout; the schema is shared)."""
    folder = scratch / "refresh-photos"
    index_dir = scratch / "refresh-index"
    if not index_dir.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path in sorted((CACHE / SETS["small"][2]).glob("photo_*.jpg"))[:100]:
            shutil.copy(path, folder / path.name)
        command, env = clipsearch(ROOT, "index", str(folder), "--index", str(index_dir), "--model", model, "-q")
        subprocess.run(command, env=env, check=True)
        command, env = clipsearch(ROOT, "export-text", "--index", str(index_dir))
        subprocess.run(command, env=env, check=True)
    return index_dir


def refresh(checkout: Path, base: Path, scratch: Path, round_: int, side: str) -> dict:
    """2 new photos in the folder of a copy of the prepared index, then `clipsearch index` of that copy."""
    index_dir = scratch / f"refresh-{side}-{round_}"
    shutil.rmtree(index_dir, ignore_errors=True)
    shutil.copytree(base, index_dir, symlinks=True)
    folder = scratch / "refresh-photos"
    new = [folder / f"new-{side}-{round_}-{i}.jpg" for i in range(2)]
    sources = sorted((CACHE / SETS["small"][2]).glob("photo_*.jpg"))[200 + 2 * round_ : 202 + 2 * round_]
    for source, target in zip(sources, new):
        shutil.copy(source, target)
    try:
        command, env = clipsearch(checkout, "index", "--index", str(index_dir), "-q")
        env.pop("CLIPSEARCH_EXPORT_TEXT")  # as a user runs it (the tower is current: nothing to export)
        result = run_measured(command, env, checkout)
        assert "added 2" in result.pop("out")
    finally:
        for path in new:
            path.unlink(missing_ok=True)
        shutil.rmtree(index_dir, ignore_errors=True)
    return result


def watch_first_change(checkout: Path, base: Path, scratch: Path, side: str) -> dict:
    """`clipsearch index --watch` on a copy of the prepared index: a photo copied in as soon as it says it is
    watching (as a new user would), and the seconds until its row is committed (searchable)."""
    import sqlite3

    index_dir = scratch / f"watch-{side}"
    shutil.rmtree(index_dir, ignore_errors=True)
    shutil.copytree(base, index_dir, symlinks=True)
    folder = scratch / "refresh-photos"
    target = folder / f"watched-{side}.jpg"
    command, env = clipsearch(checkout, "index", "--watch", "--index", str(index_dir), "-q")
    env.pop("CLIPSEARCH_EXPORT_TEXT")
    process = subprocess.Popen(
        command, env=env, cwd=checkout, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    started = time.perf_counter()
    try:
        for line in process.stderr:
            if "watching for changes" in line:
                break
        ready = time.perf_counter() - started
        source = sorted((CACHE / SETS["small"][2]).glob("photo_*.jpg"))[300]
        copied = time.perf_counter()
        shutil.copy(source, target)
        database = sqlite3.connect(f"file:{index_dir / 'catalog.sqlite'}?mode=ro", uri=True, timeout=30)
        while time.perf_counter() - copied < 120:
            found = database.execute("SELECT status FROM images WHERE path = ?", (str(target),)).fetchone()
            if found is not None:
                break
            time.sleep(0.05)
        latency = time.perf_counter() - copied
        database.close()
    finally:
        process.terminate()
        process.wait(30)
        target.unlink(missing_ok=True)
        shutil.rmtree(index_dir, ignore_errors=True)
    return {"watching_after_s": round(ready, 2), "copy_to_committed_s": round(latency, 2), "found": found is not None}


SESSION_CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
graph, pattern, prepack, batch = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
o = ort.SessionOptions(); o.log_severity_level = 3; o.enable_cpu_mem_arena = False; o.enable_mem_pattern = pattern
o.intra_op_num_threads = 2
o.add_session_config_entry("session.intra_op.allow_spinning", "0")
if not prepack:
    o.add_session_config_entry("session.disable_prepacking", "1")
t = time.perf_counter(); s = ort.InferenceSession(graph, o, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t
x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
s.run(None, {"pixels": x})
t, c = time.perf_counter(), time.process_time()
for _ in range(3):
    s.run(None, {"pixels": x})
wall, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"pattern": pattern, "prepack": prepack, "batch": batch, "load_s": round(load, 2),
    "images_per_s": round(3 * batch / wall, 2), "cpu_s_per_image": round(cpu / (3 * batch), 4),
    "peak_rss_mb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024}))
"""
SESSION_CONFIGS = [("1", "1", 32), ("0", "1", 32), ("0", "0", 32), ("0", "1", 16)]  # pattern, prepack, batch


def image_sessions(model: str, round_: int) -> list[dict]:
    """The float32 image tower's session in each of ``SESSION_CONFIGS``, a fresh process each."""
    from retrieval.model.image_onnx import cached_image_tower
    from retrieval.model.spec import ModelSpec, spec_key

    graph = cached_image_tower(spec_key(ModelSpec(model, None), check=False)).folder / "image.onnx"
    found = []
    for pattern, prepack, batch in SESSION_CONFIGS if round_ % 2 == 0 else SESSION_CONFIGS[::-1]:
        command = [sys.executable, "-c", SESSION_CHILD, str(graph), pattern, prepack, str(batch)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        found.append(json.loads(done.stdout) | {"load": round(os.getloadavg()[0], 2)})
    return found


def query_index(checkout: Path, base: Path, scratch: Path, side: str) -> Path:
    """A copy of ``base`` whose text tower ``checkout`` exported (its own files: the tokenizer's form changed)."""
    index_dir = scratch / f"query-{base.name}-{side}"
    if not index_dir.is_dir():
        shutil.copytree(base, index_dir, symlinks=True)
        command, env = clipsearch(checkout, "export-text", "--force", "--index", str(index_dir))
        subprocess.run(command, env=env, cwd=checkout, check=True, capture_output=True)
    return index_dir


def prepare_bundled(scratch: Path) -> Path:
    """An index of the 300 bundled sample images with the bundled model (text tower exported by query_index)."""
    index_dir = scratch / "bundled-index"
    if not index_dir.is_dir():
        model = f"local-dir:{ROOT / 'data' / 'models' / 'shapes-clip'}"
        folder = ROOT / "data" / "samples" / "images"
        command, env = clipsearch(ROOT, "index", str(folder), "--index", str(index_dir), "--model", model, "-q")
        subprocess.run(command, env=env, check=True)
    return index_dir


def cold_query(checkout: Path, index_dir: Path, runs_wanted: int = 5) -> dict:
    command, env = clipsearch(checkout, "search", QUERY, "--index", str(index_dir), "-k", "5")
    return median_of_runs(lambda: run_measured(command, env, checkout), runs_wanted)


def median_of_runs(measure, runs_wanted: int) -> dict:
    """Wall, CPU and max RSS, each the median of ``runs_wanted`` calls of ``measure`` (a ``run_measured``)."""
    runs = [measure() for _ in range(runs_wanted)]
    keys = ("wall_s", "cpu_s", "main_process_max_rss_mb")
    medians = {key: float(np.median([run[key] for run in runs])) for key in keys}
    return medians | {"runs": runs_wanted, "walls": [run["wall_s"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before (git worktree)")
    parser.add_argument("--model", default=None, help="default: ViT-B-32 with seeded random weights")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1, help="A,B then B,A ... alternated")
    parser.add_argument("--only", nargs="*", default=["bound", "photos", "small", "refresh", "query", "watch"])
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "bench-onnx")
    parser.add_argument("--prepare", action="store_true", help="only make the photos, the export and the index")
    parser.add_argument("--int8", action="store_true", help="fresh indexes also with `index --int8` (after only)")
    parser.add_argument("--query-runs", type=int, default=5, help="cold queries per side and index (median)")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args.model)
    folders = {}
    for name, count in (("photos", args.photos), ("small", args.small)):
        width, height, folder = SETS[name]
        ensure_photos(CACHE / folder, count, width, height)
        folders[name] = (_exactly(CACHE / folder, count), count)
    base = prepare(model, args.scratch)
    bundled = prepare_bundled(args.scratch)
    sides = [("before", args.before, ()), ("after", ROOT, ())]
    query_indexes = {
        (name, side): query_index(checkout, index, args.scratch, side)
        for name, index in (("vit-b-32", base), ("bundled", bundled))
        for side, checkout, _ in sides
    }
    if args.prepare:
        return
    sides += [("after-int8", ROOT, ("--int8",))] if args.int8 else []

    def emit(**values) -> None:
        print(json.dumps(values), flush=True)

    if "bound" in args.only:
        for name, (folder, _) in folders.items():
            emit(figure="bound", set=name, side="before", **bound_torch(folder, model))
            emit(figure="bound", set=name, side="after", **bound_onnx(folder, model))
    scratch = args.scratch
    for round_ in range(args.rounds):
        if "session" in args.only:
            for values in image_sessions(model, round_):
                emit(figure="image_session", round=round_, **values)
        order = sides if round_ % 2 == 0 else sides[::-1]
        for name in ("photos", "small"):
            if name in args.only:
                folder, count = folders[name]
                for side, checkout, extra in order:
                    emit(
                        figure="fresh_index",
                        set=name,
                        side=side,
                        round=round_,
                        **fresh_index(checkout, folder, model, count, args.scratch, *extra),
                    )
        per_side = {  # figure name: what --only calls it, how one side is measured
            "refresh_2_new": ("refresh", lambda checkout, side, r=round_: refresh(checkout, base, scratch, r, side)),
            "watch_first_change": ("watch", lambda checkout, side: watch_first_change(checkout, base, scratch, side)),
        }
        if "query" in args.only:
            for name in ("vit-b-32", "bundled"):
                for side, checkout, _ in [entry for entry in order if not entry[2]]:
                    values = cold_query(checkout, query_indexes[name, side], args.query_runs)
                    emit(figure="cold_text_query", index=name, side=side, round=round_, **values)
        for figure, (only, measure) in per_side.items():
            if only in args.only:
                for side, checkout, _ in [entry for entry in order if not entry[2]]:
                    values = measure(checkout, side) | {"load": round(os.getloadavg()[0], 2)}
                    emit(figure=figure, side=side, round=round_, **values)


if __name__ == "__main__":
    main()
