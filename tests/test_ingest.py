"""The writer's fast path (indexer/ingest.py) and schema 4: what a user of the catalog would notice."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np

from indexer.pipeline import index_paths, ingest_encoded
from indexer.plan import WorkItem
from indexer.scan import FileFacts
from retrieval.image_meta import ImageMeta
from retrieval.images import DecodedItem
from retrieval.model.spec import ModelIdentity
from retrieval.store.catalog import SCHEMA_VERSION, STATUS_OK, Catalog, ImageRow, MetaKey
from retrieval.store.layout import IndexLayout
from retrieval.store.vectors import VectorIndex
from tests.conftest import make_images
from tests.crash_harness import KILLED, assert_index_whole, run_in_child


def raw(path: Path, sql: str, *args) -> list[tuple]:
    connection = sqlite3.connect(str(path))
    try:
        return connection.execute(sql, args).fetchall()
    finally:
        connection.close()


def test_new_files_get_ordered_ids_keywords_and_exact_vectors(tmp_path, settings):
    folder = tmp_path / "photos"
    make_images(folder, 9, seed=5)
    (folder / "zz-broken.jpg").write_bytes(b"not an image")
    index_dir = tmp_path / "index"
    summary = index_paths(index_dir, [folder], settings, progress=False)
    assert (summary.added, summary.failed) == (9, 1)
    catalog_file = IndexLayout(index_dir).catalog
    rows = raw(catalog_file, "SELECT id, path, status FROM images ORDER BY id")
    assert [r[0] for r in rows] == list(range(1, 11))  # in work order, as SQLite's AUTOINCREMENT gives them
    assert raw(catalog_file, "SELECT count(*) FROM images_fts") == [(10,)]  # each row's keywords, once
    hits = raw(catalog_file, "SELECT rowid FROM images_fts WHERE images_fts MATCH ?", '"broken"*')
    assert hits == [(rows[-1][0],)] and rows[-1][2] == "failed"
    catalog = Catalog(catalog_file)
    try:
        row = catalog.row_by_path(rows[0][1])
        assert row.status == STATUS_OK and row.width == 96 and row.file_type == "jpg" and row.taken_at
    finally:
        catalog.close()


def test_ids_continue_past_deleted_ones_and_rows_carry_their_header_facts(tmp_path):
    layout = IndexLayout(tmp_path / "index")
    catalog = Catalog(layout.catalog, create=True)
    catalog.set_model_identity(ModelIdentity("test", None, "test", 4, 32, {}))
    meta = ImageMeta("2021-05-01 10:00:00", "exif", "Canon", "EOS", 1, 40, 30, False, "jpg")

    def rows(start: int, count: int) -> list:
        return [
            (WorkItem(FileFacts(f"/x/{i}.jpg", 10, 20), None), DecodedItem(i, None, "h", 40, 30, None, meta),
             np.eye(4, dtype=np.float32)[i % 4])
            for i in range(start, start + count)
        ]  # fmt: skip

    vectors = VectorIndex.create(4, "flat")
    ingest_encoded(catalog, layout, [rows(0, 3)], vectors)
    with catalog.session() as session, session.begin():
        session.delete(session.get(ImageRow, catalog.row_by_path("/x/2.jpg").id))  # the highest id goes
        vectors.remove([3])
    ingest_encoded(catalog, layout, [rows(3, 2)], vectors)
    assert sorted(int(i) for i in vectors.ids()) == [1, 2, 4, 5]  # 3 is never given again
    row = catalog.row_by_path("/x/4.jpg")
    assert (row.id, row.camera_make, row.taken_at, row.date_source) == (5, "Canon", "2021-05-01 10:00:00", "exif")
    catalog.close()


def test_a_schema_3_catalog_loses_its_per_row_trigger_and_keeps_its_keywords(tmp_path, settings, photo_folder):
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photo_folder], settings, progress=False)
    catalog_file = IndexLayout(index_dir).catalog
    connection = sqlite3.connect(str(catalog_file))  # as schema 3 left it: the insert trigger, version 3
    connection.execute(
        "CREATE TRIGGER images_fts_insert AFTER INSERT ON images BEGIN "
        "INSERT INTO images_fts (rowid, name, folder) VALUES (new.id, 'x', 'y'); END"
    )
    connection.execute("ALTER TABLE images DROP COLUMN pixel_print")  # schema 5's
    for table in ("text_fts", "text_lines", "text_passes"):  # schema 6's, with its triggers
        connection.execute(f"DROP TABLE {table}")
    connection.execute("DROP TRIGGER text_forget_deleted")
    connection.execute("DROP TRIGGER text_forget_changed")
    connection.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    connection.commit()
    connection.close()
    Catalog(catalog_file).close()
    assert raw(catalog_file, "SELECT name FROM sqlite_master WHERE name = 'images_fts_insert'") == []
    assert raw(catalog_file, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    make_images(photo_folder, 2, seed=9)
    index_paths(index_dir, [photo_folder], settings, progress=False)
    assert raw(catalog_file, "SELECT count(*) FROM images_fts") == raw(catalog_file, "SELECT count(*) FROM images")


def test_a_run_that_ends_as_another_type_builds_it_once_at_the_end_even_after_a_kill(tmp_path, settings, photo_folder):
    index_dir = tmp_path / "index"
    wanted = replace(settings, index_type="ivf")  # a new index starts exact: this run ends as another type
    killed = run_in_child(lambda: index_paths(index_dir, [photo_folder], wanted, progress=False), after_commits=1)
    assert killed == KILLED
    summary = index_paths(index_dir, [photo_folder], wanted, progress=False)
    assert summary.vectors_note and "-> ivf" in summary.vectors_note
    assert_index_whole(index_dir)  # every ok row in FAISS once, search answers
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        assert catalog.get_meta(MetaKey.INDEX_TYPE) == "ivf" and catalog.count(STATUS_OK) == 16
    finally:
        catalog.close()


def test_faiss_adds_beside_the_sqlite_writes_end_in_step_with_the_catalog(tmp_path):
    """FAISS work runs on a helper thread while the next chunk is written: after the run (and in the saved file)
    the index holds every ok row once, with its latest vector, also for files changed in a later chunk."""
    layout = IndexLayout(tmp_path / "index")
    catalog = Catalog(layout.catalog, create=True)
    catalog.set_model_identity(ModelIdentity("test", None, "test", 8, 32, {}))
    basis = np.eye(8, dtype=np.float32)

    def entry(i: int, row_id: int | None, axis: int) -> tuple:
        facts = FileFacts(f"/x/{i}.jpg", 10, 20 + axis)
        return WorkItem(facts, row_id), DecodedItem(i, None, f"h{axis}", 40, 30, None, None), basis[axis]

    vectors = VectorIndex.create(8, "flat")
    first = [[entry(i, None, i % 4) for i in range(start, start + 5)] for start in range(0, 40, 5)]
    changed = [entry(i, i + 1, 4 + i % 4) for i in range(0, 40, 3)]  # a later chunk rewrites every third file
    ingest_encoded(catalog, layout, [*first, changed], vectors)
    assert sorted(int(i) for i in vectors.ids()) == list(range(1, 41))
    scores, ids = vectors.search(basis[4:5], 40)
    assert sorted(int(i) for i, s in zip(ids[0], scores[0]) if s > 0.99) == [i + 1 for i in range(0, 40, 12)]
    assert len(VectorIndex.load(layout.vectors)) == 40
    catalog.close()
