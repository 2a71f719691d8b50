"""Near-duplicate photos: the vectors propose pairs, the pixels decide, and groups hold only mutual copies.

The exact stored embeddings are read from the catalog (the FAISS file may be approximate); every pair at or above
the cosine ``threshold`` is a candidate. Up to ``EXACT_PAIRS_LIMIT`` vectors they are range-searched with an exact
inner-product index, block by block; past it each vector's nearest neighbours come from an HNSW graph built for the
pass, since all pairs cost the square of the collection (``similar_pairs``). A cosine cannot tell a copy from
another picture of the same kind (a generic or small model puts unrelated scenes above 0.99), so each candidate pair
is then verified on the images' pixel prints (``retrieval.pixel_print``, stored at index time; rows indexed before
schema 5 get theirs computed from the file here, once, and stored when the catalog can be written).

Linkage: ``complete`` (the default) makes groups in which every two members are verified duplicates of each
other, so no member pulls in files that are not copies of each other (``_complete_groups``). ``single``
(connected components) chains A~B~C into one group; it is kept for the comparison in
``scripts/bench_duplicates.py``. The best file, the one to keep, leads: most pixels, then the largest file of
those pixels (least compressed), then the earliest date.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import UsageError
from retrieval.images import DecodeError, decode_image, read_file
from retrieval.pixel_print import PRINT_SIDE, pixel_print, pixel_similarity, print_views
from retrieval.search.duplicate_defaults import DEFAULT_PIXEL_THRESHOLD, DEFAULT_THRESHOLD
from retrieval.store.catalog import Catalog, ImageRow
from retrieval.store.layout import IndexLayout
from retrieval.store.paths import display_path

LINKAGES = ("complete", "single")
QUERY_BLOCK = 4096  # query rows per range search: bounds FAISS's result buffers
EXACT_PAIRS_LIMIT = 50_000  # up to this many vectors every pair is scored; past it a k-NN graph proposes pairs
NEIGHBOURS = 32  # graph neighbours looked at per vector (a row with more copies is range-searched exactly)
GRAPH_M, GRAPH_EF_BUILD, GRAPH_EF_SEARCH = 32, 80, 128  # HNSW links per node, build and search breadth
ROWS_CHUNK = 500  # ids per catalog lookup


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
    ids, vectors = _all_vectors(catalog)
    return group_pairs(
        candidate_pairs(catalog, ids, vectors, threshold), ids, vectors, threshold, pixel_threshold, linkage
    )


def group_pairs(
    pairs: CandidatePairs,
    ids: np.ndarray,
    vectors: np.ndarray,
    threshold: float,
    pixel_threshold: float = DEFAULT_PIXEL_THRESHOLD,
    linkage: str = "complete",
) -> list[DuplicateGroup]:
    """Groups from candidate pairs found at ``threshold`` or below: the pairs at ``threshold`` that pass the
    pixel check, linked, each group best first."""
    keep = (pairs.cosine >= threshold) & (pairs.pixels >= pixel_threshold)
    involved = np.unique(np.concatenate([pairs.first[keep], pairs.second[keep]]))
    keys = {int(pos): best_first_key(pairs.rows[int(ids[pos])]) for pos in involved}
    groups = []
    for positions in link_pairs(pairs.first[keep], pairs.second[keep], keys, linkage):
        best = positions[0]
        members = tuple(
            _member(pairs.rows[int(ids[pos])], *((1.0, 1.0) if pos == best else pairs.evidence(vectors, best, pos)))
            for pos in positions
        )
        groups.append(DuplicateGroup(members))
    groups.sort(key=lambda group: (-len(group.members), group.best.path))
    return groups


class PairsAtLowest:
    """The server's candidate pairs of one index state, found at the lowest threshold asked for so far: a higher
    threshold only filters them (no new pass over every vector), a lower one or a new index state searches again.
    Five thresholds cost one pass when the lowest comes first, and at most five otherwise."""

    def __init__(self) -> None:
        self._state: tuple[int, float, np.ndarray, np.ndarray, CandidatePairs] | None = None
        self.passes = 0  # how many passes over every vector were made (the costly part)

    def groups(self, catalog: Catalog, threshold: float) -> list[DuplicateGroup]:
        check_threshold(threshold)
        generation = catalog.vectors_generation()
        if self._state is None or self._state[0] != generation or threshold < self._state[1]:
            ids, vectors = _all_vectors(catalog)
            self._state = (generation, threshold, ids, vectors, candidate_pairs(catalog, ids, vectors, threshold))
            self.passes += 1
        _, _, ids, vectors, pairs = self._state
        return group_pairs(pairs, ids, vectors, threshold)


@dataclass(frozen=True)
class CandidatePairs:
    """Pairs of vector positions (first < second) above the cosine threshold, with both kinds of evidence."""

    first: np.ndarray
    second: np.ndarray
    cosine: np.ndarray
    pixels: np.ndarray  # pixel similarity; 0 where either file has no print (gone, unreadable)
    rows: dict  # image id -> ImageRow of every file in a pair
    views: dict  # vector position -> print_views of every file in a pair that has a print

    def evidence(self, vectors: np.ndarray, a: int, b: int) -> tuple[float, float]:
        """(cosine, pixel similarity) of two positions; a member need not be a candidate pair of the leader's."""
        found = a in self.views and b in self.views
        return float(vectors[a] @ vectors[b]), pixel_similarity(self.views[a], self.views[b]) if found else 0.0


def candidate_pairs(catalog: Catalog, ids: np.ndarray, vectors: np.ndarray, threshold: float) -> CandidatePairs:
    """Every pair at or above the cosine ``threshold``, and its pixel similarity."""
    first, second, cosine = similar_pairs(vectors, threshold)
    involved = np.unique(np.concatenate([first, second]))
    rows = _rows(catalog, ids[involved])
    prints = _pixel_prints(catalog, [rows[int(ids[pos])] for pos in involved])
    views = {int(pos): print_views(prints[int(ids[pos])]) for pos in involved if int(ids[pos]) in prints}
    pixels = np.array(
        [pixel_similarity(views[a], views[b]) if a in views and b in views else 0.0
         for a, b in zip(first.tolist(), second.tolist())],
        dtype=np.float32,
    )  # fmt: skip
    return CandidatePairs(first, second, cosine, pixels, rows, views)


def _pixel_prints(catalog: Catalog, rows: list) -> dict[int, bytes]:
    """The stored print of each row; rows indexed before prints existed get one from their file (when it is
    unchanged since indexing), stored for next time where the catalog can be written."""
    from sqlalchemy import select

    prints: dict[int, bytes] = {}
    ids = [row.id for row in rows]
    with catalog.session() as session:
        for start in range(0, len(ids), ROWS_CHUNK):
            chunk = ids[start : start + ROWS_CHUNK]
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


def similar_pairs(
    vectors: np.ndarray, threshold: float, exact_limit: int = EXACT_PAIRS_LIMIT
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows (i < j) whose inner product is at least ``threshold``: (i, j, similarity) arrays. Up to
    ``exact_limit`` rows every pair is scored; past it a k-nearest-neighbour graph proposes them (``_graph_pairs``),
    since scoring every pair grows with the square of the collection (200k rows: over 10 minutes here)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    if len(vectors) > exact_limit:
        return _graph_pairs(vectors, threshold)
    return _range_pairs(vectors, np.arange(len(vectors)), threshold)


def _range_pairs(vectors: np.ndarray, rows: np.ndarray, threshold: float):
    """Exact: the pairs (i < j) at or above ``threshold`` that involve one of ``rows``, by range search."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    radius = np.nextafter(np.float32(threshold), np.float32(-np.inf))  # FAISS keeps scores strictly above it
    firsts, seconds, scores = [], [], []
    for start in range(0, len(rows), QUERY_BLOCK):
        block = rows[start : start + QUERY_BLOCK]
        lims, found_scores, found = index.range_search(vectors[block], float(radius))
        queried = np.repeat(block, np.diff(lims).astype(np.int64))
        keep = (found != queried) & (found_scores >= threshold)
        firsts.append(queried[keep])
        seconds.append(found[keep].astype(np.int64))
        scores.append(found_scores[keep])
    return _unique_pairs(np.concatenate(firsts), np.concatenate(seconds), np.concatenate(scores))


def _graph_pairs(vectors: np.ndarray, threshold: float):
    """Each row's ``NEIGHBOURS`` nearest rows from an HNSW graph (about N log N work instead of N^2), the pairs at
    or above ``threshold`` kept. A row whose neighbours all clear the threshold may have more copies than that:
    those rows alone are range-searched exactly, so a large group of copies is found whole."""
    import faiss

    graph = faiss.IndexHNSWFlat(vectors.shape[1], GRAPH_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = GRAPH_EF_BUILD
    graph.add(vectors)
    graph.hnsw.efSearch = GRAPH_EF_SEARCH
    firsts, seconds, scores, crowded = [], [], [], []
    for start in range(0, len(vectors), QUERY_BLOCK):
        found_scores, found = graph.search(vectors[start : start + QUERY_BLOCK], NEIGHBOURS)
        queried = np.repeat(np.arange(start, start + len(found)), NEIGHBOURS).reshape(found.shape)
        keep = (found >= 0) & (found != queried) & (found_scores >= threshold)
        firsts.append(queried[keep])
        seconds.append(found[keep])
        scores.append(found_scores[keep])
        crowded.append(start + np.flatnonzero(found_scores[:, -1] >= threshold))
    del graph
    crowded_rows = np.concatenate(crowded)
    if len(crowded_rows):
        first, second, score = _range_pairs(vectors, crowded_rows, threshold)
        firsts, seconds, scores = [*firsts, first], [*seconds, second], [*scores, score]
    return _unique_pairs(np.concatenate(firsts), np.concatenate(seconds), np.concatenate(scores))


def _unique_pairs(first: np.ndarray, second: np.ndarray, score: np.ndarray):
    """Each pair once, as (i < j), in (i, j) order, whichever side found it."""
    low, high = np.minimum(first, second).astype(np.int64), np.maximum(first, second).astype(np.int64)
    _, at = np.unique(low * (int(high.max(initial=0)) + 1) + high, return_index=True)
    return low[at], high[at], score[at].astype(np.float32)


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


def _all_vectors(catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    batches = list(catalog.iter_embeddings())
    if not batches:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.float32)
    return np.concatenate([ids for ids, _ in batches]), np.concatenate([vectors for _, vectors in batches])


def _rows(catalog: Catalog, ids: Iterable[int]) -> dict:
    ids = [int(i) for i in ids]
    rows = {}
    for start in range(0, len(ids), ROWS_CHUNK):
        rows.update(catalog.rows_by_id(ids[start : start + ROWS_CHUNK]))
    return rows


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
