"""Schema 3: header facts (date taken, camera, orientation, size, GPS, type) stored at index time, and filled by the
migration of a real schema-2 index without re-encoding; the keyword table follows every write to ``images``."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.pipeline import index_paths
from retrieval.image_meta import mtime_text, read_image_meta
from retrieval.store.catalog import SCHEMA_VERSION, Catalog
from retrieval.store.keywords import looks_like_file_name, match_expression
from tests.conftest import write_image

FIXTURES = Path(__file__).parent / "fixtures" / "robust"
V2_ROOT = "/tmp/rb/v2/photos"


# The file names the keyword table finds: it keeps no copy of them (contentless), so they come from the rows it names
KEYWORD_HITS = (
    "SELECT substr(path, length(rtrim(path, replace(path, '/', ''))) + 1) AS name FROM images "
    "WHERE id IN (SELECT rowid FROM images_fts WHERE images_fts MATCH ?)"
)


def raw(path: Path, sql: str, *args) -> list[tuple]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, args).fetchall()
    finally:
        connection.close()


def load_v2(tmp_path: Path) -> tuple[Path, Path]:
    """The schema-2 index written by clipsearch 7a08bfd (tests/fixtures/robust/make_catalog_v2.py), its photos
    copied to ``tmp_path`` with the mtimes the catalog recorded."""
    photos = tmp_path / "photos"
    shutil.copytree(FIXTURES / "v2_photos", photos)
    dump = (FIXTURES / "catalog_v2.sql").read_text().replace(V2_ROOT, str(photos))
    catalog = tmp_path / "index" / "catalog.sqlite"
    catalog.parent.mkdir()
    connection = sqlite3.connect(catalog)
    connection.executescript(dump)
    for path, mtime_ns in connection.execute("SELECT path, mtime_ns FROM images"):
        os.utime(path, ns=(mtime_ns, mtime_ns))
    connection.close()
    return catalog, photos


def facts(catalog: Path) -> dict[str, tuple]:
    rows = raw(
        catalog,
        "SELECT path, taken_at, date_source, camera_make, camera_model, orientation, width, height, has_gps, "
        "file_type FROM images",
    )
    return {Path(row[0]).name: row[1:] for row in rows}


def exif_photo(path: Path, seed: int, date: str | None, make: str, model: str, orientation: int, gps: bool) -> Path:
    write_image(path, seed, size=(90, 60))
    tags = Image.Exif()
    tags[0x010F], tags[0x0110], tags[0x0112] = make, model, orientation
    if date:
        tags.get_ifd(0x8769)[0x9003] = date
    if gps:
        tags.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 24.0)})
    Image.open(path).save(path, exif=tags)
    return path


def test_v2_index_is_migrated_with_header_facts_and_keywords_without_reencoding(tmp_path):
    catalog_path, photos = load_v2(tmp_path)
    (photos / "gone.jpg").unlink()
    before = raw(catalog_path, "SELECT id, path, size, mtime_ns, status, embedding FROM images ORDER BY id")
    plain_mtime = raw(catalog_path, "SELECT mtime_ns FROM images WHERE path LIKE '%plain.png'")[0][0]

    Catalog(catalog_path).close()

    assert raw(catalog_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert raw(catalog_path, "SELECT id, path, size, mtime_ns, status, embedding FROM images ORDER BY id") == before
    found = facts(catalog_path)
    assert found["canon.jpg"] == ("2019-07-14 10:30:00", "exif", "Canon", "Canon EOS 80D", 6, 80, 120, 1, "jpg")
    assert found["phone.jpg"][:4] == ("2021-03-02 08:00:00", "exif", "Apple", "iPhone 12")
    assert found["phone.jpg"][7:] == (0, "jpg")
    assert found["plain.png"] == (mtime_text(plain_mtime), "mtime", None, None, None, 96, 72, 0, "png")
    assert found["gone.jpg"] == (None, None, None, None, None, 96, 72, None, None)  # missing file: NULLs
    assert found["broken.jpg"][:2] == (None, None)  # failed row: nothing to read

    def keyword_hits(query: str) -> list[str]:
        sql = KEYWORD_HITS + " ORDER BY id"
        return [row[0] for row in raw(catalog_path, sql, match_expression(query))]

    assert keyword_hits("IMG_0412") == ["IMG_0412.jpg"]
    assert keyword_hits("paris-2019") == ["beach.jpg"]

    fresh = tmp_path / "fresh" / "catalog.sqlite"
    Catalog(fresh, create=True).close()
    schema = "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
    assert raw(catalog_path, schema) == raw(fresh, schema)
    for (table,) in raw(fresh, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"):
        assert raw(catalog_path, f"PRAGMA table_info({table})") == raw(fresh, f"PRAGMA table_info({table})")


def test_migrated_v2_index_keeps_its_keywords_in_step(tmp_path):
    catalog_path, photos = load_v2(tmp_path)
    Catalog(catalog_path).close()
    connection = sqlite3.connect(catalog_path)
    connection.execute(
        "UPDATE images SET path = ? WHERE path = ?", (str(photos / "IMG_0999.jpg"), str(photos / "IMG_0412.jpg"))
    )
    connection.execute("DELETE FROM images WHERE path = ?", (str(photos / "phone.jpg"),))
    connection.commit()
    hits = KEYWORD_HITS
    assert connection.execute(hits, (match_expression("IMG_0412"),)).fetchall() == []
    assert connection.execute(hits, (match_expression("IMG_0999"),)).fetchall() == [("IMG_0999.jpg",)]
    assert connection.execute(hits, (match_expression("phone"),)).fetchall() == []
    assert connection.execute("SELECT count(*) FROM images_fts").fetchone() == (6,)
    connection.close()


def test_indexing_records_exif_facts_or_the_mtime(tmp_path, settings):
    photos = tmp_path / "photos"
    exif_photo(photos / "trip" / "a.jpg", 1, "2018:05:06 07:08:09", "NIKON CORPORATION", "NIKON D750", 8, True)
    exif_photo(photos / "b.jpg", 2, None, "Google", "Pixel 7", 1, False)
    write_image(photos / "c.png", 3)
    os.utime(photos / "c.png", ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    index_paths(tmp_path / "index", [photos], settings, progress=False)
    found = facts(tmp_path / "index" / "catalog.sqlite")
    assert found["a.jpg"] == ("2018-05-06 07:08:09", "exif", "NIKON CORPORATION", "NIKON D750", 8, 60, 90, 1, "jpg")
    b_mtime = mtime_text(os.stat(photos / "b.jpg").st_mtime_ns)
    assert found["b.jpg"] == (b_mtime, "mtime", "Google", "Pixel 7", 1, 90, 60, 0, "jpg")
    assert found["c.png"] == (mtime_text(1_500_000_000 * 10**9), "mtime", None, None, None, 96, 72, 0, "png")


def test_keyword_table_follows_moves_and_removals(tmp_path, settings):
    photos = tmp_path / "photos"
    for i, name in enumerate(["IMG_0412.jpg", "IMG_0413.jpg", "holiday.jpg"]):
        write_image(photos / name, i)
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photos], settings, progress=False)
    catalog = index_dir / "catalog.sqlite"

    def names(query: str) -> list[str]:
        sql = KEYWORD_HITS + " ORDER BY name"
        return [row[0] for row in raw(catalog, sql, match_expression(query))]

    assert names("IMG_0412") == ["IMG_0412.jpg"] and names("img") == ["IMG_0412.jpg", "IMG_0413.jpg"]
    (photos / "IMG_0412.jpg").rename(photos / "paris-2019.jpg")
    (photos / "IMG_0413.jpg").unlink()
    summary = index_paths(index_dir, [photos], settings, progress=False)
    assert (summary.moved, summary.removed) == (1, 1)
    assert names("IMG") == [] and names("paris-2019") == ["paris-2019.jpg"]
    assert raw(catalog, "SELECT count(*) FROM images_fts") == raw(catalog, "SELECT count(*) FROM images")

    # A row the keyword table never held (written by another tool) leaves without skewing the ranking's totals:
    # a contentless 'delete' of tokens it never indexed would make bm25 rank nothing (NULL scores).
    connection = sqlite3.connect(catalog)
    connection.execute(
        "INSERT INTO images (path, size, mtime_ns, status, indexed_at) VALUES ('/x/IMG_7.jpg', 1, 1, 'failed', 0)"
    )
    connection.execute("DELETE FROM images WHERE path = '/x/IMG_7.jpg'")
    connection.commit()
    connection.close()
    scores = raw(catalog, "SELECT bm25(images_fts, 4.0, 1.0) FROM images_fts WHERE images_fts MATCH ?", '"jpg"')
    assert len(scores) == 2 and all(score is not None and score < 0 for (score,) in scores)


def test_header_reading_survives_odd_files(tmp_path):
    (tmp_path / "text.jpg").write_bytes(b"hello")
    odd = read_image_meta(tmp_path / "text.jpg")
    assert odd.date_source == "mtime" and odd.file_type == "jpg" and odd.camera_make is None
    assert read_image_meta(tmp_path / "missing.jpg").taken_at is None
    webp = tmp_path / "x.webp"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(webp)
    assert read_image_meta(webp).file_type == "webp"


def test_file_name_rule():
    for query in ["IMG_0412", "paris-2019", "DSC01234.JPG", "2019"]:
        assert looks_like_file_name(query), query
    for query in ["sunset", "red car", "a dog on the beach", "cat 2019"]:
        assert not looks_like_file_name(query), query
