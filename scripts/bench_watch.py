"""Watch latency: seconds from files copied into a watched folder to all of them searchable by a reader.

A FolderWatcher runs on a thread with the default debounce (quiet 1 s, at most 5 s); a SearchEngine polls the way
the server does (generation check, refresh) every 50 ms until every copied file is in the vectors it searches.
Bursts of 1, 50 and 500 files; then the deletion of 50.

    python scripts/bench_watch.py                    # tiny seeded random model (the test fixture)
    python scripts/bench_watch.py --model shapes     # the bundled shapes model
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.pipeline import IndexSettings, index_paths  # noqa: E402
from indexer.watch import FolderWatcher, WatchSettings  # noqa: E402
from retrieval.model.spec import ModelSpec  # noqa: E402
from retrieval.search.engine import SearchEngine  # noqa: E402
from retrieval.store.catalog import STATUS_OK  # noqa: E402
from retrieval.store.paths import catalog_path  # noqa: E402
from retrieval.testing import make_random_model_dir  # noqa: E402


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(seed * 10_000 + i)
        pixels = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        path = folder / f"cam_{seed}_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def indexed(engine: SearchEngine, paths: list[Path], present: bool) -> bool:
    """Whether every path is (``present``) or none is (not ``present``) among what the engine searches."""
    import numpy as np

    engine.refresh()
    rows = engine.catalog.rows_by_paths([catalog_path(p) for p in paths])
    ids = {row.id for row in rows.values() if row.status == STATUS_OK}
    vectors = engine.vectors
    probe = np.ones((1, vectors.dim), dtype=np.float32) / np.sqrt(vectors.dim)
    searched = set(vectors.search(probe, len(vectors))[1][0].tolist())
    if present:
        return len(ids) == len(paths) and ids <= searched
    return not rows


def wait_until(condition, timeout_s: float = 60.0) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError("not searchable within a minute")
        time.sleep(0.05)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (seeded random test model) or shapes")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes per batch (default 0)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as scratch:
        scratch = Path(scratch)
        if args.model == "shapes":
            spec = ModelSpec(f"local-dir:{ROOT / 'data' / 'models' / 'shapes-clip'}", None)
        else:
            spec = ModelSpec(f"local-dir:{make_random_model_dir(scratch / 'tiny', seed=0)}", None)
        photos, index_dir = scratch / "photos", scratch / "index"
        write_images(photos, 5, seed=0)
        settings = IndexSettings(model=spec, workers=args.workers)
        index_paths(index_dir, [photos], settings, progress=False)
        batches: list[str] = []
        watcher = FolderWatcher(
            index_dir, [photos], settings, WatchSettings(), on_batch=lambda s: batches.append(s.line())
        )
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        with SearchEngine(index_dir, device="cpu") as engine:
            wait_until(lambda: bool(batches))
            print(f"model {args.model}, workers {args.workers}, debounce quiet 1.0 s / max 5.0 s")
            for count, seed in ((1, 1), (50, 2), (500, 3)):
                sources = write_images(scratch / f"camera{seed}", count, seed)
                copied_at = time.perf_counter()
                for path in sources:
                    shutil.copy(path, photos / path.name)
                copy_s = time.perf_counter() - copied_at
                targets = [photos / p.name for p in sources]
                seconds = wait_until(lambda targets=targets: indexed(engine, targets, True))
                print(f"{count:>4} files copied in {copy_s:.2f} s -> all searchable {seconds:.2f} s after the copy "
                      f"ended; runs so far {watcher.batches}: {batches[-1]}")  # fmt: skip
            doomed = [photos / p.name for p in sources[:50]]
            for path in doomed:
                path.unlink()
            seconds = wait_until(lambda: indexed(engine, doomed, False))
            print(f"  50 files deleted -> gone from the index {seconds:.2f} s later: {batches[-1]}")
        stop.set()
        thread.join(30)


if __name__ == "__main__":
    main()
