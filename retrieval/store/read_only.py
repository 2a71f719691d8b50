"""Open a catalog that cannot be written: an index on a read-only disk, a backup, another user's folder.

SQLite's normal open wants to create a lock file and write to the WAL, which fails there and used to read as a
damaged catalog. Opened with ``mode=ro`` it needs neither; when even the WAL's shared-memory file cannot be made
(a read-only file system), ``immutable=1`` tells SQLite that nothing can change the file, which is then true.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Engine


def writable(catalog: Path) -> bool:
    """Whether this process may write the catalog and its folder (the WAL and lock files live beside it)."""
    return os.access(catalog.parent, os.W_OK) and os.access(catalog, os.W_OK)


def read_only_uri(catalog: Path) -> str:
    """The SQLite URI that opens ``catalog`` without writing anything."""
    uri = f"file:{urllib.parse.quote(os.fsencode(catalog))}?mode=ro"
    try:
        probe = sqlite3.connect(uri, uri=True)
        try:
            probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            probe.close()
    except sqlite3.OperationalError:
        uri += "&immutable=1"  # no -shm file can be made: a read-only file system, where nothing changes the file
    return uri


def read_only_engine(catalog: Path) -> Engine:
    from sqlalchemy import create_engine, event

    uri = read_only_uri(catalog)
    engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False))
    event.listen(engine, "connect", _read_only_pragmas)
    return engine


def _read_only_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()
