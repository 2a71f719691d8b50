"""Text about images besides their file names: the lines OCR reads in a photo, and generated captions.

One store for every source (``text_lines``: image, source, text, confidence, box), one row per image and source
saying that source has looked at it (``text_passes``, ok or failed with its reason: what makes a pass resumable),
and ONE full-text index over all of an image's text (``text_fts``: FTS5 with the ``trigram`` tokenizer, one
document per image, rowid = image id). A source is a producer that calls ``store_text``; the search ranks with
``filters.text_ranking`` and ``match_expression`` below. Triggers drop an image's text when the image is deleted
or its content changes; a move keeps it (the row keeps its id).

Matching is made for OCR's noise: lost spaces (``INVOICENo.2023-0412``), varying case, punctuation stuck to words
and look-alike characters (``INVO1CE N0.``). The document and the query are folded the same way (``fold``): lower
case, letters and digits only, and 0/o and 1/l/i read as one; each line stays apart (a newline, which no folded
query holds). A query matches an image whose text holds every word of it as a substring, in any order and line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.orm import Session

    from retrieval.model.ocr import ReadLine

TEXT_FTS = "text_fts"
OCR_SOURCE = "ocr"
CAPTION_SOURCE = "caption"  # one caption per image, written by the captioning decoder (indexer.caption_pass)
PASS_OK, PASS_FAILED = "ok", "failed"
MIN_WORD = 3  # the trigram tokenizer matches substrings of 3 characters or more

_FORGET = (
    "DELETE FROM text_lines WHERE image_id = old.id; DELETE FROM text_passes WHERE image_id = old.id; "
    f"DELETE FROM {TEXT_FTS} WHERE rowid = old.id;"
)
CREATE_STATEMENTS = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {TEXT_FTS} USING fts5(text, tokenize = 'trigram')",
    f"CREATE TRIGGER IF NOT EXISTS text_forget_deleted AFTER DELETE ON images BEGIN {_FORGET} END",
    "CREATE TRIGGER IF NOT EXISTS text_forget_changed AFTER UPDATE OF content_hash ON images "
    f"WHEN old.content_hash IS NOT new.content_hash BEGIN {_FORGET} END",
)

_LOOK_ALIKE = str.maketrans({"0": "o", "1": "l", "i": "l"})


def register_text_index(table: Table) -> None:
    """Create the full-text index and the triggers with the text tables (fresh catalogs)."""
    from sqlalchemy import DDL, event

    for statement in CREATE_STATEMENTS:
        event.listen(table, "after_create", DDL(statement))


def fold(value: str) -> str:
    """``value`` as the text index holds it and a query is matched: ``INVO1CE N0. 2023`` -> ``lnvolceno2o23``."""
    return "".join(char for char in value.casefold() if char.isalnum()).translate(_LOOK_ALIKE)


def match_expression(query: str) -> str | None:
    """FTS5 query: every word of ``query``, folded, must be a substring of the image's text. A word shorter than
    the trigram's 3 characters is joined to the next one (``no 2023`` -> ``no2o23``); None when nothing is left."""
    words, carry = [], ""
    for word in (fold(w) for w in query.split()):
        carry += word
        if len(carry) >= MIN_WORD:
            words.append(carry)
            carry = ""
    if carry and words:
        words[-1] += carry
    return " AND ".join(f'"{word}"' for word in words) or None


def store_text(
    session: Session, image_id: int, source: str, lines: Sequence[ReadLine], error: str | None = None
) -> None:
    """Record what ``source`` found in an image (``error``: why it could not look), replacing what it found
    before, and re-index the image's text, all in the caller's transaction."""
    from sqlalchemy import text

    session.execute(text("DELETE FROM text_lines WHERE image_id = :i AND source = :s"), {"i": image_id, "s": source})
    session.execute(text("DELETE FROM text_passes WHERE image_id = :i AND source = :s"), {"i": image_id, "s": source})
    if lines:
        session.execute(
            text("INSERT INTO text_lines (image_id, source, text, confidence, box) VALUES (:i, :s, :t, :c, :b)"),
            [
                {"i": image_id, "s": source, "t": line.text, "c": line.confidence, "b": json.dumps(line.box)}
                for line in lines
            ],
        )
    session.execute(
        text(
            "INSERT INTO text_passes (image_id, source, status, error, lines, done_at) "
            "VALUES (:i, :s, :status, :e, :n, :now)"
        ),
        {"i": image_id, "s": source, "e": error, "n": len(lines), "now": time.time()}
        | {"status": PASS_FAILED if error else PASS_OK},
    )
    _index_text(session, image_id)


def _index_text(session: Session, image_id: int) -> None:
    from sqlalchemy import text

    every = session.scalars(text("SELECT text FROM text_lines WHERE image_id = :i ORDER BY id"), {"i": image_id})
    document = "\n".join(folded for line in every if (folded := fold(line)))
    session.execute(text(f"DELETE FROM {TEXT_FTS} WHERE rowid = :i"), {"i": image_id})
    if document:
        session.execute(text(f"INSERT INTO {TEXT_FTS} (rowid, text) VALUES (:i, :d)"), {"i": image_id, "d": document})


@dataclass(frozen=True)
class ImageText:
    """What ``source`` read in one image: ``status`` ok or failed (``error`` says why), None when it has not looked
    yet; ``lines`` as stored (text, confidence, box), in reading order."""

    status: str | None
    error: str | None
    lines: list[dict]


def read_text(session: Session, image_id: int, source: str = OCR_SOURCE) -> ImageText:
    from sqlalchemy import text

    done = session.execute(
        text("SELECT status, error FROM text_passes WHERE image_id = :i AND source = :s"), {"i": image_id, "s": source}
    ).first()
    rows = session.execute(
        text("SELECT text, confidence, box FROM text_lines WHERE image_id = :i AND source = :s ORDER BY id"),
        {"i": image_id, "s": source},
    )
    lines = [{"text": t, "confidence": c, "box": json.loads(b) if b else None} for t, c, b in rows]
    return ImageText(done[0] if done else None, done[1] if done else None, lines)


@dataclass(frozen=True)
class TextCounts:
    """How many images ``source`` has looked at, found text in, and failed on."""

    read: int
    with_text: int
    failed: int


def text_counts(session: Session, source: str = OCR_SOURCE) -> TextCounts:
    from sqlalchemy import text

    read, with_text, failed = session.execute(
        text(
            "SELECT count(*), coalesce(sum(lines > 0), 0), coalesce(sum(status = :failed), 0) FROM text_passes "
            "WHERE source = :s"
        ),
        {"s": source, "failed": PASS_FAILED},
    ).one()
    return TextCounts(int(read), int(with_text), int(failed))
