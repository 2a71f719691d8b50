"""Bring a catalog written by an older clipsearch up to the current schema, or refuse it with a clear message.

Each step runs in one SQLite transaction taken with ``BEGIN IMMEDIATE`` (DDL included, which SQLite makes atomic),
together with the new ``schema_version``: a crash or a full disk mid-way leaves the old catalog exactly as it was,
and two processes opening the same old index migrate it once. Steps spell out their own SQL rather than use the
current ORM models, so that a later schema cannot change what an old step does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from retrieval.errors import ClipsearchError, IndexCorruptError
from retrieval.faults import fault_point
from retrieval.store.paths import ESC

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


STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2}  # from version N to N + 1


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
        connection.execute("BEGIN IMMEDIATE")
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        current = int(row[0]) if row else version
        for step in range(current, target):  # another process may have migrated while this one waited
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
