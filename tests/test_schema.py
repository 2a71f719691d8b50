"""The catalog's format over time: an older index is migrated (atomically, once) or refused clearly, never misread;
paths are stored exactly, whatever their bytes and case."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.check import check_index
from indexer.pipeline import index_paths
from retrieval.errors import ClipsearchError, EmptyIndexError, IndexCorruptError
from retrieval.search.engine import SearchEngine
from retrieval.store.catalog import SCHEMA_VERSION, STATUS_OK, Catalog
from retrieval.store.paths import ESC, from_stored, to_stored
from tests.conftest import make_images
from tests.crash_harness import KILLED, run_in_child

V1_DUMP = Path(__file__).parent / "fixtures" / "robust" / "catalog_v1.sql"


def load_v1(index_dir: Path) -> Path:
    """A catalog written by clipsearch with schema 1 (6 indexed images, 1 failed), restored from its SQL dump."""
    index_dir.mkdir(parents=True, exist_ok=True)
    path = index_dir / "catalog.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(V1_DUMP.read_text())
    connection.close()
    return path


def raw(path: Path, sql: str, *args) -> list[tuple]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, args).fetchall()
    finally:
        connection.close()


def table_shapes(path: Path) -> dict[str, tuple]:
    """Columns, indexes and AUTOINCREMENT of every table: what 'the same schema' means, whatever the SQL text."""
    shapes = {}
    for (table,) in raw(path, "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'sqlite_sequence'"):
        columns = tuple(raw(path, f"PRAGMA table_info({table})"))
        indexes = tuple(sorted((name, unique) for _, name, unique, *_ in raw(path, f"PRAGMA index_list({table})")))
        sql = raw(path, "SELECT sql FROM sqlite_master WHERE name = ?", table)[0][0]
        shapes[table] = (columns, indexes, "AUTOINCREMENT" in sql.upper())
    return shapes


def test_v1_catalog_is_migrated_keeping_every_row(tmp_path):
    path = load_v1(tmp_path / "old")
    before = raw(path, "SELECT id, path, size, mtime_ns, status, error, embedding FROM images ORDER BY id")
    catalog = Catalog(path)
    catalog.close()
    assert raw(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert raw(path, "SELECT id, path, size, mtime_ns, status, error, embedding FROM images ORDER BY id") == before
    assert raw(path, "SELECT seq FROM sqlite_sequence WHERE name = 'images'") == [(7,)]

    fresh = tmp_path / "fresh" / "catalog.sqlite"
    Catalog(fresh, create=True).close()
    assert table_shapes(path) == table_shapes(fresh)

    report = check_index(tmp_path / "old")
    assert report.healthy and (report.images, report.failed) == (6, 1)
    with SearchEngine(tmp_path / "old", device="cpu") as engine:  # vectors rebuilt from the migrated rows
        stored = engine.vectors_for_paths(["/tmp/rb/v1/photos/img_7_003.jpg"])
        results = engine.search_vectors(stored, k=3)[0]
    assert results[0].path == "/tmp/rb/v1/photos/img_7_003.jpg" and results[0].score > 0.999


def test_migration_killed_midway_leaves_the_old_catalog_intact(tmp_path):
    path = load_v1(tmp_path / "old")
    assert run_in_child(lambda: Catalog(path), fault="migrate:1") == KILLED
    assert raw(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("1",)]
    assert raw(path, "SELECT count(*) FROM images") == [(7,)]
    assert "AUTOINCREMENT" not in raw(path, "SELECT sql FROM sqlite_master WHERE name = 'images'")[0][0]
    Catalog(path).close()  # and the next open migrates it
    assert raw(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_a_literal_escape_character_in_a_v1_path_survives_migration(tmp_path):
    path = load_v1(tmp_path / "old")
    odd = f"/photos/odd{ESC}name.jpg"
    raw_connection = sqlite3.connect(path)
    raw_connection.execute("UPDATE images SET path = ? WHERE id = 2", (odd,))
    raw_connection.commit()
    raw_connection.close()
    catalog = Catalog(path)
    try:
        assert catalog.rows_by_id([2])[2].path == odd
    finally:
        catalog.close()


@pytest.mark.parametrize(
    ("version", "message"),
    [(str(SCHEMA_VERSION + 1), "newer clipsearch"), ("0", "cannot upgrade"), ("two", "unreadable schema version")],
)
def test_unknown_schema_versions_are_refused_clearly(tmp_path, version, message):
    path = load_v1(tmp_path / "index")
    connection = sqlite3.connect(path)
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    connection.commit()
    connection.close()
    with pytest.raises(IndexCorruptError, match=message):
        Catalog(path)
    assert raw(path, "SELECT count(*) FROM images") == [(7,)], "a refused catalog must not be touched"


def test_catalog_whose_creation_was_interrupted_reads_as_no_index_yet(settings, photo_folder, tmp_path):
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    raw(index_dir / "catalog.sqlite", "CREATE TABLE roots (id INTEGER PRIMARY KEY, path VARCHAR, added_at FLOAT)")
    with pytest.raises(EmptyIndexError, match="no index at"):
        SearchEngine(index_dir, device="cpu")
    summary = index_paths(index_dir, [photo_folder], settings, progress=False)
    assert summary.added == 16


def test_a_file_that_is_not_a_catalog_is_a_clear_error(tmp_path):
    (tmp_path / "catalog.sqlite").write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(ClipsearchError, match="not a readable SQLite catalog"):
        SearchEngine(tmp_path, device="cpu")


def test_image_ids_are_never_reused(settings, tmp_path):
    """A search engine holding old FAISS ids must never see them name another image."""
    folder = tmp_path / "photos"
    files = make_images(folder, 3, seed=90)
    index_paths(tmp_path / "index", [folder], settings, progress=False)
    catalog = Catalog(tmp_path / "index" / "catalog.sqlite")
    last = catalog.row_by_path(str(files[-1])).id
    files[-1].unlink()
    index_paths(tmp_path / "index", [folder], settings, progress=False)
    make_images(folder, 1, seed=91)
    index_paths(tmp_path / "index", [folder], settings, progress=False)
    newest = max(catalog.rows_by_id(range(1, 100)))
    catalog.close()
    assert newest > last


# --- how paths are stored -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/plain/ascii.jpg",
        "/caf\udce9/x.jpg",
        "/\udcff\udc80.png",
        f"/lit{ESC}eral.jpg",
        f"/{ESC}\udce9{ESC}{ESC}",
        "/é/ü.jpg",
    ],
)
def test_stored_paths_round_trip(path):
    stored = to_stored(path)
    stored.encode("utf-8")  # SQLite can hold it
    assert from_stored(stored) == path


def test_stored_form_keeps_folder_prefixes():
    folder, file = "/caf\udce9", "/caf\udce9/\udcff.jpg"
    assert to_stored(file).startswith(to_stored(folder) + "/")
    assert to_stored("/plain/a.jpg") == "/plain/a.jpg"


def test_folders_differing_only_in_case_stay_apart(settings, tmp_path):
    """SQLite's LIKE folds case: refreshing /x/photos once removed the images of /x/Photos."""
    upper, lower = tmp_path / "Photos", tmp_path / "photos"
    make_images(upper, 3, seed=92)
    make_images(lower, 2, seed=93)
    index_paths(tmp_path / "index", [upper, lower], settings, progress=False)
    summary = index_paths(tmp_path / "index", [lower], settings, progress=False)
    assert (summary.removed, summary.unchanged) == (0, 2)
    catalog = Catalog(tmp_path / "index" / "catalog.sqlite")
    try:
        assert catalog.count(STATUS_OK) == 5
        assert len(catalog.ids_under(str(upper))) == 3
    finally:
        catalog.close()


def test_the_plain_reads_name_every_column_the_orm_writes():
    """CatalogReader's rows (plain sqlite3) and the ORM's ImageRow are one schema: the same columns, in order,
    but the deferred pixel_print."""
    from retrieval.store.catalog import ImageRow
    from retrieval.store.catalog_reads import IMAGE_COLUMNS

    written = [column.name for column in ImageRow.__table__.columns if column.name != "pixel_print"]
    assert list(IMAGE_COLUMNS) == written


def test_a_row_read_plainly_equals_the_row_the_orm_reads(settings, photo_folder, tmp_path):
    from sqlalchemy import select

    from retrieval.store.catalog import ImageRow
    from retrieval.store.catalog_reads import open_reader

    index_paths(tmp_path / "index", [photo_folder], settings, progress=False)
    catalog = Catalog(tmp_path / "index" / "catalog.sqlite")
    reader = open_reader(tmp_path / "index" / "catalog.sqlite")
    try:
        with catalog.session() as session:
            orm = {row.id: row for row in session.scalars(select(ImageRow))}
        plain = reader.rows_by_id(list(orm))
        assert set(plain) == set(orm) and len(orm) > 1
        for image_id, row in plain.items():
            for column in ("path", "size", "mtime_ns", "status", "width", "height", "taken_at", "has_gps"):
                assert getattr(row, column) == getattr(orm[image_id], column), column
            assert np.array_equal(row.vector(), orm[image_id].vector())
        assert reader.row_by_path(orm[min(orm)].path).id == min(orm)
    finally:
        reader.close()
        catalog.close()
