"""Two writers never interleave (the second waits with a message, or fails at once with --no-wait), and searches
running while an indexer writes keep answering from committed state."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from indexer.pipeline import index_paths
from retrieval.errors import IndexBusyError
from retrieval.search.engine import SearchEngine
from retrieval.store.catalog import STATUS_OK, Catalog, ImageRow
from retrieval.store.layout import IndexLayout
from retrieval.store.write_lock import write_lock
from tests.conftest import make_images
from tests.crash_harness import assert_index_whole, run_in_child, start_child, wait_for_child


def wait_until_locked(index_dir: Path, timeout: float = 60.0) -> None:
    """Return once another process holds the write lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with write_lock(IndexLayout(index_dir), wait=False):
                pass
        except IndexBusyError:
            return
        time.sleep(0.02)
    raise AssertionError("the first writer never took the lock")


def rows_by_folder(index_dir: Path, folder: Path) -> list[ImageRow]:
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        with catalog.session() as session:
            return [row for row in session.scalars(select(ImageRow)) if row.path.startswith(f"{folder}/")]
    finally:
        catalog.close()


def test_no_wait_fails_at_once_while_another_writer_runs(settings, photo_folder, tmp_path):
    index_dir = tmp_path / "index"
    with write_lock(IndexLayout(index_dir)), pytest.raises(IndexBusyError, match="another clipsearch process"):
        index_paths(index_dir, [photo_folder], replace(settings, wait_for_lock=False), progress=False)
    assert not (index_dir / "catalog.sqlite").exists(), "the refused run wrote something"


def test_second_writer_waits_with_a_message_and_never_interleaves(settings, tmp_path):
    """A pauses while holding the lock between two commits; B, started then, must write only after A is done."""
    first, second = tmp_path / "first", tmp_path / "second"
    make_images(first, 12, seed=71)
    make_images(second, 6, seed=72)
    index_dir = tmp_path / "index"
    settings = replace(settings, chunk_size=4)
    messages = tmp_path / "messages.txt"

    def writer_a():
        index_paths(index_dir, [first], settings, progress=False)

    def writer_b():
        def note(message: str) -> None:
            messages.write_text(message)

        index_paths(index_dir, [second], settings, progress=False, on_wait=note)

    pid_a = start_child(writer_a, fault="commit_end:1:sleep=1.5")
    wait_until_locked(index_dir)
    code_b = run_in_child(writer_b)
    assert (wait_for_child(pid_a), code_b) == (0, 0)
    assert "waiting for it to finish" in messages.read_text()

    rows_a, rows_b = rows_by_folder(index_dir, first), rows_by_folder(index_dir, second)
    assert (len(rows_a), len(rows_b)) == (12, 6)
    assert max(r.indexed_at for r in rows_a) < min(r.indexed_at for r in rows_b), "the writers interleaved"
    assert_index_whole(index_dir)


def test_searches_during_indexing_answer_from_committed_state(settings, tmp_path):
    folder = tmp_path / "photos"
    make_images(folder / "a_first", 4, seed=81)
    index_dir = tmp_path / "index"
    settings = replace(settings, chunk_size=4, save_every_s=0.0)
    index_paths(index_dir, [folder], settings, progress=False)
    make_images(folder / "b_more", 20, seed=82)
    pause = ",".join(f"commit_end:{n}:sleep=0.3" for n in range(1, 6))

    pid = start_child(lambda: index_paths(index_dir, [folder], settings, progress=False), fault=pause)
    long_lived = SearchEngine(index_dir, device="cpu")
    seen, searches = [], 0
    try:
        while wait_for_child(pid, block=False) is None:
            with SearchEngine(index_dir, device="cpu") as engine:  # like a fresh `clipsearch search`
                seen.append(check_answers(engine, index_dir))
            long_lived.refresh()
            check_answers(long_lived, index_dir)
            searches += 2
    finally:
        long_lived.close()
    assert searches >= 4, "the indexer finished before the searches could overlap it"
    assert seen == sorted(seen), "a later search saw fewer images than an earlier one"
    assert len(set(seen)) >= 2, "the searches never saw the index grow"
    assert_index_whole(index_dir)
    assert len(rows_by_folder(index_dir, folder)) == 24


def check_answers(engine: SearchEngine, index_dir: Path) -> int:
    """Every result is a committed ok row scored by its own stored embedding; returns how many vectors it saw."""
    total = len(engine.vectors)
    query = np.random.default_rng(total).normal(size=(1, engine.identity.embed_dim)).astype(np.float32)
    query /= np.linalg.norm(query)
    results = engine.search_vectors(query, k=total)[0]
    assert results and len({r.image_id for r in results}) == len(results)
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        rows = catalog.rows_by_id([r.image_id for r in results])
    finally:
        catalog.close()
    for result in results:
        row = rows[result.image_id]
        assert row.status == STATUS_OK and row.path == result.path
        vector = row.vector() / np.linalg.norm(row.vector())
        assert abs(float(vector @ query[0]) - result.score) < 1e-3
    return total


@pytest.mark.slow
def test_cli_waits_with_a_message_or_fails_with_no_wait(tiny_spec, photo_folder, tmp_path):
    index_dir = tmp_path / "index"
    base = [sys.executable, "-c", "from clipsearch.cli import main; main()", "index", str(photo_folder)]
    base += ["--index", str(index_dir), "--model", tiny_spec.name, "--workers", "0", "--device", "cpu", "-q"]
    lock = write_lock(IndexLayout(index_dir))
    lock.__enter__()
    try:
        refused = subprocess.run([*base, "--no-wait"], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        assert "another clipsearch process is writing" in refused.stderr and "Traceback" not in refused.stderr
        waiting = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_line = waiting.stderr.readline()
        assert "waiting for it to finish" in first_line
    finally:
        lock.__exit__(None, None, None)
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert out.startswith("added 16")
