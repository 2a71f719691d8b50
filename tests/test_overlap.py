"""The overlapped pipeline (indexer/overlap.py): what a user notices when a stage fails or is interrupted, and that
a run with nothing to encode starts nothing heavy. All on the CPU (device="cpu" throughout)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from indexer.encoding import ChunkSink
from indexer.overlap import OverlappedSource
from indexer.pipeline import ImageEncoding, encoding_source, index_paths
from indexer.plan import WorkItem
from indexer.ray_runner import RaySettings, RaySource
from indexer.scan import FileFacts
from retrieval.errors import DiskFullError, ModelLoadError
from retrieval.faults import FAULT_ENV, reset_faults
from retrieval.model.build import build_image_transform
from retrieval.model.device import CPU
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.store.catalog import STATUS_OK, Catalog
from retrieval.store.layout import IndexLayout
from tests.conftest import make_images, write_image
from tests.crash_harness import assert_index_whole, start_child, wait_for_child

ROOT = Path(__file__).resolve().parents[1]


def ok_rows(index_dir: Path) -> int:
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        return catalog.count(STATUS_OK)
    finally:
        catalog.close()


def test_the_workers_transform_is_the_models(tiny_spec, tmp_path):
    """Workers start decoding with a transform built without weights; it must be the loaded model's own."""
    image = Image.open(write_image(tmp_path / "a.jpg", seed=3, size=(200, 120)))
    weightless, cfg = build_image_transform(tiny_spec)
    encoder = Encoder.load(tiny_spec, CPU)
    assert cfg == encoder.identity.preprocess
    assert torch.equal(weightless(image), encoder.preprocess(image))


def test_a_source_feeds_the_sink_every_item_once_in_work_order_after_the_model(settings, tmp_path):
    """The seam (indexer.encoding): the sink hears the encoder once, before any chunk; chunks come one at a time,
    no bigger than a commit, each work item once, in work order, an unreadable file as a failure, not a gap."""
    paths = [str(path) for path in make_images(tmp_path / "photos", 11, seed=8)]
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    paths.insert(4, str(tmp_path / "photos" / "broken.jpg"))
    work = [WorkItem(FileFacts(path, os.path.getsize(path), 0), None) for path in paths]
    events: list = []
    sink = ChunkSink(
        load=lambda: Encoder.load(settings.model, CPU),
        ready=lambda encoder: events.append(("ready", encoder.dim)),
        write=lambda chunk: events.append(("chunk", [(item.facts.path, vector is None) for item, _, vector in chunk])),
    )
    source = encoding_source(settings, ImageEncoding.choose(settings, CPU))
    assert isinstance(source, OverlappedSource)
    assert source.run(work, sink, progress=False) > 0
    assert events[0] == ("ready", 32) and all(kind == "chunk" for kind, _ in events[1:])
    chunks = [chunk for _, chunk in events[1:]]
    assert all(len(chunk) <= settings.chunk_size for chunk in chunks)
    assert [path for chunk in chunks for path, _ in chunk] == paths
    assert [path for chunk in chunks for path, failed in chunk if failed] == [paths[4]]
    ray = replace(settings, ray=RaySettings())
    assert isinstance(encoding_source(ray, ImageEncoding.choose(ray, CPU)), RaySource)


def test_a_failing_writer_stops_the_run_with_its_error(settings, tmp_path, monkeypatch):
    """A full disk at the second commit, in the writer thread: the caller gets the error (no hang), the first
    chunk stays committed, and the next run finishes the job."""
    folder = tmp_path / "photos"
    make_images(folder, 24, seed=5)
    index_dir = tmp_path / "index"
    monkeypatch.setenv(FAULT_ENV, "commit_begin:2:enospc")
    reset_faults()
    with pytest.raises(DiskFullError):
        index_paths(index_dir, [folder], settings, progress=False)
    monkeypatch.delenv(FAULT_ENV)
    assert ok_rows(index_dir) == settings.chunk_size
    assert_index_whole(index_dir)
    summary = index_paths(index_dir, [folder], settings, progress=False)
    assert (summary.unchanged, summary.added) == (settings.chunk_size, 24 - settings.chunk_size)


def test_a_model_that_fails_to_load_in_the_background_says_why(tiny_model_dir, settings, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])  # truncated: the config reads, the weights do not
    make_images(tmp_path / "photos", 4, seed=6)
    spec = ModelSpec(f"local-dir:{broken}", None)
    with pytest.raises(ModelLoadError):
        index_paths(tmp_path / "index", [tmp_path / "photos"], replace(settings, model=spec), progress=False)


@pytest.mark.slow
def test_ctrl_c_stops_promptly_and_leaves_a_resumable_index(settings, tmp_path):
    folder = tmp_path / "photos"
    for i in range(80):
        write_image(folder / f"p{i:03d}.jpg", seed=i, size=(320, 240))
    index_dir = tmp_path / "index"
    slow = replace(settings, batch_size=4, chunk_size=4, workers=1)
    pid = start_child(lambda: index_paths(index_dir, [folder], slow, progress=False))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and wait_for_child(pid, block=False) is None:
        if (index_dir / "catalog.sqlite").exists() and _committed(index_dir) >= 8:
            break
        time.sleep(0.05)
    os.kill(pid, signal.SIGINT)
    stopped = time.monotonic()
    code = None
    while code is None and time.monotonic() - stopped < 30:  # no stage left waiting on another
        code = wait_for_child(pid, block=False)
        time.sleep(0.05)
    if code is None:
        os.kill(pid, signal.SIGKILL)
    assert code == 1, "the interrupted run should end with KeyboardInterrupt within seconds"
    committed = ok_rows(index_dir)
    assert 0 < committed < 80
    assert_index_whole(index_dir)
    summary = index_paths(index_dir, [folder], settings, progress=False)
    assert (summary.unchanged, summary.added) == (committed, 80 - committed)


def _committed(index_dir: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{index_dir / 'catalog.sqlite'}?mode=ro", uri=True, timeout=0.1) as db:
            return db.execute("select count(*) from images where status = ?", (STATUS_OK,)).fetchone()[0]
    except sqlite3.Error:
        return 0


PROBE = """
import atexit, json, sys
def report():
    heavy = [name for name in ("torch", "open_clip", "torchvision") if name in sys.modules]
    print("IMPORTED " + json.dumps(heavy), file=sys.stderr)
atexit.register(report)
from clipsearch.cli import main
sys.argv = ["clipsearch", *sys.argv[1:]]
main()
"""


def test_nothing_to_encode_imports_no_torch(settings, tiny_model_dir, tmp_path):
    """A refresh that finds nothing new, or only moves and deletions, never imports torch nor loads the model."""
    folder = tmp_path / "photos"
    files = make_images(folder, 6, seed=7)
    index_dir = tmp_path / "index"
    index_paths(index_dir, [folder], settings, progress=False)
    command = [sys.executable, "-c", PROBE, "index", "--index", str(index_dir), "-q"]
    command += ["--model", f"local-dir:{tiny_model_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run() -> tuple[str, list[str]]:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
        line = next(line for line in done.stderr.splitlines() if line.startswith("IMPORTED "))
        return done.stdout, json.loads(line.removeprefix("IMPORTED "))

    output, imported = run()
    assert "unchanged 6" in output and imported == []
    files[0].unlink()
    files[1].rename(folder / "renamed.jpg")
    output, imported = run()
    assert "moved 1, removed 1" in output and imported == []


@pytest.mark.parametrize(
    "names",
    [
        ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
        ["pytorch_model.bin", "model.safetensors"],
        ["zeta.bin", "alpha.pth"],
        ["b.safetensors", "a.bin"],
        ["notes.txt"],
    ],
)
def test_checkpoint_lookup_matches_open_clips(tmp_path, names):
    """The weights file is found without importing open_clip (and torch), exactly as open_clip finds it."""
    import open_clip.factory

    from retrieval.model.spec import find_checkpoint_in_dir

    for name in names:
        (tmp_path / name).write_bytes(b"x")
    theirs = open_clip.factory._find_checkpoint_in_dir(tmp_path)
    assert find_checkpoint_in_dir(tmp_path) == (Path(theirs) if theirs else None)


def test_a_tags_transform_is_known_without_its_weights():
    """For a pretrained tag the workers' transform takes the tag's preprocessing, with no download (offline here)."""
    import open_clip

    preprocess, cfg = build_image_transform(ModelSpec("ViT-B-32", "openai"))
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert tuple(cfg["mean"]) == tuple(tag["mean"]) and tuple(cfg["std"]) == tuple(tag["std"])
    assert cfg["size"] in (224, (224, 224))
