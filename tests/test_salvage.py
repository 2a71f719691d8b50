"""`clipsearch check [--repair]` on a catalog whose rows still read but whose file SQLite refuses in part (a
damaged keyword-table page) or as a whole (a zeroed header): found in one line, salvaged with nothing lost
(issue 23, item 9); and a check stopped by a full disk says so in one line."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipsearch.cli import app
from indexer.check import check_index
from indexer.pipeline import index_paths
from retrieval.search.engine import SearchEngine
from retrieval.store.layout import CATALOG_FILE

runner = CliRunner()


@pytest.fixture
def index_dir(settings, photo_folder, tmp_path) -> Path:
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photo_folder], settings, progress=False)
    return index_dir


def rows(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / CATALOG_FILE) as connection:
        return connection.execute(
            "SELECT id, path, size, mtime_ns, status, embedding FROM images ORDER BY id"
        ).fetchall()


def damage_page(index_dir: Path, table: str) -> None:
    """Garble the first page of ``table`` in the file, as a bad sector would."""
    path = index_dir / CATALOG_FILE
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    with open(path, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xa5" * page_size)


def keyword_search(index_dir: Path):
    with SearchEngine(index_dir, device="cpu") as engine:
        from retrieval.search.query import Query, Term

        return engine.search(Query((Term(text="img_1_003"),), keywords=True), k=3)


def test_a_damaged_keyword_table_is_found_and_rebuilt_from_the_catalog(index_dir):
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
    assert list(index_dir.glob(f"{CATALOG_FILE}.damaged-*"))  # the damaged file is kept, not thrown away


def test_a_catalog_with_a_zeroed_header_is_salvaged_with_nothing_lost(index_dir):
    before = rows(index_dir)
    with sqlite3.connect(index_dir / CATALOG_FILE) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(index_dir / CATALOG_FILE, "r+b") as file:
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
