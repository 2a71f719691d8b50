"""What every producer of per-image text (the OCR pass, the caption pass) shares: its pending work, and a batch of
results committed in one transaction to the text store (``retrieval.store.image_text``).

A source's work is the indexed images without a pass row for that source, so a pass resumes by itself; a batch is
one SQLite transaction (the lines, the pass row, the text index), so kill -9 loses at most the batch in hand. A
result is kept only when the bytes it came from are still the indexed file's (same content hash): a file changed
since it was encoded is left for the next run, which encodes it again, then reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import exists, select

from retrieval.faults import fault_point
from retrieval.store.catalog import STATUS_OK, Catalog, ImageRow, TextPass
from retrieval.store.image_text import store_text


@dataclass(frozen=True)
class TextResult:
    """What a source found in one image: ``digest`` the content hash of the bytes it read (None: unread),
    ``lines`` (objects with text, confidence, box), ``error`` why it could not look."""

    image_id: int
    indexed_hash: str | None
    digest: str | None
    lines: Sequence
    error: str | None = None


def pending_images(catalog: Catalog, source: str) -> list[tuple[int, str, str | None]]:
    """(id, path, content hash) of indexed images ``source`` has not looked at, in id order."""
    looked = exists().where(TextPass.image_id == ImageRow.id, TextPass.source == source)
    with catalog.session() as session:
        query = select(ImageRow.id, ImageRow.path, ImageRow.content_hash).where(ImageRow.status == STATUS_OK, ~looked)
        return [tuple(row) for row in session.execute(query.order_by(ImageRow.id))]


def commit_results(catalog: Catalog, source: str, batch: Sequence[TextResult]) -> list[TextResult]:
    """Store a batch in one transaction; returns the results kept (the others' files changed or went).
    Crash-test points: ``{source}_commit_begin`` (inside the transaction) and ``{source}_commit_end``."""
    kept = []
    if not batch:
        return kept
    with catalog.session() as session, session.begin():
        for result in batch:
            row = session.get(ImageRow, result.image_id)
            indexed = result.indexed_hash
            if row is None or row.content_hash != indexed or (indexed is not None and result.digest != indexed):
                continue
            store_text(session, result.image_id, source, result.lines, result.error)
            kept.append(result)
        fault_point(f"{source}_commit_begin")
    fault_point(f"{source}_commit_end")
    return kept
