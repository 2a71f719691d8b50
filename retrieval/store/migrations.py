"""Bring a catalog written by an older clipsearch up to the current schema, or refuse it with a clear message.

Each step runs in one SQLite transaction taken with ``BEGIN IMMEDIATE`` (DDL included, which SQLite makes atomic),
together with the new ``schema_version``: a crash or a full disk mid-way leaves the old catalog exactly as it was,
and two processes opening the same old index migrate it once. What a step must read from the disk (v2 -> v3: the
image files' headers) is read before that transaction, so the write lock is held only for the SQL. Steps spell
out their own SQL rather than use the current ORM models, so that a later schema cannot change what an old step
does.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrieval.errors import ClipsearchError, IndexCorruptError
from retrieval.faults import fault_point
from retrieval.image_meta import ImageMeta, read_image_meta
from retrieval.store.paths import ESC, from_stored

IMAGES_V2 = """
CREATE TABLE images (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    path VARCHAR NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_hash VARCHAR,
    width INTEGER,
    height INTEGER,
    status VARCHAR NOT NULL,
    error VARCHAR,
    embedding BLOB,
    indexed_at FLOAT NOT NULL,
    UNIQUE (path)
)"""
IMAGE_COLUMNS = "id, path, size, mtime_ns, content_hash, width, height, status, error, embedding, indexed_at"


def _v1_to_v2(connection: sqlite3.Connection) -> None:
    """Ids become AUTOINCREMENT (kept as they are, so the FAISS file stays valid); a literal ESC in a path is
    escaped, since version 2 reads ESC as the start of an escaped byte."""
    connection.execute("DROP INDEX IF EXISTS ix_images_hash")
    connection.execute("DROP INDEX IF EXISTS ix_images_status")
    connection.execute("ALTER TABLE images RENAME TO images_v1")
    connection.execute(IMAGES_V2)
    connection.execute(f"INSERT INTO images ({IMAGE_COLUMNS}) SELECT {IMAGE_COLUMNS} FROM images_v1")
    connection.execute("DROP TABLE images_v1")
    connection.execute("CREATE INDEX ix_images_hash ON images (content_hash)")
    connection.execute("CREATE INDEX ix_images_status ON images (status)")
    for table in ("images", "roots"):
        connection.execute(f"UPDATE {table} SET path = replace(path, ?, ?) WHERE instr(path, ?)", (ESC, ESC + ESC, ESC))


IMAGES_V3_COLUMNS = (
    ("taken_at", "VARCHAR"),
    ("date_source", "VARCHAR"),
    ("camera_make", "VARCHAR"),
    ("camera_model", "VARCHAR"),
    ("orientation", "INTEGER"),
    ("has_gps", "BOOLEAN"),
    ("file_type", "VARCHAR"),
)
_FOLDER_V3 = "rtrim({p}, replace({p}, '/', ''))"
_NAME_V3 = "substr({p}, length(" + _FOLDER_V3 + ") + 1)"
_FTS_INSERT_V3 = f"INSERT INTO images_fts (rowid, name, folder) VALUES (new.id, {_NAME_V3}, {_FOLDER_V3});".format(
    p="new.path"
)
_FTS_DELETE_V3 = "DELETE FROM images_fts WHERE rowid = old.id;"
FTS_V3 = (
    "CREATE VIRTUAL TABLE images_fts USING fts5(name, folder, tokenize = 'unicode61')",
    f"CREATE TRIGGER images_fts_insert AFTER INSERT ON images BEGIN {_FTS_INSERT_V3} END",
    f"CREATE TRIGGER images_fts_delete AFTER DELETE ON images BEGIN {_FTS_DELETE_V3} END",
    f"CREATE TRIGGER images_fts_update AFTER UPDATE OF path ON images BEGIN {_FTS_DELETE_V3} {_FTS_INSERT_V3} END",
    f"INSERT INTO images_fts (rowid, name, folder) SELECT id, {_NAME_V3}, {_FOLDER_V3} FROM images".format(p="path"),
)

HeaderFacts = list[tuple[int, int, int, ImageMeta]]  # (id, size, mtime_ns, facts) of files unchanged on disk


def _read_headers_v2(connection: sqlite3.Connection) -> HeaderFacts:
    """Header facts of every indexed file still on disk as it was indexed (same size and mtime), read before the
    write transaction so other processes wait only for the short schema change. Missing or changed files are left
    out: their rows keep NULLs (the next `clipsearch index` re-reads a changed file anyway)."""
    facts = []
    version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    escaped = version is not None and version[0] != "1"  # schema 1 stored paths as they were (see _v1_to_v2)
    for image_id, stored, size, mtime_ns in connection.execute(
        "SELECT id, path, size, mtime_ns FROM images WHERE status = 'ok'"
    ):
        path = from_stored(stored) if escaped else stored
        try:
            on_disk = os.stat(path)
        except OSError:
            continue
        if on_disk.st_size == size and on_disk.st_mtime_ns == mtime_ns:
            facts.append((image_id, size, mtime_ns, read_image_meta(path, mtime_ns)))
    return facts


def _v2_to_v3(connection: sqlite3.Connection, facts: HeaderFacts) -> None:
    """Header-fact columns (filled from the files' headers, no re-encoding) and the FTS5 keyword table over paths,
    filled from the rows and kept in step by triggers."""
    for name, kind in IMAGES_V3_COLUMNS:
        connection.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")
    connection.execute(
        "CREATE INDEX ix_images_facts ON images (status, taken_at, file_type, width, height, camera_make, camera_model)"
    )
    for statement in FTS_V3:
        connection.execute(statement)
    connection.executemany(
        "UPDATE images SET taken_at = ?, date_source = ?, camera_make = ?, camera_model = ?, orientation = ?, "
        "has_gps = ?, file_type = ?, width = coalesce(width, ?), height = coalesce(height, ?) "
        "WHERE id = ? AND size = ? AND mtime_ns = ? AND status = 'ok'",
        [
            (
                *(meta.taken_at, meta.date_source, meta.camera_make, meta.camera_model, meta.orientation),
                *(meta.has_gps, meta.file_type, meta.width, meta.height, image_id, size, mtime_ns),
            )
            for image_id, size, mtime_ns, meta in facts
        ],
    )


def _v3_to_v4(connection: sqlite3.Connection) -> None:
    """The writer fills the keyword table per chunk in one statement: the per-row insert trigger goes."""
    connection.execute("DROP TRIGGER IF EXISTS images_fts_insert")


def _v4_to_v5(connection: sqlite3.Connection) -> None:
    """The pixel print near-duplicates are verified with: NULL in existing rows, computed from the file by the
    first ``duplicates`` that needs it (the vectors stay as they are: nothing is re-encoded)."""
    connection.execute("ALTER TABLE images ADD COLUMN pixel_print BLOB")


_FORGET_TEXT_V6 = (
    "DELETE FROM text_lines WHERE image_id = old.id; DELETE FROM text_passes WHERE image_id = old.id; "
    "DELETE FROM text_fts WHERE rowid = old.id;"
)
TEXT_V6 = (
    """CREATE TABLE text_lines (
    id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    source VARCHAR NOT NULL,
    text VARCHAR NOT NULL,
    confidence FLOAT,
    box VARCHAR,
    PRIMARY KEY (id)
)""",
    "CREATE INDEX ix_text_lines_image ON text_lines (image_id, source)",
    """CREATE TABLE text_passes (
    image_id INTEGER NOT NULL,
    source VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    error VARCHAR,
    lines INTEGER NOT NULL,
    done_at FLOAT NOT NULL,
    PRIMARY KEY (image_id, source)
)""",
    "CREATE VIRTUAL TABLE text_fts USING fts5(text, tokenize = 'trigram')",
    f"CREATE TRIGGER text_forget_deleted AFTER DELETE ON images BEGIN {_FORGET_TEXT_V6} END",
    "CREATE TRIGGER text_forget_changed AFTER UPDATE OF content_hash ON images "
    f"WHEN old.content_hash IS NOT new.content_hash BEGIN {_FORGET_TEXT_V6} END",
)


def _v5_to_v6(connection: sqlite3.Connection) -> None:
    """Per-image text (OCR now, captions later): its lines, the passes that read them, and its trigram index.
    Empty: `clipsearch index --ocr` fills them."""
    for statement in TEXT_V6:
        connection.execute(statement)


_FTS_DELETE_V7 = (
    f"INSERT INTO images_fts (images_fts, rowid, name, folder) SELECT 'delete', old.id, {_NAME_V3}, {_FOLDER_V3} "
    "WHERE EXISTS (SELECT 1 FROM images_fts_docsize WHERE id = old.id);"
).format(p="old.path")
KEYWORDS_V7 = (
    "DROP TRIGGER IF EXISTS images_fts_delete",
    "DROP TRIGGER IF EXISTS images_fts_update",
    "DROP TABLE IF EXISTS images_fts",
    "CREATE VIRTUAL TABLE images_fts USING fts5(name, folder, tokenize = 'unicode61', content = '')",
    f"CREATE TRIGGER images_fts_delete AFTER DELETE ON images BEGIN {_FTS_DELETE_V7} END",
    f"CREATE TRIGGER images_fts_update AFTER UPDATE OF path ON images BEGIN {_FTS_DELETE_V7} {_FTS_INSERT_V3} END",
    f"INSERT INTO images_fts (rowid, name, folder) SELECT id, {_NAME_V3}, {_FOLDER_V3} FROM images".format(p="path"),
)


def _v6_to_v7(connection: sqlite3.Connection) -> None:
    """The writer's per-row work shrinks: the keyword table keeps no copy of the names (contentless FTS5: its rows
    leave through the 'delete' command, given the old path's tokens), and the index on status alone goes
    (``ix_images_facts`` leads with status; the id-ordered reads walk the table). The keyword table is rebuilt
    from the paths: about 5 s a million images, once."""
    connection.execute("DROP INDEX IF EXISTS ix_images_status")
    for statement in KEYWORDS_V7:
        connection.execute(statement)


# From version N to N + 1: the step, and what it reads before taking the write lock (None: nothing).
STEPS: dict[int, Callable[..., None]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
    4: _v4_to_v5,
    5: _v5_to_v6,
    6: _v6_to_v7,
}
PREPARE: dict[int, Callable[[sqlite3.Connection], Any]] = {2: _read_headers_v2}


def migrate_catalog(path: Path, version: int, target: int) -> None:
    """Run every step from ``version`` to ``target`` in one transaction, or raise a ``ClipsearchError``."""
    missing = [v for v in range(version, target) if v not in STEPS]
    if missing:
        raise IndexCorruptError(
            f"{path} uses catalog schema {version}, which this clipsearch cannot upgrade: rebuild the index "
            f"with `clipsearch index` into a new --index folder"
        )
    connection = sqlite3.connect(str(path), isolation_level=None, timeout=60)
    try:
        prepared = {step: PREPARE[step](connection) for step in range(version, target) if step in PREPARE}
        connection.execute("BEGIN IMMEDIATE")
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        current = int(row[0]) if row else version
        for step in range(current, target):  # another process may have migrated while this one waited
            if step in prepared:
                STEPS[step](connection, prepared[step])
            else:
                STEPS[step](connection)
        connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(target),))
        fault_point("migrate")
        connection.execute("COMMIT")
    except sqlite3.Error as error:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise ClipsearchError(
            f"cannot upgrade the index catalog {path} from schema {version} to {target} ({error}); it is "
            f"unchanged: run again with write access and free disk space"
        ) from None
    finally:
        connection.close()
