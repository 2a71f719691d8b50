"""Fault injection: kill the indexer at every step (SIGKILL, no cleanup) and fill its disk; the index stays whole.

Each kill point is named in ``retrieval/faults.py``. After every kill the index must open, pass ``check``, answer a
search, and hold only correct embeddings; the next run must finish the job with nothing lost, nothing duplicated
and nothing re-encoded that was already committed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from indexer.pipeline import IndexSettings, index_paths
from retrieval.errors import DiskFullError, EmptyIndexError
from retrieval.faults import FAULT_ENV, reset_faults
from retrieval.store.catalog import STATUS_OK, Catalog
from retrieval.store.layout import IndexLayout
from tests.conftest import make_images, write_image
from tests.crash_harness import KILLED, assert_index_whole, run_in_child, stored_embeddings

STEPS = ("commit_begin", "commit_end", "vectors_tmp_written", "vectors_replaced")
COMMITS = 3  # 12 files in chunks of 4; the incremental world also needs 3 (moves+removals, then 4 + 1 files)
KILL_POINTS = ["planned:1"] + [f"{step}:{n}" for step in STEPS for n in range(1, COMMITS + 1)]
FIXED_MTIME_NS = 1_600_000_000 * 10**9


@pytest.fixture(scope="module")
def crash_settings(tiny_spec) -> IndexSettings:
    """Small chunks and a FAISS save after every commit: many distinct kill points in a dozen files."""
    return IndexSettings(model=tiny_spec, batch_size=4, workers=0, chunk_size=4, save_every_s=0.0, device="cpu")


def ok_count(index_dir: Path) -> int:
    try:
        catalog = Catalog(IndexLayout(index_dir).catalog)
    except EmptyIndexError:  # not created yet
        return 0
    try:
        return catalog.count(STATUS_OK)
    finally:
        catalog.close()


# --- a first run over a new folder --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, crash_settings):
    """A folder of 12 images and the embeddings a clean, uninterrupted run stores for them."""
    root = tmp_path_factory.mktemp("fresh")
    folder = root / "photos"
    make_images(folder, 8, seed=31)
    make_images(folder / "nested", 4, seed=32, suffix=".png")
    index_paths(root / "clean", [folder], crash_settings, progress=False)
    return folder, stored_embeddings(root / "clean")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_first_run_resumes_whole(point, fresh, crash_settings, tmp_path):
    folder, reference = fresh
    index_dir = tmp_path / "index"
    code = run_in_child(lambda: index_paths(index_dir, [folder], crash_settings, progress=False), fault=point)
    assert code == KILLED, f"the run was not killed at {point} (exit {code})"
    committed = ok_count(index_dir)
    assert_index_whole(index_dir, reference)

    summary = index_paths(index_dir, [folder], crash_settings, progress=False)
    assert summary.unchanged == committed, "committed work was encoded again"
    assert summary.added == len(reference) - committed
    assert_index_whole(index_dir, reference, complete=True)


def test_killed_after_every_commit_until_done(fresh, crash_settings, tmp_path):
    """Crash, restart, crash again: each run commits one chunk and dies, and the runs add up to a clean one."""
    folder, reference = fresh
    index_dir = tmp_path / "index"
    runs = 0
    while True:
        runs += 1
        code = run_in_child(lambda: index_paths(index_dir, [folder], crash_settings, progress=False), after_commits=1)
        if code == 0:
            break
        assert code == KILLED
        assert ok_count(index_dir) == min(4 * runs, len(reference))
        assert_index_whole(index_dir, reference)
        assert runs <= COMMITS, "the runs make no progress"
    assert runs == COMMITS + 1
    assert_index_whole(index_dir, reference, complete=True)


# --- an incremental run: moves, removals, changes and new files ---------------------------------------------------


def make_base(folder: Path) -> None:
    """12 files with fixed modification times, so a rebuilt folder looks unchanged to a saved index."""
    if folder.exists():
        shutil.rmtree(folder)
    for i, path in enumerate(make_images(folder, 12, seed=41)):
        os.utime(path, ns=(FIXED_MTIME_NS + i, FIXED_MTIME_NS + i))


def mutate(folder: Path) -> None:
    """Remove 2, move 2 (one into a new sub-folder), rewrite 2, add 3 (one of them broken)."""
    files = sorted(folder.glob("*.jpg"))
    files[0].unlink()
    files[1].unlink()
    files[2].rename(folder / "renamed.jpg")
    (folder / "moved").mkdir()
    files[3].rename(folder / "moved" / files[3].name)
    for n, path in enumerate(files[4:6]):
        write_image(path, seed=900 + n)
        os.utime(path, ns=(FIXED_MTIME_NS + 100 + n,) * 2)
    for n in range(2):
        write_image(folder / "moved" / f"new_{n}.jpg", seed=950 + n)
    (folder / "new_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    for path in folder.rglob("new_*"):
        os.utime(path, ns=(FIXED_MTIME_NS + 200,) * 2)


@pytest.fixture(scope="module")
def incremental(tmp_path_factory, crash_settings):
    """A saved index of the base folder, and the embeddings a clean run stores for the mutated folder."""
    root = tmp_path_factory.mktemp("incremental")
    folder = root / "photos"
    make_base(folder)
    index_paths(root / "base", [folder], crash_settings, progress=False)
    mutate(folder)
    index_paths(root / "clean", [folder], crash_settings, progress=False)
    return folder, root / "base", stored_embeddings(root / "clean")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_incremental_run_resumes_whole(point, incremental, crash_settings, tmp_path):
    folder, base_index, reference = incremental
    make_base(folder)
    base = stored_embeddings(base_index)
    index_dir = tmp_path / "index"
    shutil.copytree(base_index, index_dir)
    mutate(folder)

    code = run_in_child(lambda: index_paths(index_dir, [folder], crash_settings, progress=False), fault=point)
    assert code == KILLED, f"the run was not killed at {point} (exit {code})"
    partial = assert_index_whole(index_dir)
    for path, vector in partial.items():  # every stored vector is the old or the new one for its path
        old, new = base.get(path), reference.get(path)
        assert any(v is not None and abs(vector - v).max() < 2e-3 for v in (old, new)), path

    summary = index_paths(index_dir, [folder], crash_settings, progress=False)
    assert summary.failed <= 1
    assert_index_whole(index_dir, reference, complete=True)
    assert sorted(stored_embeddings(index_dir)) == sorted(reference)


# --- kill -9 from outside, at random moments ----------------------------------------------------------------------

RUNNER = """
import sys
from pathlib import Path
from indexer.pipeline import IndexSettings, index_paths
from retrieval.model.spec import ModelSpec
settings = IndexSettings(
    ModelSpec(sys.argv[3], None), batch_size=4, workers=1, chunk_size=4, save_every_s=0.0, device="cpu"
)
print(index_paths(Path(sys.argv[1]), [Path(sys.argv[2])], settings, progress=False).line())
"""


@pytest.mark.slow
def test_random_external_kills(tiny_spec, crash_settings, tmp_path):
    """Real processes (with a DataLoader worker) killed by SIGKILL at random moments of the work, then a run to the
    end. Each kill waits for a random amount of committed progress plus a random few milliseconds."""
    folder = tmp_path / "photos"
    make_images(folder, 40, seed=51)
    index_paths(tmp_path / "clean", [folder], crash_settings, progress=False)
    reference = stored_embeddings(tmp_path / "clean")
    index_dir = tmp_path / "index"
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", RUNNER, str(index_dir), str(folder), tiny_spec.name]
    kills = []
    for threshold in sorted(rng.sample(range(0, 29), 4)):
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while ok_count(index_dir) < threshold and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.08))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        _kill_group(process.pid)  # orphaned decoder workers
        if process.returncode == KILLED:
            kills.append(ok_count(index_dir))
        assert_index_whole(index_dir, reference)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_index_whole(index_dir, reference, complete=True)
    assert len(kills) >= 3, f"too few runs were killed mid-way: {kills}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# --- a disk that fills up -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["commit_begin:2", "vectors_tmp_written:2", "vectors_replaced:1"])
def test_injected_disk_full_is_a_clear_error_and_the_index_stays_whole(
    point, fresh, crash_settings, tmp_path, monkeypatch
):
    folder, reference = fresh
    index_dir = tmp_path / "index"
    monkeypatch.setenv(FAULT_ENV, f"{point}:enospc")
    reset_faults()
    with pytest.raises(DiskFullError, match="disk holding .* is full: the index is intact"):
        index_paths(index_dir, [folder], crash_settings, progress=False)
    monkeypatch.delenv(FAULT_ENV)
    assert not list(index_dir.glob(".*.tmp")), "a temporary FAISS file was left behind"
    assert_index_whole(index_dir, reference)
    index_paths(index_dir, [folder], crash_settings, progress=False)
    assert_index_whole(index_dir, reference, complete=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MB tmpfs (room for a small index in 16 KB pages and its WAL); skipped where mounting is not allowed
    (not root, containers without CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_real_full_disk(small_disk, crash_settings, tmp_path):
    folder = tmp_path / "photos"
    make_images(folder / "first", 4, seed=60)
    make_images(folder, 40, seed=61)
    index_paths(tmp_path / "clean", [folder], crash_settings, progress=False)
    reference = stored_embeddings(tmp_path / "clean")
    index_dir = small_disk / "index"
    settings = replace(crash_settings, chunk_size=2)
    index_paths(index_dir, [folder / "first"], settings, progress=False)  # an index exists, then the disk fills
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 96 * 1024))  # room for a few commits

    with pytest.raises(DiskFullError, match="is full"):
        index_paths(index_dir, [folder], settings, progress=False)
    assert_index_whole(index_dir, reference)
    filler.unlink()
    index_paths(index_dir, [folder], settings, progress=False)
    assert_index_whole(index_dir, reference, complete=True)
