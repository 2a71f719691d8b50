"""`clipsearch index --ray`: the same answer as a local run, and the faults a cluster meets, on a real local Ray
cluster (one for the whole module, two CPUs) with the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from clipsearch.cli.app import app
from indexer.pipeline import IndexSettings, index_paths
from indexer.ray_runner import RayPathError, RaySettings, check_worker_read
from retrieval.faults import AFTER_COMMITS_ENV, FAULT_ENV
from retrieval.store.catalog import Catalog, ImageRow
from retrieval.store.layout import IndexLayout
from tests.conftest import make_images
from tests.crash_harness import EMBEDDING_TOLERANCE, assert_index_whole, stored_embeddings

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
FILES = 13  # 10 photos and 3 broken files


@pytest.fixture(scope="module")
def cluster() -> str:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray") / "photos"
    make_images(folder, 6, seed=3)
    make_images(folder / "png", 4, seed=4, suffix=".png")
    (folder / "notes.jpg").write_bytes(b"a text file named like a photo")
    (folder / "empty.png").write_bytes(b"")
    truncated = (folder / "img_3_000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    return folder


@pytest.fixture(scope="module")
def local_index(folder, tiny_spec, tmp_path_factory) -> Path:
    index_dir = tmp_path_factory.mktemp("local") / "index"
    index_paths(index_dir, [folder], IndexSettings(model=tiny_spec, batch_size=4, workers=0), progress=False)
    return index_dir


def ray_settings(tiny_spec, address: str = "auto") -> IndexSettings:
    return IndexSettings(
        model=tiny_spec, batch_size=4, workers=0, chunk_size=4, ray=RaySettings(address=address, block_rows=4)
    )


def catalog_rows(index_dir: Path) -> dict[str, tuple]:
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        with catalog.session() as session:
            rows = session.scalars(select(ImageRow).order_by(ImageRow.id))
            return {
                r.path: (r.id, r.size, r.mtime_ns, r.content_hash, r.width, r.height, r.status, r.error) for r in rows
            }
    finally:
        catalog.close()


def test_ray_index_gives_the_local_answer(cluster, folder, local_index, tiny_model_dir, tmp_path):
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(
        app,
        ["index", str(folder), "--index", str(index_dir), "--model", f"local-dir:{tiny_model_dir}",
         "--batch-size", "4", "--ray", "auto", "--ray-workers", "1", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "added 10" in result.output and "failed 3" in result.output
    rows, expected = catalog_rows(index_dir), catalog_rows(local_index)
    assert rows == expected  # same ids, facts, hashes, sizes in pixels, failures and their reasons
    reasons = sorted(row[7].split(" (")[0] for row in rows.values() if row[7])
    assert reasons == ["corrupt or truncated image", "empty file", "not an image"]
    reference = stored_embeddings(local_index)
    vectors = assert_index_whole(index_dir, reference, complete=True)
    assert max(np.abs(vectors[p] - reference[p]).max() for p in reference) < EMBEDDING_TOLERANCE


def test_killed_encoder_actor_is_replaced_and_nothing_is_lost(cluster, folder, local_index, tiny_spec, tmp_path):
    """The actor dies by SIGKILL at its third batch; Ray starts another and retries what the dead one held."""
    index_dir = tmp_path / "index"
    os.environ[FAULT_ENV] = "encode_batch:3"  # forwarded to the actors only; the driver never passes there
    try:
        with ActorWatch("EncodeActor") as actors:
            summary = index_paths(index_dir, [folder], ray_settings(tiny_spec), progress=False)
    finally:
        del os.environ[FAULT_ENV]
    assert len(actors.pids) >= 2, "the fault did not fire: one encoder process did all the work"
    assert (summary.added, summary.failed) == (10, 3)
    assert catalog_rows(index_dir) == catalog_rows(local_index)
    assert_index_whole(index_dir, stored_embeddings(local_index), complete=True)


class ActorWatch:
    """Every process whose title names ``name`` while the block runs (Ray titles actor processes by class)."""

    def __init__(self, name: str):
        self.name, self.pids, self.done = name.encode(), set(), threading.Event()

    def __enter__(self) -> ActorWatch:
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.done.wait(0.1):
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and self.name in (entry / "cmdline").read_bytes():
                        self.pids.add(int(entry.name))
                except OSError:
                    continue


def test_killed_driver_resumes_from_its_last_commit(cluster, folder, local_index, tiny_spec, tmp_path):
    index_dir = tmp_path / "index"
    script = (
        "import sys; from pathlib import Path; from tests.test_ray import ray_settings; "
        "from indexer.pipeline import index_paths; from retrieval.model.spec import ModelSpec; "
        "index_paths(Path(sys.argv[1]), [Path(sys.argv[2])], "
        "ray_settings(ModelSpec(sys.argv[3], None), sys.argv[4]), progress=False)"
    )
    env = {**os.environ, AFTER_COMMITS_ENV: "1", "PYTHONPATH": str(REPO)}
    env.pop(FAULT_ENV, None)
    child = subprocess.run(
        [sys.executable, "-c", script, str(index_dir), str(folder), tiny_spec.name, cluster],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr[-2000:]
    reference = stored_embeddings(local_index)
    committed = assert_index_whole(index_dir, reference)
    assert 0 < len(catalog_rows(index_dir)) < FILES
    summary = index_paths(index_dir, [folder], ray_settings(tiny_spec, cluster), progress=False)
    assert summary.encoded == 10 - len(committed)  # resumed: nothing committed was encoded again
    assert_index_whole(index_dir, reference, complete=True)
    assert set(catalog_rows(index_dir)) == set(catalog_rows(local_index))


def test_a_worker_that_cannot_read_a_readable_file_is_an_error(folder):
    readable = str(folder / "img_3_001.jpg")
    with pytest.raises(RayPathError, match="same path"):
        check_worker_read(readable, "file vanished before it could be read", "node-b")
    check_worker_read(str(folder / "gone.jpg"), "file vanished before it could be read", "node-b")  # truly gone
    check_worker_read(readable, "not an image (unknown or corrupt format)", "node-b")  # the file's own fault
