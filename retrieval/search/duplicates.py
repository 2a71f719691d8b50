"""Near-duplicate photos: the vectors propose pairs, the pixels decide, and groups hold only mutual copies.

The exact stored embeddings are streamed from the catalog (the FAISS file may be approximate); every pair at or
above the cosine ``threshold`` is a candidate (``retrieval.search.duplicate_pairs``: exact up to 50,000 vectors,
past it proposed by a compact IVF index and scored exactly, in memory that stays a few GB at 10M). A cosine cannot
tell a copy from another picture of the same kind (a generic or small model puts unrelated scenes above 0.99), so
each candidate pair is then verified on the images' pixel prints (``retrieval.pixel_print``, stored at index
time; rows indexed before schema 5 get theirs computed from the file here, once, and stored when the catalog can
be written).

Linkage: ``complete`` (the default) makes groups in which every two members are verified duplicates of each
other, so no member pulls in files that are not copies of each other (``_complete_groups``). ``single``
(connected components) chains A~B~C into one group; it is kept for the comparison in
``scripts/bench_duplicates.py``. The best file, the one to keep, leads: most pixels, then the largest file of
those pixels (least compressed), then the earliest date.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import UsageError
from retrieval.images import DecodeError, decode_image, read_file
from retrieval.pixel_print import PRINT_SIDE, pixel_print, pixel_similarity, print_views
from retrieval.search.duplicate_defaults import DEFAULT_PIXEL_THRESHOLD, DEFAULT_THRESHOLD
from retrieval.search.duplicate_pairs import EXACT_PAIRS_LIMIT, VectorSource, pairs_in
from retrieval.store.catalog import Catalog, ImageRow
from retrieval.store.catalog_reads import CHUNK
from retrieval.store.layout import IndexLayout
from retrieval.store.paths import display_path
from retrieval.unit import unit_rows

LINKAGES = ("complete", "single")
PIXEL_BLOCK = 2048  # candidate pairs compared on their prints at a time: at most 4,096 images' views, 370 MB


@dataclass(frozen=True)
class DuplicateMember:
    image_id: int
    path: str
    width: int | None
    height: int | None
    size: int
    score: float  # cosine similarity to the group's first (best) file; 1.0 for that file itself
    pixels: float  # pixel similarity to that file (retrieval.pixel_print); 1.0 for the file itself

    def to_dict(self) -> dict:
        return asdict(self) | {"path": display_path(self.path)}


@dataclass(frozen=True)
class DuplicateGroup:
    """Near-identical images, the best file (most pixels, then most bytes, then the earliest) first."""

    members: tuple[DuplicateMember, ...]

    @property
    def best(self) -> DuplicateMember:
        return self.members[0]

    def to_dict(self) -> dict:
        return {"members": [member.to_dict() for member in self.members]}


def duplicates_in_index(
    index_dir: Path | str,
    threshold: float = DEFAULT_THRESHOLD,
    pixel_threshold: float = DEFAULT_PIXEL_THRESHOLD,
    linkage: str = "complete",
) -> list[DuplicateGroup]:
    """``find_duplicates`` over the index at ``index_dir`` (what ``clipsearch duplicates`` calls)."""
    check_threshold(threshold)
    check_threshold(pixel_threshold, "--pixels")
    catalog = Catalog(IndexLayout(Path(index_dir).expanduser()).catalog, create=False)
    try:
        return find_duplicates(catalog, threshold, pixel_threshold, linkage)
    finally:
        catalog.close()


def find_duplicates(
    catalog: Catalog,
    threshold: float = DEFAULT_THRESHOLD,
    pixel_threshold: float = DEFAULT_PIXEL_THRESHOLD,
    linkage: str = "complete",
) -> list[DuplicateGroup]:
    """Groups of near-duplicates among the indexed images, largest groups first."""
    check_threshold(threshold)
    check_threshold(pixel_threshold, "--pixels")
    return group_pairs(candidate_pairs(catalog, threshold), threshold, pixel_threshold, linkage)


def group_pairs(
    pairs: CandidatePairs,
    threshold: float,
    pixel_threshold: float = DEFAULT_PIXEL_THRESHOLD,
    linkage: str = "complete",
) -> list[DuplicateGroup]:
    """Groups from candidate pairs found at ``threshold`` or below: the pairs at ``threshold`` that pass the
    pixel check, linked, each group best first."""
    keep = (pairs.cosine >= threshold) & (pairs.pixels >= pixel_threshold)
    involved = np.unique(np.concatenate([pairs.first[keep], pairs.second[keep]]))
    keys = {int(image_id): best_first_key(pairs.rows[int(image_id)]) for image_id in involved}
    groups = []
    for image_ids in link_pairs(pairs.first[keep], pairs.second[keep], keys, linkage):
        best = image_ids[0]
        members = tuple(
            _member(pairs.rows[image_id], *((1.0, 1.0) if image_id == best else pairs.evidence(best, image_id)))
            for image_id in image_ids
        )
        groups.append(DuplicateGroup(members))
    groups.sort(key=lambda group: (-len(group.members), group.best.path))
    return groups


class PairsAtLowest:
    """The server's candidate pairs of one index state, found at the lowest threshold asked for so far: a higher
    threshold only filters them (no new pass over every vector), a lower one or a new index state searches again.
    Five thresholds cost one pass when the lowest comes first, and at most five otherwise."""

    def __init__(self) -> None:
        self._state: tuple[int, float, CandidatePairs] | None = None
        self.passes = 0  # how many passes over every vector were made (the costly part)

    def groups(self, catalog: Catalog, threshold: float) -> list[DuplicateGroup]:
        check_threshold(threshold)
        generation = catalog.vectors_generation()
        if self._state is None or self._state[0] != generation or threshold < self._state[1]:
            self._state = (generation, threshold, candidate_pairs(catalog, threshold))
            self.passes += 1
        return group_pairs(self._state[2], threshold)


@dataclass(frozen=True)
class CandidatePairs:
    """Pairs of image ids (first < second) above the cosine threshold, with both kinds of evidence."""

    first: np.ndarray  # sorted by (first, second)
    second: np.ndarray
    cosine: np.ndarray
    pixels: np.ndarray  # pixel similarity; 0 where either file has no print (gone, unreadable)
    rows: dict  # image id -> StoredImage of every file in a pair (its embedding included)
    prints: dict  # image id -> stored pixel print (3 KB) of every file in a pair that has one

    def evidence(self, a: int, b: int) -> tuple[float, float]:
        """(cosine, pixel similarity) of two images; a member need not be a candidate pair of the leader's."""
        first, second = unit_rows(np.stack([self.rows[a].vector(), self.rows[b].vector()]))
        cosine = float(first @ second)
        low, high = min(a, b), max(a, b)
        at = int(np.searchsorted(self._keys, low * self._span + high))
        if at < len(self.first) and (self.first[at], self.second[at]) == (low, high):
            return cosine, float(self.pixels[at])
        found = a in self.prints and b in self.prints
        return cosine, pixel_similarity(print_views(self.prints[a]), print_views(self.prints[b])) if found else 0.0

    @functools.cached_property
    def _span(self) -> int:
        return int(max(self.first.max(initial=0), self.second.max(initial=0))) + 1

    @functools.cached_property
    def _keys(self) -> np.ndarray:
        """One number per pair, ascending in the pairs' (first, second) order: a pair is found by bisection."""
        return self.first.astype(np.int64) * self._span + self.second


def candidate_pairs(catalog: Catalog, threshold: float, exact_limit: int = EXACT_PAIRS_LIMIT) -> CandidatePairs:
    """Every pair at or above the cosine ``threshold``, and its pixel similarity. Only the files in a pair are
    held in memory (rows and their 3 KB prints); the collection's vectors are streamed, and the prints are
    compared a block of pairs at a time (the views compared are 90 KB an image: 9 GB for 100k images in pairs)."""
    first, second, cosine = pairs_in(VectorSource.of_catalog(catalog), threshold, exact_limit)
    involved = np.unique(np.concatenate([first, second]))
    rows = catalog.rows_by_id(involved.tolist())
    prints = _pixel_prints(catalog, [rows[int(image_id)] for image_id in involved if int(image_id) in rows])
    return CandidatePairs(first, second, cosine, _pair_pixels(first, second, prints), rows, prints)


def _pair_pixels(first: np.ndarray, second: np.ndarray, prints: dict[int, bytes]) -> np.ndarray:
    """Pixel similarity of each pair, ``PIXEL_BLOCK`` pairs at a time (the views of one block in memory)."""
    pixels = np.zeros(len(first), dtype=np.float32)
    for start in range(0, len(first), PIXEL_BLOCK):
        pairs = list(zip(first[start : start + PIXEL_BLOCK].tolist(), second[start : start + PIXEL_BLOCK].tolist()))
        views = {image_id: print_views(prints[image_id]) for pair in pairs for image_id in pair if image_id in prints}
        pixels[start : start + len(pairs)] = [
            pixel_similarity(views[a], views[b]) if a in views and b in views else 0.0 for a, b in pairs
        ]
    return pixels


def _pixel_prints(catalog: Catalog, rows: list) -> dict[int, bytes]:
    """The stored print of each row; rows indexed before prints existed get one from their file (when it is
    unchanged since indexing), stored for next time where the catalog can be written."""
    from sqlalchemy import select

    prints: dict[int, bytes] = {}
    ids = [row.id for row in rows]
    with catalog.session() as session:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            query = select(ImageRow.id, ImageRow.pixel_print).where(ImageRow.id.in_(chunk))
            prints.update({image_id: blob for image_id, blob in session.execute(query) if blob is not None})
    computed = {}
    for row in rows:
        if row.id not in prints and (blob := _print_from_file(row)) is not None:
            computed[row.id] = (blob, row.size, row.mtime_ns)
    if computed and not catalog.read_only:
        _store_prints(catalog, computed)
    return prints | {image_id: blob for image_id, (blob, _, _) in computed.items()}


def _print_from_file(row) -> bytes | None:
    try:
        if os.stat(row.path).st_mtime_ns != row.mtime_ns:
            return None  # changed since indexing: its vector no longer describes it either
        return pixel_print(decode_image(read_file(row.path), min_side=4 * PRINT_SIDE))
    except (OSError, DecodeError):
        return None


def _store_prints(catalog: Catalog, computed: dict[int, tuple[bytes, int, int]]) -> None:
    """One short transaction; skipped (the prints are computed again next time) if another writer holds on."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    statement = "UPDATE images SET pixel_print = ? WHERE id = ? AND size = ? AND mtime_ns = ? AND pixel_print IS NULL"
    try:
        with catalog.session() as session, session.begin():
            session.connection().exec_driver_sql(
                statement, [(blob, image_id, size, mtime) for image_id, (blob, size, mtime) in computed.items()]
            )
    except (OperationalError, sqlite3.OperationalError):
        pass


def check_threshold(threshold: float, option: str = "--threshold") -> None:
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"{option} must be a similarity above 0 and at most 1, e.g. 0.9")


def link_pairs(
    first: np.ndarray, second: np.ndarray, keys: dict[int, tuple], linkage: str = "complete"
) -> list[list[int]]:
    """Groups (of two or more) from verified pairs; each group best first, i.e. in ascending order of ``keys``."""
    if linkage not in LINKAGES:
        raise UsageError(f"linkage must be one of {', '.join(LINKAGES)}, not {linkage!r}")
    neighbours: dict[int, set[int]] = {}
    for a, b in zip(first.tolist(), second.tolist()):
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    order = sorted(neighbours, key=keys.__getitem__)
    rank = {node: position for position, node in enumerate(order)}
    groups = _complete_groups(order, neighbours, rank) if linkage == "complete" else _components(order, neighbours)
    return [sorted(group, key=rank.__getitem__) for group in groups if len(group) > 1]


def _complete_groups(order: list[int], neighbours: dict[int, set[int]], rank: dict[int, int]) -> list[list[int]]:
    """Cliques of verified pairs. Seeds come most-linked first (an original and its copies all verify with each
    other; a look-alike verifies with only some of them), and each seed's free neighbours join best-linked first,
    each only if it verifies with every member already in."""
    taken: set[int] = set()
    groups = []
    for seed in sorted(order, key=lambda node: (-len(neighbours[node]), rank[node])):
        if seed in taken:
            continue
        free = neighbours[seed] - taken
        group = [seed]
        for other in sorted(free, key=lambda node: (-len(neighbours[node] & free), rank[node])):
            if all(member in neighbours[other] for member in group):
                group.append(other)
        taken.update(group)
        groups.append(group)
    return groups


def _components(order: list[int], neighbours: dict[int, set[int]]) -> list[list[int]]:
    seen: set[int] = set()
    groups = []
    for start in order:
        if start in seen:
            continue
        seen.add(start)
        stack, group = [start], []
        while stack:
            node = stack.pop()
            group.append(node)
            for other in neighbours[node]:
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        groups.append(group)
    return groups


def best_first_key(row) -> tuple:
    """Sort key of the file to keep, as people choose: most pixels, then the largest file of those pixels (the
    least compressed), then the earliest date taken (files without one after), then the earliest file; the path
    breaks ties the same on every run."""
    pixels = (row.width or 0) * (row.height or 0)
    return (-pixels, -row.size, row.taken_at is None, row.taken_at or "", row.mtime_ns, row.path)


def _member(row, score: float, pixels: float) -> DuplicateMember:
    return DuplicateMember(
        row.id, row.path, row.width, row.height, row.size, round(min(1.0, score), 4), round(pixels, 4)
    )
