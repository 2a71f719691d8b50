"""Near-duplicate photos: groups of indexed images whose embeddings lie within a cosine threshold of each other.

Read side only. The exact stored embeddings are read from the catalog (the FAISS file may be approximate) and
range-searched with an exact inner-product index, block by block, so memory stays at one float32 copy of the
vectors. Pairs at or above the threshold are then linked into groups.

Linkage decides what a chain does. With single linkage (connected components) A~B and B~C put A and C together
even when A and C are far apart, and at a loose threshold one chain can swallow many distinct photos. The default,
``leader``, takes images best first (most pixels, then most bytes) and gives each one not yet taken the images
still free among its neighbours: every member is within the threshold of its group's first file, the one to keep.
``scripts/bench_duplicates.py`` measures both on a generated set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import UsageError
from retrieval.store.catalog import Catalog
from retrieval.store.layout import IndexLayout
from retrieval.store.paths import display_path

DEFAULT_THRESHOLD = 0.95
LINKAGES = ("leader", "single")
QUERY_BLOCK = 4096  # query rows per range search: bounds FAISS's result buffers
ROWS_CHUNK = 500  # ids per catalog lookup


@dataclass(frozen=True)
class DuplicateMember:
    image_id: int
    path: str
    width: int | None
    height: int | None
    size: int
    score: float  # cosine similarity to the group's first (best) file; 1.0 for that file itself

    def to_dict(self) -> dict:
        return asdict(self) | {"path": display_path(self.path)}


@dataclass(frozen=True)
class DuplicateGroup:
    """Near-identical images, the best file (most pixels, then most bytes) first."""

    members: tuple[DuplicateMember, ...]

    @property
    def best(self) -> DuplicateMember:
        return self.members[0]

    def to_dict(self) -> dict:
        return {"members": [member.to_dict() for member in self.members]}


def duplicates_in_index(
    index_dir: Path | str, threshold: float = DEFAULT_THRESHOLD, linkage: str = "leader"
) -> list[DuplicateGroup]:
    """``find_duplicates`` over the index at ``index_dir`` (what ``clipsearch duplicates`` calls)."""
    check_threshold(threshold)
    catalog = Catalog(IndexLayout(Path(index_dir).expanduser()).catalog, create=False)
    try:
        return find_duplicates(catalog, threshold, linkage)
    finally:
        catalog.close()


def find_duplicates(
    catalog: Catalog, threshold: float = DEFAULT_THRESHOLD, linkage: str = "leader"
) -> list[DuplicateGroup]:
    """Groups of near-duplicates among the indexed images, largest groups first."""
    check_threshold(threshold)
    ids, vectors = _all_vectors(catalog)
    first, second, _ = similar_pairs(vectors, threshold)
    involved = np.unique(np.concatenate([first, second]))
    rows = _rows(catalog, ids[involved])
    keys = {int(pos): best_first_key(rows[int(ids[pos])]) for pos in involved}
    groups = []
    for positions in link_pairs(first, second, keys, linkage):
        best = vectors[positions[0]]
        members = tuple(
            _member(rows[int(ids[pos])], 1.0 if k == 0 else float(vectors[pos] @ best))
            for k, pos in enumerate(positions)
        )
        groups.append(DuplicateGroup(members))
    groups.sort(key=lambda group: (-len(group.members), group.best.path))
    return groups


def check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise UsageError("--threshold must be a cosine similarity above 0 and at most 1, e.g. 0.95")


def similar_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows (i < j) whose inner product is at least ``threshold``: (i, j, similarity) arrays."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    radius = np.nextafter(np.float32(threshold), np.float32(-np.inf))  # FAISS keeps scores strictly above it
    firsts, seconds, scores = [], [], []
    for start in range(0, len(vectors), QUERY_BLOCK):
        lims, found_scores, found = index.range_search(vectors[start : start + QUERY_BLOCK], float(radius))
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = (found > rows) & (found_scores >= threshold)
        firsts.append(rows[keep])
        seconds.append(found[keep])
        scores.append(found_scores[keep])
    return np.concatenate(firsts), np.concatenate(seconds).astype(np.int64), np.concatenate(scores)


def link_pairs(
    first: np.ndarray, second: np.ndarray, keys: dict[int, tuple], linkage: str = "leader"
) -> list[list[int]]:
    """Groups (of two or more) from similar pairs; each group best first, i.e. in ascending order of ``keys``."""
    if linkage not in LINKAGES:
        raise UsageError(f"linkage must be one of {', '.join(LINKAGES)}, not {linkage!r}")
    neighbours: dict[int, list[int]] = {}
    for a, b in zip(first.tolist(), second.tolist()):
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    order = sorted(neighbours, key=keys.__getitem__)
    rank = {node: position for position, node in enumerate(order)}
    groups = _leader_groups(order, neighbours, rank) if linkage == "leader" else _components(order, neighbours)
    return [sorted(group, key=rank.__getitem__) for group in groups if len(group) > 1]


def _leader_groups(order: list[int], neighbours: dict[int, list[int]], rank: dict[int, int]) -> list[list[int]]:
    taken: set[int] = set()
    groups = []
    for leader in order:
        if leader in taken:
            continue
        group = [leader] + sorted((n for n in neighbours[leader] if n not in taken), key=rank.__getitem__)
        taken.update(group)
        groups.append(group)
    return groups


def _components(order: list[int], neighbours: dict[int, list[int]]) -> list[list[int]]:
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
    """Sort key of the file to keep: most pixels, then most bytes; the path breaks ties the same on every run."""
    return (-(row.width or 0) * (row.height or 0), -row.size, row.path)


def _member(row, score: float) -> DuplicateMember:
    return DuplicateMember(row.id, row.path, row.width, row.height, row.size, round(min(1.0, score), 4))
