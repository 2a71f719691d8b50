"""Indexing a folder and keeping the index in step with it: the real pipeline, catalog and FAISS, made small."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.pipeline import index_paths
from retrieval.errors import ModelMismatchError, UsageError
from retrieval.model.spec import ModelSpec
from retrieval.search.engine import SearchEngine
from retrieval.store.catalog import STATUS_FAILED, STATUS_OK, Catalog
from retrieval.store.layout import IndexLayout
from retrieval.store.vectors import VectorIndex
from retrieval.testing import make_random_model_dir
from tests.conftest import make_images, write_image


def catalog_and_faiss_agree(index_dir: Path) -> set[int]:
    """The invariant every run must keep: the saved FAISS ids are exactly the catalog's ok rows."""
    layout = IndexLayout(index_dir)
    catalog = Catalog(layout.catalog)
    with catalog.session() as session:
        from sqlalchemy import select

        from retrieval.store.catalog import ImageRow

        ok_ids = set(session.scalars(select(ImageRow.id).where(ImageRow.status == STATUS_OK)))
    catalog.close()
    faiss_ids = VectorIndex.load(layout.vectors).ids()
    assert len(faiss_ids) == len(set(faiss_ids)), "duplicate ids in FAISS"
    assert set(faiss_ids.tolist()) == ok_ids
    return ok_ids


def indexed_paths(index_dir: Path) -> dict[str, str]:
    catalog = Catalog(IndexLayout(index_dir).catalog)
    with catalog.session() as session:
        from sqlalchemy import select

        from retrieval.store.catalog import ImageRow

        rows = {row.path: row.status for row in session.scalars(select(ImageRow))}
    catalog.close()
    return rows


def test_first_index_then_nothing_to_do(tmp_path, photo_folder, settings):
    index_dir = tmp_path / "index"
    first = index_paths(index_dir, [photo_folder], settings, progress=False)
    assert (first.added, first.failed, first.unchanged) == (16, 0, 0)
    assert len(catalog_and_faiss_agree(index_dir)) == 16

    again = index_paths(index_dir, [photo_folder], settings, progress=False)
    assert (again.added, again.updated, again.removed, again.unchanged, again.encoded) == (0, 0, 0, 16, 0)
    assert "unchanged 16" in again.line()


def test_reindex_tracks_added_modified_deleted_and_moved_files(tmp_path, photo_folder, settings):
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photo_folder], settings, progress=False)
    ids_before = {path: row for path, row in _rows(index_dir).items()}

    added = write_image(photo_folder / "new.jpg", seed=999)
    modified = photo_folder / "img_1_000.jpg"
    write_image(modified, seed=4242)
    os.utime(modified, ns=(1, 1_000_000_000))  # a different mtime even on coarse file systems
    deleted = photo_folder / "img_1_001.jpg"
    deleted.unlink()
    moved_from = photo_folder / "img_1_002.jpg"
    moved_to = photo_folder / "renamed" / "beach.jpg"
    moved_to.parent.mkdir()
    shutil.move(moved_from, moved_to)

    summary = index_paths(index_dir, [photo_folder], settings, progress=False)
    assert (summary.added, summary.updated, summary.removed, summary.moved) == (1, 1, 1, 1)
    assert summary.encoded == 2  # the moved file kept its vector
    rows = _rows(index_dir)
    assert str(added) in rows and str(deleted) not in rows and str(moved_from) not in rows
    assert rows[str(moved_to)][0] == ids_before[str(moved_from)][0]  # same catalog key, same vector
    assert rows[str(moved_to)][1] == ids_before[str(moved_from)][1]
    assert rows[str(modified)][1] != ids_before[str(modified)][1]
    catalog_and_faiss_agree(index_dir)


def _rows(index_dir: Path) -> dict[str, tuple[int, bytes]]:
    catalog = Catalog(IndexLayout(index_dir).catalog)
    with catalog.session() as session:
        from sqlalchemy import select

        from retrieval.store.catalog import ImageRow

        rows = {row.path: (row.id, row.embedding) for row in session.scalars(select(ImageRow))}
    catalog.close()
    return rows


def test_duplicate_files_are_each_indexed_and_find_each_other(tmp_path, settings):
    folder = tmp_path / "dupes"
    make_images(folder, 5, seed=3)
    shutil.copy(folder / "img_3_000.jpg", folder / "copy_of_first.jpg")
    index_dir = tmp_path / "index"
    assert index_paths(index_dir, [folder], settings, progress=False).added == 6
    with SearchEngine(index_dir, device="cpu") as engine:
        results = engine.search_image(folder / "img_3_000.jpg", k=3)
    assert results[0].path == str(folder / "copy_of_first.jpg")
    assert results[0].score == pytest.approx(1.0, abs=1e-3)


def test_no_path_refreshes_every_known_folder(tmp_path, settings):
    first, second = tmp_path / "a", tmp_path / "b"
    make_images(first, 3, seed=5)
    make_images(second, 2, seed=6)
    index_dir = tmp_path / "index"
    index_paths(index_dir, [first], settings, progress=False)
    index_paths(index_dir, [second], settings, progress=False)
    write_image(first / "later.jpg", seed=77)
    (second / "img_6_000.jpg").unlink()
    summary = index_paths(index_dir, [], settings, progress=False)
    assert (summary.added, summary.removed, summary.unchanged) == (1, 1, 4)


def test_missing_root_keeps_its_images(tmp_path, settings):
    """An unmounted drive is not a deletion: its images stay searchable."""
    drive = tmp_path / "drive"
    make_images(drive, 3, seed=8)
    index_dir = tmp_path / "index"
    index_paths(index_dir, [drive], settings, progress=False)
    shutil.move(drive, tmp_path / "elsewhere")
    summary = index_paths(index_dir, [], settings, progress=False)
    assert summary.removed == 0 and any("folder not found" in w for w in summary.warnings)
    assert len(indexed_paths(index_dir)) == 3


def test_a_renamed_photos_folder_is_a_move_not_a_second_copy(tmp_path, settings):
    """Renaming the indexed folder and indexing it under its new name used to double every result for good."""
    old, new = tmp_path / "photos", tmp_path / "pictures"
    make_images(old, 4, seed=9)
    index_dir = tmp_path / "index"
    index_paths(index_dir, [old], settings, progress=False)
    before = catalog_and_faiss_agree(index_dir)
    old.rename(new)
    write_image(new / "added.jpg", seed=99)
    summary = index_paths(index_dir, [new], settings, progress=False)
    assert (summary.moved, summary.added, summary.encoded, summary.removed) == (4, 1, 1, 0)
    paths = indexed_paths(index_dir)
    assert len(paths) == 5 and all(path.startswith(str(new) + "/") for path in paths)
    assert before < catalog_and_faiss_agree(index_dir)  # the same rows (vectors kept) plus the new one
    assert any("no longer indexed" in w for w in summary.warnings)
    catalog = Catalog(IndexLayout(index_dir).catalog)
    assert catalog.roots() == [str(new)]
    catalog.close()
    assert index_paths(index_dir, [], settings, progress=False).warnings == []


def test_forget_removes_a_folder_and_its_images_only(tmp_path, settings):
    from typer.testing import CliRunner

    from clipsearch.cli import app

    keep, drop = tmp_path / "keep", tmp_path / "drop"
    make_images(keep, 3, seed=10)
    make_images(drop, 2, seed=11)
    index_dir = tmp_path / "index"
    index_paths(index_dir, [keep], settings, progress=False)
    index_paths(index_dir, [drop], settings, progress=False)
    shutil.rmtree(drop)  # a folder that no longer exists can be forgotten too

    def forget(*args):
        return CliRunner().invoke(app, ["forget", *map(str, args), "--index", str(index_dir)])

    inside = forget(keep / "sub")
    assert inside.exit_code != 0 and "inside the indexed folder" in inside.output
    assert forget(tmp_path / "never").exit_code != 0
    done = forget(drop)
    assert done.exit_code == 0 and "2 images removed" in done.output, done.output
    assert set(indexed_paths(index_dir)) == {str(p) for p in keep.iterdir()}
    assert len(catalog_and_faiss_agree(index_dir)) == 3
    again = index_paths(index_dir, [], settings, progress=False)
    assert again.warnings == [] and again.unchanged == 3
    assert all(path.exists() for path in keep.iterdir())


def test_each_kind_of_bad_input_is_recorded_and_the_rest_indexed(tmp_path, settings):
    folder = tmp_path / "messy"
    make_images(folder, 4, seed=9)
    good = write_image(folder / "good.jpg", seed=10, size=(200, 150))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture")
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    _write_bomb(folder / "bomb.png")
    (folder / "broken_link.jpg").symlink_to(folder / "does_not_exist.jpg")
    unreadable = folder / "secret.jpg"
    write_image(unreadable, seed=11)
    unreadable.chmod(0)
    hidden = folder / ".hidden.jpg"
    write_image(hidden, seed=12)

    index_dir = tmp_path / "index"
    summary = index_paths(index_dir, [folder], settings, progress=False)
    rows = indexed_paths(index_dir)
    expected_failed = {"zero.jpg", "text.jpg", "truncated.jpg", "corrupt.png", "bomb.png", "broken_link.jpg"}
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        expected_failed.add("secret.jpg")
    failed = {Path(p).name for p, status in rows.items() if status == STATUS_FAILED}
    assert failed == expected_failed
    assert summary.failed == len(expected_failed)
    assert str(hidden) not in rows
    assert summary.added == len(rows) - len(expected_failed)
    reasons = {Path(r.path).name: r.error for r in _failed_rows(index_dir)}
    assert reasons["zero.jpg"] == "empty file"
    assert "not an image" in reasons["text.jpg"]
    assert "bomb" in reasons["bomb.png"]
    assert "symbolic link" in reasons["broken_link.jpg"]

    again = index_paths(index_dir, [folder], settings, progress=False)
    assert again.failed == 0 and again.encoded == 0, "failed files are not retried until they change"
    write_image(folder / "text.jpg", seed=13)
    fixed = index_paths(index_dir, [folder], settings, progress=False)
    assert (fixed.updated, fixed.failed) == (1, 0)
    catalog_and_faiss_agree(index_dir)


def _failed_rows(index_dir: Path):
    catalog = Catalog(IndexLayout(index_dir).catalog)
    rows = catalog.failed_rows()
    catalog.close()
    return rows


def _write_bomb(path: Path) -> None:
    """A valid PNG header declaring 100k x 100k pixels: refused before any pixel is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_exif_rotation_cmyk_palette_and_animated_gif_are_indexed(tmp_path, settings):
    folder = tmp_path / "odd"
    folder.mkdir()
    base = Image.open(write_image(tmp_path / "src.jpg", seed=20, size=(120, 60))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    base.save(folder / "rotated.jpg", exif=exif)
    base.convert("CMYK").save(folder / "cmyk.jpg")
    base.convert("P").save(folder / "palette.png", transparency=0)
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    index_dir = tmp_path / "index"
    summary = index_paths(index_dir, [folder], settings, progress=False)
    assert (summary.added, summary.failed) == (4, 0)
    catalog = Catalog(IndexLayout(index_dir).catalog)
    rotated = catalog.row_by_path(str(folder / "rotated.jpg"))
    catalog.close()
    assert (rotated.width, rotated.height) == (60, 120)  # upright size as the user sees it


def test_model_mismatch_is_refused(tmp_path, photo_folder, settings):
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photo_folder], settings, progress=False)
    other = make_random_model_dir(tmp_path / "other-model", seed=1)
    with pytest.raises(ModelMismatchError, match="built with"):
        index_paths(index_dir, [photo_folder], replace(settings, model=ModelSpec(f"local-dir:{other}")), False)
    with pytest.raises(ModelMismatchError):
        SearchEngine(index_dir, model=ModelSpec(f"local-dir:{other}"), device="cpu")


def test_missing_and_empty_folders_are_clear_errors(tmp_path, settings):
    with pytest.raises(UsageError, match="no such folder"):
        index_paths(tmp_path / "index", [tmp_path / "nope"], settings, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        index_paths(tmp_path / "index", [tmp_path / "empty"], settings, progress=False)
    with pytest.raises(UsageError, match="nothing indexed yet"):
        index_paths(tmp_path / "index", [], settings, progress=False)


def test_stale_or_missing_faiss_file_is_rebuilt_from_the_catalog(tmp_path, photo_folder, settings):
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photo_folder], settings, progress=False)
    with SearchEngine(index_dir, device="cpu") as engine:
        before = engine.search_text("a photo", k=5)
    IndexLayout(index_dir).vectors.unlink()
    with SearchEngine(index_dir, device="cpu") as engine:
        after = engine.search_text("a photo", k=5)
    assert [r.path for r in after] == [r.path for r in before]
    np.testing.assert_allclose([r.score for r in after], [r.score for r in before], atol=1e-6)


@pytest.mark.parametrize("part", ["vectors", "ids"])
def test_a_current_faiss_file_with_flipped_bytes_is_rebuilt_not_used(tmp_path, photo_folder, settings, part):
    """The generation says the file is current, but its bytes were damaged: the sample check on open notices,
    and the answers are the catalog's, not a wrong image at rank 1 with score 1.000."""
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photo_folder], settings, progress=False)
    with SearchEngine(index_dir, device="cpu") as engine:
        before = engine.search_text("a photo", k=5)
    path = IndexLayout(index_dir).vectors
    data = bytearray(path.read_bytes())
    ids_bytes = 16 * 8  # IndexIDMap2 ends with its int64 id map
    start, end = (
        (len(data) // 3, len(data) - ids_bytes - 64) if part == "vectors" else (len(data) - ids_bytes, len(data))
    )
    data[start:end] = bytes(b ^ 0x5A for b in data[start:end])
    path.write_bytes(bytes(data))
    with SearchEngine(index_dir, device="cpu") as engine:
        after = engine.search_text("a photo", k=5)
    assert [r.path for r in after] == [r.path for r in before]
    np.testing.assert_allclose([r.score for r in after], [r.score for r in before], atol=1e-6)


@pytest.mark.slow
def test_worker_processes_give_the_same_vectors_as_in_process_decoding(tmp_path, photo_folder, settings):
    in_process = index_paths(tmp_path / "a", [photo_folder], settings, progress=False)
    workers = index_paths(tmp_path / "b", [photo_folder], replace(settings, workers=2), progress=False)
    assert in_process.added == workers.added == 16
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert {p: e for p, (_, e) in a.items()} == {p: e for p, (_, e) in b.items()}
