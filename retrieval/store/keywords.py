"""File-name keywords: an SQLite FTS5 table over the tokens of every image's path, kept in step with the catalog.

Triggers keep it in step on deletes and moves; inserts are filled by the writer with one set-based statement per
chunk (``fill_keywords``), in the same transaction, so the keyword table can never disagree with the catalog. (A
per-row insert trigger, schema 3, capped the writer at ~20,000 rows/s of CPU; schema 4 drops it.) Tokens are runs
of letters and digits (FTS5's ``unicode61``): ``/photos/paris-2019/IMG_0412.jpg`` holds ``photos paris 2019`` in
its folder and ``img 0412 jpg`` in its name.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Table

FTS_TABLE = "images_fts"
NAME_WEIGHT, FOLDER_WEIGHT = 4.0, 1.0  # bm25 column weights: a match in the file name counts more

# The folder of a path with its trailing "/" (rtrim drops every trailing character that is not "/"), and the name.
_FOLDER = "rtrim({p}, replace({p}, '/', ''))"
_NAME = "substr({p}, length(" + _FOLDER + ") + 1)"
_INSERT = f"INSERT INTO {FTS_TABLE} (rowid, name, folder) VALUES (new.id, {_NAME}, {_FOLDER});".format(p="new.path")
# Contentless (schema 7): the table keeps no copy of the names, so a row leaves it through FTS5's 'delete' command,
# given the tokens it was indexed with, which are the old path's (SQLite 3.40 has no contentless_delete). Only a row
# the table holds (its docsize entry): deleting one it never held would skew the totals, and bm25 would rank nothing.
_DELETE = (
    f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rowid, name, folder) SELECT 'delete', old.id, {_NAME}, {_FOLDER} "
    f"WHERE EXISTS (SELECT 1 FROM {FTS_TABLE}_docsize WHERE id = old.id);"
).format(p="old.path")

CREATE_STATEMENTS = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(name, folder, tokenize = 'unicode61', content = '')",
    f"CREATE TRIGGER IF NOT EXISTS images_fts_delete AFTER DELETE ON images BEGIN {_DELETE} END",
    f"CREATE TRIGGER IF NOT EXISTS images_fts_update AFTER UPDATE OF path ON images BEGIN {_DELETE} {_INSERT} END",
)
FILL_STATEMENT = f"INSERT INTO {FTS_TABLE} (rowid, name, folder) SELECT id, {_NAME}, {_FOLDER} FROM images".format(
    p="path"
)

FILL_IDS_STATEMENT = FILL_STATEMENT + " WHERE id BETWEEN :first AND :last"

_TOKEN = re.compile(r"[^\W_]+")
_FILE_NAME_LIKE = re.compile(r"^\S*[0-9_.\-]\S*$")


def register_keyword_table(images: Table) -> None:
    """Create the keyword table and its triggers right after ``images`` (fresh catalogs)."""
    from sqlalchemy import DDL, event

    for statement in CREATE_STATEMENTS:
        event.listen(images, "after_create", DDL(statement))


def fill_keywords(session, first_id: int, last_id: int) -> None:
    """Index the paths of the rows with ids ``first_id..last_id``, just inserted in this transaction."""
    from sqlalchemy import text

    if last_id >= first_id:
        session.execute(text(FILL_IDS_STATEMENT), {"first": first_id, "last": last_id})


def looks_like_file_name(query: str) -> bool:
    """The rule that turns keyword matching on by default: one word (no spaces) holding a digit, ``_``, ``-`` or
    ``.``, e.g. ``IMG_0412``, ``paris-2019``, ``DSC01234.JPG``; ``sunset`` or ``red car`` are not."""
    return bool(_FILE_NAME_LIKE.match(query.strip()))


def match_expression(query: str) -> str | None:
    """FTS5 query: every token of ``query`` must appear in the path, in any order, each as a prefix
    (``paris-20`` finds ``paris-2019``). None when the query has no letters or digits."""
    tokens = _TOKEN.findall(query.lower())
    return " AND ".join(f'"{token}"*' for token in tokens) or None
