"""Watched folders: new, changed, moved and deleted files reach the index by themselves, in debounced batches."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from indexer.pipeline import index_paths
from indexer.watch import ChangeBatcher, FolderWatcher, WatchSettings, folders_to_scan
from retrieval.search.engine import SearchEngine
from tests.conftest import make_images, write_image

FAST = WatchSettings(quiet_s=0.3, max_wait_s=2.0, poll_s=0.05)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_one_batch_and_a_stream_is_cut_at_max_wait():
    clock = FakeClock()
    batcher = ChangeBatcher(WatchSettings(quiet_s=1.0, max_wait_s=5.0), clock)
    for i in range(500):  # a camera import: 500 files within 0.5 s
        clock.now = i * 0.001
        batcher.add([f"/p/img_{i}.jpg"])
    assert batcher.take_ready() is None
    clock.now = 0.499 + 1.0
    assert len(batcher.take_ready()) == 500
    assert batcher.take_ready() is None and batcher.due_in() is None
    for step in range(100):  # an event every 0.5 s never goes quiet: cut 5 s after the first
        clock.now = 10.0 + step * 0.5
        batcher.add([f"/p/stream_{step}.jpg"])
        if batcher.take_ready() is not None:
            break
    assert clock.now == pytest.approx(15.0)


def test_folders_to_scan_covers_changes_with_the_fewest_existing_folders(tmp_path):
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    changed = [
        str(root / "a" / "b" / "x.jpg"),
        str(root / "a" / "y.jpg"),
        str(root / "c" / "gone" / "deep" / "z.jpg"),  # a deleted folder: its nearest existing parent
        str(tmp_path / "elsewhere" / "w.jpg"),  # outside the watched roots: ignored
    ]
    assert folders_to_scan(changed, [str(root)]) == [str(root / "a"), str(root / "c")]


def searchable(engine: SearchEngine, root: Path | None = None) -> set[str]:
    """Names of the files a search finds (paths relative to ``root`` when given)."""
    engine.refresh()
    paths = [Path(r.path) for r in engine.search_text("a photo", k=1000)]
    return {str(p.relative_to(root)) if root else p.name for p in paths}


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.slow
def test_copied_files_become_searchable_and_deleted_ones_go(tmp_path, settings):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    make_images(photos, 3, seed=1)
    incoming = make_images(tmp_path / "camera", 50, seed=2)
    index_paths(index_dir, [photos], settings, progress=False)
    first_run = threading.Event()
    summaries = []

    def on_batch(summary) -> None:
        summaries.append(summary)
        first_run.set()

    watcher = FolderWatcher(index_dir, [photos], settings, FAST, on_batch=on_batch)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert first_run.wait(30)
        with SearchEngine(index_dir, device="cpu") as engine:
            for path in incoming:
                shutil.copy(path, photos / path.name)
            names = {path.name for path in incoming}
            assert wait_for(lambda: names <= searchable(engine)), "copied files not searchable within 10 s"
            for path in incoming[:10]:
                (photos / path.name).unlink()
            gone = {path.name for path in incoming[:10]}
            assert wait_for(lambda: not gone & searchable(engine)), "deleted files still found after 10 s"
            assert len(searchable(engine)) == 3 + 40
            batches_so_far = watcher.batches
            (photos / "moved").mkdir()
            moved = [path.name for path in incoming[10:15]]
            for name in moved:
                (photos / name).rename(photos / "moved" / name)
            write_image(photos / incoming[15].name, seed=999)  # changed in place
            assert wait_for(lambda: {f"moved/{name}" for name in moved} <= searchable(engine, photos))
            assert wait_for(lambda: sum(s.updated for s in summaries) == 1)
            assert sum(s.moved for s in summaries) == 5  # moves keep their vectors: nothing re-encoded for them
            assert len(searchable(engine)) == 3 + 40
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert 1 <= batches_so_far <= 4  # 50 copies in one burst, 10 deletions in another (debounced, not 60 runs)


@pytest.mark.slow
def test_serve_watch_answers_new_photos_while_indexing(tmp_path, settings):
    """The server's watcher (a thread beside the server) indexes copied files; searches keep answering during the
    batch and then include them."""
    import httpx

    from indexer.watch import recorded_settings, watching_in_background
    from retrieval.search.server import ServerSettings, create_app
    from retrieval.testing import running_server

    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    make_images(photos, 3, seed=1)
    incoming = make_images(tmp_path / "camera", 20, seed=3)
    index_paths(index_dir, [photos], settings, progress=False)
    app = create_app(index_dir, ServerSettings(device="cpu"))
    watch_settings = recorded_settings(index_dir, device="cpu")
    assert watch_settings.model == settings.model

    def found(url: str) -> set[str]:
        answer = httpx.get(f"{url}/api/search", params={"q": "a photo", "k": 100}, timeout=30)
        assert answer.status_code == 200, answer.text  # also while a batch is being committed
        return {Path(r["path"]).name for r in answer.json()["results"]}

    with running_server(app) as url, watching_in_background(index_dir, watch_settings, FAST) as watcher:
        assert wait_for(lambda: watcher.batches == 0 and len(found(url)) == 3)
        for path in incoming:
            shutil.copy(path, photos / path.name)
        assert wait_for(lambda: {p.name for p in incoming} <= found(url)), "copied files not served within 10 s"


def test_the_watcher_loads_the_model_before_the_first_event(tmp_path, settings):
    """`index --watch` used to load the model when the first photo arrived (~20 s for ViT-B-32 on 2 cores)."""
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder

    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    make_images(photos, 2, seed=3)
    index_paths(index_dir, [photos], settings, progress=False)
    Encoder.unload_all()
    watcher = FolderWatcher(index_dir, [photos], settings, FAST)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: Encoder.shared(settings.model, CPU) is not None), "no model loaded without events"
        assert watcher.batches == 0  # nothing was copied: the first run found nothing to encode
    finally:
        stop.set()
        thread.join(30)
