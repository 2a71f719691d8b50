"""Salvage a damaged catalog into a new one with nothing lost (``clipsearch check --repair``).

Two kinds of damage leave every row and embedding readable while the file as a whole is refused or half broken:
a zeroed or garbled 100-byte SQLite header ("file is not a database"), and a damaged page of the keyword table
(FTS5), which breaks keyword search and ``PRAGMA quick_check`` though the ``images`` table reads fine. Both are
fixed the same way: read the old file (through a copy with a rebuilt header when the header is the damage),
create the same schema in a new file, copy every table but the keyword table's, rebuild the keyword table from
the catalog's paths, check the copy, and put it in place. The damaged file is kept beside it
(``catalog.sqlite.damaged-TIMESTAMP``, with its -wal and -shm), so nothing is ever thrown away.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

from retrieval.errors import IndexCorruptError
from retrieval.store.keywords import FILL_STATEMENT, FTS_TABLE

HEADER_MAGIC = b"SQLite format 3\x00"
PAGE_SIZES = (4096, 16384, 8192, 32768, 65536, 1024, 2048, 512)  # the common ones first
SIDE_FILES = ("-wal", "-shm", "-journal")


def salvage_catalog(path: Path) -> str:
    """Replace the catalog at ``path`` by a checked copy of everything readable in it; return what was done,
    in one line, or raise ``IndexCorruptError`` (one line) when the rows themselves cannot be read."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    readable, rebuilt_header = _readable_copy(path)
    fresh = path.with_name(f".{path.name}.salvage-{os.getpid()}")
    fresh.unlink(missing_ok=True)
    try:
        rows = _copy_into(readable, fresh)
    except sqlite3.DatabaseError as error:
        fresh.unlink(missing_ok=True)
        raise IndexCorruptError(
            f"{path} is damaged past salvage ({error}): index the folders again into a new --index folder"
        ) from None
    finally:
        if readable != path:
            readable.unlink(missing_ok=True)
    kept = path.with_name(f"{path.name}.damaged-{stamp}")
    os.replace(path, kept)
    for suffix in SIDE_FILES:  # the old file's journal must never be applied to the new one
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, kept.with_name(kept.name + suffix))
    os.replace(fresh, path)
    how = "with a rebuilt header" if rebuilt_header else "with the keyword table rebuilt from the paths"
    return f"salvaged the catalog into a new file ({rows} images, {how}); the damaged one is kept as {kept.name}"


def _readable_copy(path: Path) -> tuple[Path, bool]:
    """``path`` itself when SQLite reads its schema; else a copy with a rebuilt header that does."""
    if _schema_readable(path):
        return path, False
    with open(path, "rb") as file:
        head = file.read(100)
    for page_size in PAGE_SIZES:
        if path.stat().st_size % page_size:
            continue
        copy = path.with_name(f".{path.name}.header-{os.getpid()}")
        shutil.copyfile(path, copy)
        with open(copy, "r+b") as file:
            file.write(_header(page_size, path.stat().st_size // page_size, head))
        if _schema_readable(copy):
            return copy, True
        copy.unlink()
    raise IndexCorruptError(
        f"{path} is not a readable SQLite catalog and its header cannot be rebuilt: index the folders again into a "
        f"new --index folder"
    )


def _schema_readable(path: Path) -> bool:
    try:
        with _open_read_only(path) as connection:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            connection.execute("SELECT count(*) FROM images").fetchone()
        return True
    except sqlite3.DatabaseError:
        return False


def _open_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _header(page_size: int, pages: int, old: bytes) -> bytes:
    """A valid 100-byte header for a database of ``pages`` pages of ``page_size`` (rollback journal, UTF-8);
    the schema cookie and user version are kept when the old header still has them."""
    counter = (1).to_bytes(4, "big")
    fields = bytearray(100)
    fields[0:16] = HEADER_MAGIC
    fields[16:18] = (1 if page_size == 65536 else page_size).to_bytes(2, "big")
    fields[18], fields[19], fields[20] = 1, 1, 0  # file format versions (legacy), reserved bytes per page
    fields[21], fields[22], fields[23] = 64, 32, 32  # payload fractions, fixed by the format
    fields[24:28] = counter
    fields[28:32] = pages.to_bytes(4, "big")
    fields[40:44] = old[40:44] if len(old) == 100 and any(old[40:44]) else (1).to_bytes(4, "big")  # schema cookie
    fields[44:48] = (4).to_bytes(4, "big")  # schema format 4
    fields[56:60] = (1).to_bytes(4, "big")  # UTF-8
    fields[60:64] = old[60:64] if len(old) == 100 else bytes(4)  # user version
    fields[92:96] = counter  # equal to the change counter: the page count above is trusted
    major, minor, patch = sqlite3.sqlite_version_info
    fields[96:100] = (major * 1_000_000 + minor * 1000 + patch).to_bytes(4, "big")
    return bytes(fields)


def _copy_rows(old: sqlite3.Connection, new: sqlite3.Connection, table: str, with_rowid: bool) -> None:
    columns = (["rowid"] if with_rowid else []) + [row[1] for row in old.execute(f'PRAGMA table_info("{table}")')]
    marks = ", ".join("?" * len(columns))
    names = ", ".join(column if column == "rowid" else f'"{column}"' for column in columns)
    cursor = old.execute(f'SELECT {names} FROM "{table}"')
    while batch := cursor.fetchmany(5000):
        new.executemany(f'INSERT INTO "{table}" ({names}) VALUES ({marks})', batch)


def _copy_into(source: Path, target: Path) -> int:
    """The schema and rows of ``source`` in a new file ``target``, the keyword table rebuilt; the image count."""
    old = _open_read_only(source)
    new = sqlite3.connect(target)
    try:
        schema = old.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"
        ).fetchall()
        virtual = [name for kind, name, sql in schema if kind == "table" and sql.upper().startswith("CREATE VIRTUAL")]
        created = [  # a full-text table makes its own shadow tables (``<name>_data``, ...) when created
            (name, sql)
            for kind, name, sql in schema
            if kind == "table" and not name.startswith(("sqlite_", *(f"{table}_" for table in virtual)))
        ]
        new.execute(f"PRAGMA user_version = {int(old.execute('PRAGMA user_version').fetchone()[0])}")
        for _name, sql in created:  # tables first, then what refers to them
            new.execute(sql)
        for table, _sql in created:  # the keyword table is rebuilt from the paths below; other full-text tables
            if table != FTS_TABLE:  # are copied with their rowids (the image ids they index)
                _copy_rows(old, new, table, with_rowid=table in virtual)
        if any(name == "sqlite_sequence" for _, name, _ in schema):  # AUTOINCREMENT: ids are never reused
            new.executemany(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)",
                old.execute("SELECT name, seq FROM sqlite_sequence").fetchall(),
            )
        for kind, _name, sql in schema:
            if kind in ("index", "trigger", "view"):
                new.execute(sql)
        if any(name == FTS_TABLE for _, name, _ in schema):
            new.execute(FILL_STATEMENT)
        new.commit()
        if new.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("the salvaged copy does not pass SQLite's integrity check")
        rows = new.execute("SELECT count(*) FROM images").fetchone()[0]
        if rows != old.execute("SELECT count(*) FROM images").fetchone()[0]:
            raise sqlite3.DatabaseError("the salvaged copy lost rows")
        new.execute("PRAGMA journal_mode = WAL")
        return rows
    finally:
        old.close()
        new.close()
