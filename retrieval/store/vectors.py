"""The FAISS side: vectors keyed by catalog ids, in one of the kinds of ``index_types``, saved atomically.

Ids are catalog primary keys. What differs between the types (how each is made, numbers its ids, sets its search
effort, filters, copies itself to a GPU) is its ``IndexKind``'s: this module asks ``self.kind``, never a name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_write
from retrieval.errors import IndexCorruptError
from retrieval.model.device import CPU, Device
from retrieval.store.index_types import (
    DEFAULT_TYPE,
    RESCORE_MARGIN,
    IndexKind,
    IndexParams,
    default_params,
    detect,
    kind,
)
from retrieval.store.topk import empty_top_k, merge_top_k, pad_top_k, top_k

FAST_SCAN_MAX_QUERIES = 4  # up to this many queries, flat search is FAISS's own scan (no torch)
SCAN_BLOCK = 8192  # rows per float32 block when many queries are searched at once (fits in cache)
TRAIN_SAMPLE = 200_000  # vectors used to train the IVF types
EXACT_FILTER_LIMIT = 2_000  # a filter letting fewer through is scored exactly from the catalog's vectors

RescoreSource = Callable[[np.ndarray], np.ndarray]  # ids -> their exact normalised float32 vectors, same order


class VectorIndex:
    """Inner-product search over L2-normalised vectors (= cosine similarity)."""

    def __init__(self, index, index_type: str | None = None, params: IndexParams | None = None):
        self.index = index
        self.kind: IndexKind = kind(index_type) if index_type else detect(index)
        self.params = params or self.kind.params_of(index)
        self.needs_rebuild = False  # set when a type that cannot remove was asked to (hnsw)
        self.read_only = False  # a mapped view of a file (load(read_only=True)): FAISS aborts on writes to it
        self.rescore_source: RescoreSource | None = None
        self.device: Device = CPU  # where searches run (use_device)
        self.version = 0  # bumped by every change: the device copy is refreshed from it
        self._device_copy: tuple[int, Any] | None = None  # (version, copy on self.device) for GPU searches

    @property
    def index_type(self) -> str:
        """The kind's name, as the catalog records it."""
        return self.kind.name

    @classmethod
    def create(cls, dim: int, index_type: str = DEFAULT_TYPE, params: IndexParams | None = None) -> VectorIndex:
        """An empty index; the IVF types train themselves on the first vectors added."""
        params = params or IndexParams()  # zeros stay until training sees how many vectors there are
        return cls(kind(index_type).make(dim, default_params(index_type, 0, dim, params)), index_type, params)

    @classmethod
    def build(
        cls,
        dim: int,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
        index_type: str = DEFAULT_TYPE,
        params: IndexParams | None = None,
    ) -> VectorIndex:
        """Build from (ids, vectors) batches; the IVF types train on up to ``TRAIN_SAMPLE`` of the first vectors."""
        index = cls.create(dim, index_type, params)
        batches = iter(batches)
        if index.trained:
            for ids, vectors in batches:
                index.add(ids, vectors)
            return index
        held_ids, held_vectors, held = [], [], 0
        for ids, vectors in batches:
            held_ids.append(ids)
            held_vectors.append(vectors)
            held += len(ids)
            if held >= TRAIN_SAMPLE:
                break
        if held:
            index.add(np.concatenate(held_ids), np.concatenate(held_vectors))
        for ids, vectors in batches:
            index.add(ids, vectors)
        return index

    @classmethod
    def load(cls, path: Path, read_only: bool = False) -> VectorIndex:
        """``read_only``: a search-only view that maps the file's flat codes instead of reading them (a 100k flat
        index opens in ~15 ms of CPU instead of ~120); adding to or removing from it is refused."""
        import faiss

        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) if read_only else 0
        try:
            index = cls(faiss.read_index(str(path), flags))
        except RuntimeError as error:
            raise IndexCorruptError(f"cannot read vector index {path}: {error}") from error
        index.read_only = read_only
        return index

    def save(self, path: Path) -> None:
        """Readers see the old file or the new one, never half (``retrieval.atomic``)."""
        import faiss

        # through Python's file: faiss's own writer ignores a full disk
        atomic_write(path, lambda f: faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write)),
                     fault="vectors_tmp_written")  # fmt: skip

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def replace_with(self, other: VectorIndex) -> None:
        """Take over another index's contents (an in-place rebuild that holders of this object see)."""
        self.index, self.kind, self.params = other.index, other.kind, other.params
        self.rescore_source, self.needs_rebuild = other.rescore_source, other.needs_rebuild
        self.read_only = other.read_only
        self.version += 1

    def use_device(self, device: Device) -> VectorIndex:
        """Search on the GPU when ``device`` is CUDA: flat through torch, the IVF types through faiss-gpu when
        installed (``retrieval.store.gpu``). The index itself stays in host memory."""
        self.device = device
        return self

    def _device_copy_now(self) -> Any:
        """The kind's copy of this index on ``self.device`` (None: searched on the host), made again only after a
        change."""
        if self._device_copy is None or self._device_copy[0] != self.version:
            self._device_copy = (self.version, self.kind.device_copy(self.index, self.device.torch_name))
        return self._device_copy[1]

    @property
    def trained(self) -> bool:
        return bool(self.index.is_trained)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._check_writable()
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.trained:
            self._train(vectors)
        self.index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        self.version += 1

    def _check_writable(self) -> None:
        if self.read_only:
            raise RuntimeError("this vector index is a read-only view of its file: open it with read_only=False")

    def _train(self, vectors: np.ndarray) -> None:
        """Fit the IVF lists (and PQ codebooks) to these vectors, shrinking both to what they can support."""
        wanted, count = self.params, len(vectors)
        derived = default_params(self.index_type, count, self.dim)
        nlist = max(1, min(wanted.nlist or derived.nlist, count // 39))
        params = replace(
            derived,
            nlist=nlist,
            nprobe=min(wanted.nprobe or max(1, nlist // 16), nlist),
            pq_m=wanted.pq_m or derived.pq_m,
            pq_bits=max(1, min(wanted.pq_bits, int(np.log2(max(2, count // 39))))),  # ~39 points per centroid
            rescore=wanted.rescore,
        )
        self.params = params
        self.index = self.kind.make(self.dim, params, sample=count)
        self.index.train(vectors)

    def remove(self, ids: Iterable[int]) -> int:
        import faiss

        self._check_writable()
        ids = np.fromiter(ids, dtype=np.int64)
        if not len(ids):
            return 0
        self.version += 1
        if not self.kind.removes:  # hnsw: FAISS cannot delete graph nodes, rebuilt from the catalog when saved
            self.needs_rebuild = True
            return len(ids)
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def ids(self) -> np.ndarray:
        return self.kind.ids(self.index)

    def stored_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) as stored, in ``ids()`` order: for the kinds that keep exact vectors (flat, hnsw)."""
        vectors = self.kind.stored_vectors(self.index)
        return self.ids(), vectors

    def vectors_of(self, ids: np.ndarray) -> np.ndarray | None:
        """The stored vectors of ``ids`` looked up one by one (no scan), NaN rows for ids the index does not hold;
        None for kinds that do not keep exact vectors."""
        if not self.kind.keeps_vectors:
            return None
        found = np.full((len(ids), self.dim), np.nan, dtype=np.float32)
        for row, image_id in enumerate(ids):
            with contextlib.suppress(RuntimeError):  # not in the id map: stays NaN
                found[row] = self.index.reconstruct(int(image_id))
        return found

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; ids are -1 where fewer than k vectors qualify."""
        if self.needs_rebuild:
            raise RuntimeError(f"this {self.index_type} index had removals; rebuild it from the catalog first")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, len(self)))
        if allowed_ids is not None:
            return self._search_allowed(queries, k, np.asarray(allowed_ids, dtype=np.int64))
        if self.kind.exact and len(self) and len(queries):
            if self.device.is_cuda:
                return self._device_copy_now().search(queries, k)
            return self._scan_flat(queries, k)
        searcher = (self._device_copy_now() if self.device.is_cuda else None) or self.index
        if self._rescoring():
            scores, ids = searcher.search(queries, k * self.params.rescore)
            return _rescore(queries, ids, k, self.rescore_source)
        return searcher.search(queries, k)

    def _rescoring(self) -> bool:
        """Whether candidates are rescored exactly (ivfpq with the catalog at hand, ``rescore`` > 1)."""
        return self.kind.rescores and self.rescore_source is not None and self.params.rescore > 1

    def _scan_flat(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over FAISS's own float16 storage. Up to ``FAST_SCAN_MAX_QUERIES`` queries: FAISS scores
        every stored vector exactly in float32 (one core per query; as fast here as torch's float16 gemv on two,
        and it keeps a text query free of importing torch, which costs over a second), then the best
        ``k + RESCORE_MARGIN`` are ranked by the one top-k. Many queries: float32 matrix products over blocks."""
        if len(queries) <= FAST_SCAN_MAX_QUERIES:
            shortlist = min(len(self), k + RESCORE_MARGIN)
            _, candidates = self.index.search(queries, shortlist)
            exact = [self.index.reconstruct_batch(row) @ query for row, query in zip(candidates, queries)]
            return top_k(np.stack(exact).astype(np.float32), k, candidates)
        stored, ids = self.flat_storage()
        return _blocked_top_k(stored, ids, queries, k)

    def flat_storage(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) view of the stored vectors (float16, or float32 in indexes written before float16) and ids."""
        return self.kind.storage(self.index)

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search within ``allowed`` ids. A few (``EXACT_FILTER_LIMIT``): exactly over their stored vectors when
        the catalog is at hand, the cost of rescoring one query's candidates. More: a FAISS selector, the search
        effort raised by the share of the collection let through so that a query still visits about as many
        allowed vectors as an unfiltered one visits vectors, then the usual rescoring. Fetching every allowed
        vector instead costs ~15 us a row read at random from the catalog: 240 ms for one month of 1.88M images
        (docs/scale.md)."""
        import faiss

        if not self.kind.exact and self.rescore_source is not None and len(allowed) <= EXACT_FILTER_LIMIT:
            scores = self.rescore_source(allowed) @ queries.T  # NaN rows (removed since) rank last
            return pad_top_k(top_k(scores.T, k, allowed), k)
        share = len(allowed) / max(len(self), 1)
        rescore = self._rescoring()
        depth = min(k * self.params.rescore, len(self)) if rescore else k
        params = self.kind.filtered_search(self.index, faiss.IDSelectorBatch(allowed), depth, share)
        scores, ids = self.index.search(queries, depth, params=params)
        return _rescore(queries, ids, k, self.rescore_source) if rescore else (scores, ids)

    def memory_bytes(self) -> int:
        """Size of the index as FAISS writes it: close to what it occupies in memory."""
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)

    def set_search_effort(self, effort: int) -> None:
        """nprobe (IVF types) or efSearch (hnsw): how much of the index a query visits."""
        self.params = self.kind.with_effort(self.index, self.params, effort)

    def search_effort(self) -> int:
        return self.kind.effort(self.params)


def _blocked_top_k(stored: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    """Exact top-k of many queries: float32 products over cache-sized blocks of rows, merged as they go."""
    import torch

    matrix, query_block = torch.from_numpy(stored), torch.from_numpy(queries)
    best = empty_top_k(len(queries))
    for start in range(0, len(stored), SCAN_BLOCK):
        scores = (query_block @ matrix[start : start + SCAN_BLOCK].float().T).numpy()
        best = merge_top_k(best, scores, ids[start : start + SCAN_BLOCK], k)
    return best


def _rescore(queries: np.ndarray, candidates: np.ndarray, k: int, source: RescoreSource):
    """Exact scores for each query's candidates (from the catalog), best ``k`` kept; -1 pads short results."""
    out = (np.full((len(queries), k), -np.inf, dtype=np.float32), np.full((len(queries), k), -1, dtype=np.int64))
    for row, (query, found) in enumerate(zip(queries, candidates)):
        found = found[found >= 0]
        if not len(found):
            continue
        scores, kept = top_k((source(found) @ query)[None, :], k, found)
        finite = np.isfinite(scores[0])
        out[0][row, : finite.sum()] = scores[0][finite]
        out[1][row, : finite.sum()] = kept[0][finite]
    return out
