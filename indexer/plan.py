"""Diff what is on disk against the catalog: new, changed, moved, gone, unchanged.

Unchanged means same size and mtime (no read needed). A file that appears while another of the same size
disappears is hashed: same content means a move or rename, and it keeps its vector without re-encoding. Rows
under an indexed folder that is missing now (``orphans``: renamed, or an unmounted drive) are candidates too, so a
renamed photos folder is recognised as a move; unmatched orphans stay (the drive may come back).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from indexer.scan import FileFacts, ScanResult
from retrieval.store.catalog import STATUS_FAILED, STATUS_OK, Catalog, ImageRow


@dataclass(frozen=True)
class WorkItem:
    """A file to decode and encode; ``row_id`` is set when it replaces a known (changed) row."""

    facts: FileFacts
    row_id: int | None


@dataclass
class Plan:
    work: list[WorkItem] = field(default_factory=list)
    moved: list[tuple[int, FileFacts]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    unreadable: list[tuple[str, str, int | None]] = field(default_factory=list)  # path, reason, known row id
    unchanged: int = 0
    unchanged_failed: int = 0  # of ``unchanged``: files that failed before and still do (not retried)
    known_paths: list[str] = field(default_factory=list)

    def known_under(self, folder: str) -> bool:
        prefix = folder.rstrip("/") + "/"
        return any(path.startswith(prefix) for path in self.known_paths)


def plan_changes(
    catalog: Catalog,
    session: Session,
    scans: dict[str, ScanResult],
    hash_file: Callable[[str], str],
    orphans: Sequence[ImageRow] = (),
) -> Plan:
    plan = Plan()
    known: dict[str, ImageRow] = {}
    for folder in scans:
        known.update({row.path: row for row in catalog.rows_under(session, folder)})
    plan.known_paths = list(known)
    on_disk: dict[str, FileFacts] = {}
    for scan in scans.values():
        on_disk.update({facts.path: facts for facts in scan.files})
        for path, reason in scan.unreadable:
            row = known.get(path)
            if row is not None and row.status == STATUS_FAILED and row.error == reason:
                plan.unchanged += 1
                plan.unchanged_failed += 1
            else:
                plan.unreadable.append((path, reason, row.id if row else None))
    unreadable_paths = {path for scan in scans.values() for path, _ in scan.unreadable}

    new: list[FileFacts] = []
    for path, facts in on_disk.items():
        row = known.get(path)
        if row is None:
            new.append(facts)
        elif row.size == facts.size and row.mtime_ns == facts.mtime_ns:
            plan.unchanged += 1
            plan.unchanged_failed += row.status == STATUS_FAILED
        else:
            plan.work.append(WorkItem(facts, row.id))

    gone = [row for path, row in known.items() if path not in on_disk and path not in unreadable_paths]
    moved_ids = _match_moves(new, [*gone, *orphans], hash_file, plan)
    plan.gone = [row.id for row in gone if row.id not in moved_ids]
    return plan


def _match_moves(new: list[FileFacts], gone: list[ImageRow], hash_file: Callable[[str], str], plan: Plan) -> set[int]:
    """Pair new files with vanished rows of the same size and content hash; the rest of ``new`` is work."""
    candidates: dict[int, list[ImageRow]] = defaultdict(list)
    for row in gone:
        if row.status == STATUS_OK and row.content_hash:
            candidates[row.size].append(row)
    moved: set[int] = set()
    for facts in new:
        rows = [row for row in candidates.get(facts.size, []) if row.id not in moved]
        match = None
        if rows:
            try:
                digest = hash_file(facts.path)
            except OSError:
                digest = None
            match = next((row for row in rows if row.content_hash == digest), None)
        if match is None:
            plan.work.append(WorkItem(facts, None))
        else:
            moved.add(match.id)
            plan.moved.append((match.id, facts))
    return moved
