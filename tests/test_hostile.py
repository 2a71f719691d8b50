"""A messy disk: every hostile or odd file is indexed correctly or recorded as failed with a reason, never a crash,
a hang, a duplicate or a lost index. The corpus is generated (tests/hostile_corpus.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

import indexer.pipeline
from indexer.pipeline import index_paths
from retrieval.images import MAX_ASPECT, DecodeError, decode_image, read_file
from retrieval.search.engine import SearchEngine
from retrieval.store.catalog import STATUS_FAILED, STATUS_OK, Catalog, ImageRow
from retrieval.store.layout import IndexLayout
from tests.crash_harness import assert_index_whole, run_in_child
from tests.hostile_corpus import (
    animated_gif,
    encoded,
    exif_rotated_jpeg,
    make_hostile_corpus,
    palette_with_transparency,
    picture,
    sixteen_bit,
)


def catalog_rows(index_dir: Path) -> dict[str, ImageRow]:
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        with catalog.session() as session:
            return {row.path: row for row in session.scalars(select(ImageRow))}
    finally:
        catalog.close()


def mismatches(expect: dict, rows: dict[str, ImageRow]) -> list[str]:
    wrong = []
    for path, want in sorted(expect.items()):
        row = rows.get(path)
        got = "no row" if row is None else f"{row.status} {row.error or (row.width, row.height)}"
        if row is None:
            ok = False
        elif want.outcome == "ok":
            ok = row.status == STATUS_OK and (want.size is None or (row.width, row.height) == want.size)
        elif want.outcome == "failed":
            ok = row.status == STATUS_FAILED and want.reason in (row.error or "") and bool(row.error)
        else:
            ok = row.status == STATUS_OK or (row.status == STATUS_FAILED and bool(row.error))
        if not ok:
            wrong.append(f"{os.path.basename(path)!a}: expected {want}, got {got}")
    return wrong


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "disk"
    return folder, make_hostile_corpus(folder)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_hostile_corpus_is_indexed_or_recorded_with_a_reason(hostile, settings, tmp_path, workers):
    folder, expect = hostile
    settings = replace(settings, workers=workers)
    first = index_paths(tmp_path / "index", [folder], settings, progress=False)
    rows = catalog_rows(tmp_path / "index")
    assert mismatches(expect, rows) == []
    assert set(rows) == set(expect), "files were indexed that should not be (hidden, folder links) or twice"
    assert first.added + first.failed == len(expect)
    assert_index_whole(tmp_path / "index")

    again = index_paths(tmp_path / "index", [folder], settings, progress=False)
    assert (again.added, again.updated, again.failed, again.removed) == (0, 0, 0, 0)
    assert again.unchanged == len(expect), "failed files must not be retried until they change"


def test_hostile_kinds_are_covered(hostile):
    """The corpus holds every kind the issue lists (a guard against the corpus quietly shrinking)."""
    _, expect = hostile
    names = " ".join(os.path.basename(path) for path in expect)
    for kind in ("truncated_half.jpg", "truncated_half.png", "truncated_half.gif", "truncated_half.webp", "empty",
                 "notes.jpg", "bomb.png", "bomb.jpg", "cmyk", "gray16", "palette_transparent", "animated.gif",
                 "exif_rotated", "caf\udce9", "loop.jpg", "pipe.jpg", "dangling"):  # fmt: skip
        assert kind in names
    assert len(expect) >= 50


# --- odd but valid images are read as a person sees them ---------------------------------------------------------


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_exif_rotated_photo_is_upright():
    image = picture(8)
    rotated = decode_image(exif_rotated_jpeg(image, orientation=6))
    plain = decode_image(encoded(image, "JPEG", exif=Image.Exif().tobytes(), quality=95))
    assert rotated.size == (60, 80)
    assert np.array_equal(pixels(rotated), pixels(plain.transpose(Image.Transpose.ROTATE_270)))


def test_animated_gif_is_its_first_frame():
    frames = [picture(10), picture(11), picture(12)]
    decoded = decode_image(animated_gif(frames))
    assert np.array_equal(pixels(decoded), pixels(decode_image(encoded(frames[0], "GIF"))))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_transparency_is_flattened_on_white(fmt):
    decoded = decode_image(palette_with_transparency(fmt))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.getpixel((50, 50)) != (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_images_keep_their_tones(fmt):
    decoded = decode_image(sixteen_bit(fmt))
    assert np.abs(pixels(decoded) - pixels(picture(6).convert("L").convert("RGB"))).max() <= 1


def test_cmyk_jpeg_keeps_its_colours():
    decoded = decode_image(encoded(picture(2).convert("CMYK"), "JPEG", quality=95))
    assert decoded.mode == "RGB"
    assert np.abs(pixels(decoded) - pixels(picture(2))).mean() < 5


def test_a_300_byte_sliver_cannot_blow_up_the_resize():
    """1 x 100000 pixels: CLIP's shortest-side resize would make it 64 x 6.4 million (gigabytes)."""
    decoded = decode_image(encoded(Image.new("RGB", (1, 100_000), (30, 160, 90)), "PNG"))
    assert max(decoded.size) <= MAX_ASPECT * min(decoded.size)
    assert decoded.getpixel((0, 0)) == (30, 160, 90)


# --- names, links and files that change under the indexer --------------------------------------------------------


def test_names_that_are_not_utf8_round_trip(hostile, settings, tmp_path):
    """Latin-1 names are indexed under their exact bytes, found again, searchable, and usable as query paths."""
    folder, _ = hostile
    odd_folder = os.fsdecode(os.path.join(os.fsencode(folder), b"f\xf6lder"))
    odd_file = os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9 latin-1.jpg"))
    index_dir = tmp_path / "index"
    index_paths(index_dir, [Path(odd_folder)], settings, progress=False)
    index_paths(index_dir, [folder], settings, progress=False)  # the parent folder absorbs the odd root
    rows = catalog_rows(index_dir)
    assert rows[odd_file].status == STATUS_OK
    assert os.path.exists(rows[odd_file].path)
    again = index_paths(index_dir, [], settings, progress=False)
    assert again.added == again.updated == again.removed == 0

    with SearchEngine(index_dir, device="cpu") as engine:
        similar = engine.search_image(odd_file, k=3)
        inside = engine.search_text("a photo", k=5, under=odd_folder)
    assert similar and all(result.path != odd_file for result in similar)
    assert [result.path for result in inside] == [os.path.join(odd_folder, "inside.jpg")]
    shown = inside[0].to_dict()["path"]  # JSON output (CLI --json, web app) must encode as strict UTF-8
    assert json.dumps(shown, ensure_ascii=False).encode("utf-8") and shown.endswith("/f\\xf6lder/inside.jpg")


@pytest.mark.slow
def test_cli_prints_undecodable_names_as_their_bytes(hostile, settings, tmp_path):
    folder, _ = hostile
    index_paths(tmp_path / "index", [folder], settings, progress=False)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # a desktop UTF-8 locale, not Python's C fallback
    script = "from clipsearch.cli import main; main()"
    command = [sys.executable, "-c", script, "search", "photo", "--index", str(tmp_path / "index"), "-k", "60"]
    result = subprocess.run([*command, "--paths"], env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert b"/caf\xe9 latin-1.jpg\n" in result.stdout


def test_file_vanishing_or_turning_into_a_pipe_between_scan_and_decode(settings, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    for n, name in enumerate(["stays.jpg", "vanishes.jpg", "becomes_pipe.jpg"]):
        encoded_bytes = encoded(picture(20 + n), "JPEG")
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(encoded_bytes)
    plan_changes = indexer.pipeline.plan_changes

    def plan_then_disturb(*args, **kwargs):
        plan = plan_changes(*args, **kwargs)
        (folder / "vanishes.jpg").unlink()
        (folder / "becomes_pipe.jpg").unlink()
        os.mkfifo(folder / "becomes_pipe.jpg")  # reading it would block forever
        return plan

    monkeypatch.setattr(indexer.pipeline, "plan_changes", plan_then_disturb)
    index_paths(tmp_path / "index", [folder], settings, progress=False)
    rows = catalog_rows(tmp_path / "index")
    assert rows[str(folder / "stays.jpg")].status == STATUS_OK
    assert rows[str(folder / "vanishes.jpg")].error == "file vanished before it could be read"
    assert rows[str(folder / "becomes_pipe.jpg")].error == "not a regular file"
    monkeypatch.undo()

    summary = index_paths(tmp_path / "index", [folder], settings, progress=False)
    assert summary.removed == 1  # the vanished file is gone from the index too
    assert_index_whole(tmp_path / "index")


def test_read_file_refuses_special_files_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError, match="not a regular file"):
        read_file(fifo)
    with pytest.raises(DecodeError, match="not a regular file"):
        read_file("/dev/zero")  # a device that never ends
    with pytest.raises(DecodeError, match="is a folder"):
        read_file(tmp_path)


def test_unreadable_files_and_folders_are_recorded(tiny_model_dir, settings):
    """chmod 000 on a file and a folder. Root reads anything, so as root the indexer runs as 'nobody' in a child."""
    shared = Path(tempfile.mkdtemp(prefix="clipsearch-perm-"))
    try:
        shared.chmod(0o777)
        model = shutil.copytree(tiny_model_dir, shared / "model")
        folder = shared / "photos"
        (folder / "locked").mkdir(parents=True)
        (folder / "fine.jpg").write_bytes(encoded(picture(30), "JPEG"))
        (folder / "secret.jpg").write_bytes(encoded(picture(31), "JPEG"))
        (folder / "locked" / "inside.jpg").write_bytes(encoded(picture(32), "JPEG"))
        for path in [shared, model, *model.iterdir(), folder]:
            path.chmod(path.stat().st_mode | stat.S_IRWXO if path.is_dir() else 0o644)
        (folder / "secret.jpg").chmod(0)
        (folder / "locked").chmod(0)
        index_dir = shared / "index"
        child_settings = replace(settings, model=replace(settings.model, name=f"local-dir:{model}"))

        def index_as_nobody():
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            index_paths(index_dir, [folder], child_settings, progress=False)

        assert run_in_child(index_as_nobody) == 0
        rows = catalog_rows(index_dir)
        assert rows[str(folder / "fine.jpg")].status == STATUS_OK
        assert rows[str(folder / "secret.jpg")].error == "unreadable: Permission denied"
        assert rows[str(folder / "locked")].error == "cannot read folder: Permission denied"
    finally:
        (shared / "photos" / "locked").chmod(0o755)
        shutil.rmtree(shared, ignore_errors=True)
