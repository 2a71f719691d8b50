"""`clipsearch check [--repair]`: each kind of damage is reported, repaired, and the repaired index is whole; a
catalog whose header or keyword table is damaged is salvaged with nothing lost."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipsearch.cli import app
from indexer.check import DAMAGED_EMBEDDING, check_index
from indexer.pipeline import index_paths
from retrieval.errors import IndexBusyError
from retrieval.search.engine import SearchEngine
from retrieval.store.catalog import STATUS_FAILED, Catalog
from retrieval.store.layout import IndexLayout
from retrieval.store.vectors import VectorIndex
from retrieval.store.write_lock import write_lock
from tests.crash_harness import assert_index_whole

runner = CliRunner()


@pytest.fixture
def index_dir(settings, photo_folder, tmp_path) -> Path:
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photo_folder], settings, progress=False)
    return index_dir


def sql(index_dir: Path, statement: str, *args) -> list[tuple]:
    connection = sqlite3.connect(index_dir / "catalog.sqlite")
    try:
        rows = connection.execute(statement, args).fetchall()
        connection.commit()
        return rows
    finally:
        connection.close()


def repaired(index_dir: Path, expect_problem: str | None) -> list[str]:
    """Check finds the problem (or only notices), repair fixes it, and a second check is clean."""
    before = check_index(index_dir)
    if expect_problem:
        assert any(expect_problem in line for line in before.problems), before.problems
        assert not before.healthy
    else:
        assert before.healthy and before.notices
    report = check_index(index_dir, repair=True)
    assert report.healthy and report.repairs, report
    after = check_index(index_dir)
    assert (after.problems, after.notices) == ([], [])
    return report.repairs


def test_a_healthy_index_checks_clean(index_dir):
    report = check_index(index_dir)
    assert report.healthy and (report.problems, report.notices, report.repairs) == ([], [], [])
    assert (report.images, report.vectors_in_file) == (16, 16)
    result = runner.invoke(app, ["check", "--index", str(index_dir)])
    assert result.exit_code == 0 and result.output.strip().endswith("ok")


def test_stale_vectors_file_is_a_notice_and_repair_saves_a_current_one(index_dir):
    sql(index_dir, "UPDATE meta SET value = value - 1 WHERE key = 'faiss_generation'")
    repairs = repaired(index_dir, None)
    assert any("rebuilt the FAISS file" in line for line in repairs)


def test_missing_vectors_file_is_a_notice(index_dir):
    (index_dir / "vectors.faiss").unlink()
    repaired(index_dir, None)
    assert (index_dir / "vectors.faiss").is_file()


def test_unreadable_vectors_file_does_not_stop_searches_and_is_rebuilt(index_dir):
    data = (index_dir / "vectors.faiss").read_bytes()
    (index_dir / "vectors.faiss").write_bytes(data[: len(data) // 3])
    with SearchEngine(index_dir, device="cpu") as engine:
        assert len(engine.vectors) == 16  # rebuilt in memory from the catalog
    repaired(index_dir, "unreadable")


@pytest.mark.parametrize("damage", ["swap_id", "duplicate_id", "wrong_vector"])
def test_vectors_file_that_disagrees_with_the_catalog_is_rebuilt(index_dir, damage):
    """A file claiming to be current but holding other ids or vectors (same count, so a search would trust it)."""
    path = index_dir / "vectors.faiss"
    index = VectorIndex.load(path)
    ids, vectors = index.stored_vectors()
    if damage == "swap_id":
        ids = ids.copy()
        ids[0] = ids.max() + 100
    elif damage == "duplicate_id":
        ids = ids.copy()
        ids[1] = ids[0]
    else:
        vectors = vectors.copy()
        vectors[3] = -vectors[3]
    forged = VectorIndex.create(index.dim)
    forged.add(ids, vectors)
    forged.save(path)
    repaired(index_dir, "disagrees with the catalog")
    assert_index_whole(index_dir)


@pytest.mark.parametrize("blob", [b"\x00\x01\x02", np.full(32, np.nan, np.float16).tobytes(), bytes(64)])
def test_damaged_embedding_is_marked_and_re_encoded_by_the_next_run(index_dir, settings, photo_folder, blob):
    victim = sql(index_dir, "SELECT id, path FROM images ORDER BY id LIMIT 1")[0]
    sql(index_dir, "UPDATE images SET embedding = ? WHERE id = ?", blob, victim[0])
    repaired(index_dir, "damaged embedding")
    catalog = Catalog(IndexLayout(index_dir).catalog)
    row = catalog.rows_by_id([victim[0]])[victim[0]]
    catalog.close()
    assert (row.status, row.error) == (STATUS_FAILED, DAMAGED_EMBEDDING)

    summary = index_paths(index_dir, [photo_folder], settings, progress=False)
    assert (summary.updated, summary.unchanged) == (1, 15)
    assert len(assert_index_whole(index_dir)) == 16


def test_failed_row_that_still_holds_an_embedding_is_cleared(index_dir):
    blob = sql(index_dir, "SELECT embedding FROM images LIMIT 1")[0][0]
    sql(index_dir, "UPDATE images SET status = 'failed', error = 'x' WHERE id = (SELECT max(id) FROM images)")
    sql(index_dir, "UPDATE images SET embedding = ? WHERE id = (SELECT max(id) FROM images)", blob)
    repaired(index_dir, "still carry an embedding")


def test_temporary_files_of_a_killed_save_are_removed(index_dir):
    stray = index_dir / ".vectors.faiss.12345.tmp"
    stray.write_bytes(b"half a file")
    repaired(index_dir, None)
    assert not stray.exists()


def test_repair_never_races_a_writer(index_dir):
    (index_dir / "vectors.faiss").unlink()
    with write_lock(IndexLayout(index_dir)), pytest.raises(IndexBusyError):
        check_index(index_dir, repair=True, wait=False)


def test_cli_reports_problems_with_exit_code_1_and_json(index_dir):
    (index_dir / "vectors.faiss").write_bytes(b"garbage")
    result = runner.invoke(app, ["check", "--index", str(index_dir)])
    assert result.exit_code == 1
    assert "problem:  the FAISS file is unreadable" in result.output and "try --repair" in result.output
    fixed = runner.invoke(app, ["check", "--index", str(index_dir), "--repair", "--json"])
    assert fixed.exit_code == 0
    report = json.loads(fixed.output)
    assert report["healthy"] and report["remaining"] == [] and report["repairs"]


# --- issue 23, item 9: a catalog SQLite refuses in part or as a whole is salvaged; a full disk is one line ----


def rows(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / "catalog.sqlite") as connection:
        return connection.execute(
            "SELECT id, path, size, mtime_ns, status, embedding FROM images ORDER BY id"
        ).fetchall()


def damage_page(index_dir: Path, table: str) -> None:
    """Garble the first page of ``table`` in the file, as a bad sector would."""
    path = index_dir / "catalog.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    with open(path, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xa5" * page_size)


def keyword_search(index_dir: Path):
    from retrieval.search.query import Query, Term

    with SearchEngine(index_dir, device="cpu") as engine:
        return engine.search(Query((Term(text="img_1_003"),), keywords=True), k=3)


def test_a_damaged_keyword_table_is_found_and_rebuilt_from_the_catalog(index_dir):
    with sqlite3.connect(index_dir / "catalog.sqlite") as connection:  # text read in a photo (schema 6)
        connection.execute("INSERT INTO text_fts (rowid, text) VALUES (3, 'invoice')")
    before = rows(index_dir)
    damage_page(index_dir, "images_fts_data")
    found = runner.invoke(app, ["check", "--index", str(index_dir)])
    assert found.exit_code == 1 and "keyword table" in found.output and "Traceback" not in found.output
    repaired = runner.invoke(app, ["check", "--repair", "--index", str(index_dir)])
    assert repaired.exit_code == 0, repaired.output
    assert "salvaged the catalog" in repaired.output and "ok after repair" in repaired.output
    assert rows(index_dir) == before  # every row and embedding, same ids
    assert check_index(index_dir).healthy
    assert keyword_search(index_dir)[0].path.endswith("img_1_003.jpg")
    with sqlite3.connect(index_dir / "catalog.sqlite") as connection:  # the text index is copied, not lost
        assert connection.execute("SELECT rowid FROM text_fts WHERE text_fts MATCH 'voic'").fetchall() == [(3,)]
    assert list(index_dir.glob(f"{'catalog.sqlite'}.damaged-*"))  # the damaged file is kept, not thrown away


def test_a_catalog_with_a_zeroed_header_is_salvaged_with_nothing_lost(index_dir):
    before = rows(index_dir)
    with sqlite3.connect(index_dir / "catalog.sqlite") as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(index_dir / "catalog.sqlite", "r+b") as file:
        file.write(bytes(100))
    found = runner.invoke(app, ["check", "--index", str(index_dir)])
    assert found.exit_code != 0 and "check --repair" in found.output and "Traceback" not in found.output
    repaired = runner.invoke(app, ["check", "--repair", "--index", str(index_dir)])
    assert repaired.exit_code == 0 and "rebuilt header" in repaired.output, repaired.output
    assert rows(index_dir) == before
    assert check_index(index_dir).healthy


def test_a_full_disk_during_check_repair_is_one_line(index_dir, monkeypatch):
    (index_dir / "vectors.faiss").unlink()  # something to repair
    monkeypatch.setenv("CLIPSEARCH_FAULT", "repair:1:enospc")
    result = runner.invoke(app, ["check", "--repair", "--index", str(index_dir)])
    assert result.exit_code != 0 and "is full" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_check_holds_a_batch_of_vectors_not_the_whole_catalog(tmp_path):
    """`check` kept every embedding (~11 KB a row with its objects: 2.2 GB at 200k rows, 10M would not fit in
    24 GB). It streams rows and compares the FAISS file a batch of ids at a time now."""
    import tracemalloc

    from retrieval.model.spec import ModelIdentity
    from retrieval.store.catalog import STATUS_OK, ImageRow, encode_embedding
    from retrieval.store.sync import build_from_catalog, save_vectors
    from retrieval.testing import EmbeddingSpace

    rows = 20_000
    layout = IndexLayout(tmp_path / "index")
    layout.root.mkdir()
    catalog = Catalog(layout.catalog, create=True)
    catalog.set_model_identity(ModelIdentity("synthetic", None, "0" * 64, 512, 224))
    vectors = EmbeddingSpace.make(512).all_images(rows)
    with catalog.session() as session, session.begin():
        session.add_all(
            ImageRow(path=f"/p/{i:06d}.jpg", size=i, mtime_ns=i, status=STATUS_OK, embedding=encode_embedding(v))
            for i, v in enumerate(vectors)
        )
    save_vectors(catalog, layout, build_from_catalog(catalog, 512), catalog.vectors_generation())
    catalog.close()
    del vectors
    tracemalloc.start()
    try:
        report = check_index(layout.root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.healthy and report.images == rows, report.problems
    assert peak < 60 * 2**20, f"check peaked at {peak / 2**20:.0f} MiB for {rows} rows"  # all at once: ~220 MiB
