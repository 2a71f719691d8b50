"""The FAISS side: vectors keyed by catalog ids, in one of the types of ``index_types``, saved atomically.

Ids are catalog primary keys: ``IndexIDMap2`` around flat and HNSW storage, the IVF types' own ids otherwise (an
``IndexIDMap2`` around an IVF index would mis-number its ids after a removal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_write
from retrieval.errors import IndexCorruptError
from retrieval.store import gpu
from retrieval.store.index_types import INDEX_TYPES, IndexParams, default_params
from retrieval.store.topk import empty_top_k, merge_top_k, pad_top_k, top_k

FAST_SCAN_MAX_QUERIES = 4  # up to this many queries, flat search is FAISS's own scan (no torch)
RESCORE_MARGIN = 32  # extra candidates ranked exactly: covers float16 rounding (GPU) and ties at the cut
SCAN_BLOCK = 8192  # rows per float32 block when many queries are searched at once (fits in cache)
TRAIN_SAMPLE = 200_000  # vectors used to train the IVF types
OPQ_ITERATIONS = 20  # FAISS's default 50 costs minutes at 512-d for little recall
OPQ_MIN_TRAIN = 10_000  # OPQ trains a 256-centroid PQ of its own: below this, plain IVF-PQ
EXACT_FILTER_LIMIT = 20_000  # a narrower --under is searched exactly over the catalog's vectors

RescoreSource = Callable[[np.ndarray], np.ndarray]  # ids -> their exact normalised float32 vectors, same order


class VectorIndex:
    """Inner-product search over L2-normalised vectors (= cosine similarity)."""

    def __init__(self, index, index_type: str | None = None, params: IndexParams | None = None):
        self.index = index
        self.index_type = index_type or _detect_type(index)
        self.params = params or _params_of(index, self.index_type)
        self.needs_rebuild = False  # set when a type that cannot remove was asked to (hnsw)
        self.read_only = False  # a mapped view of a file (load(read_only=True)): FAISS aborts on writes to it
        self.rescore_source: RescoreSource | None = None
        self.device = "cpu"  # where searches run (use_device)
        self.version = 0  # bumped by every change: the device copy is refreshed from it
        self._device_copy: tuple[int, Any] | None = None  # (version, copy on self.device) for GPU searches

    @classmethod
    def create(cls, dim: int, index_type: str = "flat", params: IndexParams | None = None) -> VectorIndex:
        """An empty index; the IVF types train themselves on the first vectors added."""
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}")
        params = params or IndexParams()  # zeros stay until training sees how many vectors there are
        return cls(_make_faiss(dim, index_type, default_params(index_type, 0, dim, params)), index_type, params)

    @classmethod
    def build(
        cls,
        dim: int,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
        index_type: str = "flat",
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
        self.index, self.index_type, self.params = other.index, other.index_type, other.params
        self.rescore_source, self.needs_rebuild = other.rescore_source, other.needs_rebuild
        self.read_only = other.read_only
        self.version += 1

    def use_device(self, device: str) -> VectorIndex:
        """Search on the GPU when ``device`` is CUDA (or auto) and one is present: flat through torch, the IVF types
        through faiss-gpu when installed (``retrieval.store.gpu``). The index itself stays in host memory."""
        from retrieval.model.device import resolve_device

        self.device = resolve_device(device)
        return self

    def _on_device(self, make: Callable[[], Any]) -> Any:
        """The copy of this index on ``self.device``, made again only after a change."""
        if self._device_copy is None or self._device_copy[0] != self.version:
            self._device_copy = (self.version, make())
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
        self.index = _make_faiss(self.dim, self.index_type, params, rotate=count >= OPQ_MIN_TRAIN)
        self.index.train(vectors)

    def remove(self, ids: Iterable[int]) -> int:
        import faiss

        self._check_writable()
        ids = np.fromiter(ids, dtype=np.int64)
        if not len(ids):
            return 0
        self.version += 1
        if self.index_type == "hnsw":  # FAISS cannot delete graph nodes: rebuilt from the catalog when saved
            self.needs_rebuild = True
            return len(ids)
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def ids(self) -> np.ndarray:
        import faiss

        if self.index_type in ("ivf", "ivfpq"):
            lists = ivf_part(self.index).invlists
            found = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)) for i in range(lists.nlist)]
            return np.concatenate([np.array(part, dtype=np.int64) for part in found if part is not None] or [[]])
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def stored_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) as stored, in ``ids()`` order: exact for flat and hnsw, None for the IVF types."""
        import faiss

        if self.index_type not in ("flat", "hnsw"):
            raise ValueError(f"a {self.index_type} index does not keep its vectors in order")
        inner = faiss.downcast_index(self.index.index)
        return self.ids(), inner.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.dim), np.float32)

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; ids are -1 where fewer than k vectors qualify."""
        if self.needs_rebuild:
            raise RuntimeError("this hnsw index had removals; rebuild it from the catalog before searching")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, len(self)))
        if allowed_ids is not None:
            return self._search_allowed(queries, k, np.asarray(allowed_ids, dtype=np.int64))
        if self.index_type == "flat" and len(self) and len(queries):
            if self.device != "cpu":
                matrix, ids = self._on_device(lambda: gpu.flat_to_device(*self.flat_storage(), self.device))
                return gpu.scan_flat(matrix, ids, queries, k, RESCORE_MARGIN)
            return self._scan_flat(queries, k)
        searcher = self.index
        if self.device != "cpu":
            searcher = self._on_device(lambda: gpu.faiss_clone(self.index, self.index_type, self.device)) or searcher
        if self.index_type == "ivfpq" and self.rescore_source is not None and self.params.rescore > 1:
            scores, ids = searcher.search(queries, k * self.params.rescore)
            return _rescore(queries, ids, k, self.rescore_source)
        return searcher.search(queries, k)

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
        import faiss

        n, dim = len(self), self.dim
        inner = faiss.downcast_index(self.index.index)
        ids = faiss.rev_swig_ptr(self.index.id_map.data(), n)
        if isinstance(inner, faiss.IndexScalarQuantizer):
            codes = faiss.rev_swig_ptr(inner.codes.data(), n * inner.code_size)
            return codes.view(np.float16).reshape(n, dim), ids
        return faiss.rev_swig_ptr(inner.get_xb(), n * dim).reshape(n, dim), ids

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search within ``allowed`` ids: exactly over their stored vectors when the catalog is at hand (an
        approximate index visits too few allowed vectors under a narrow filter), else with a FAISS selector."""
        import faiss

        if self.index_type != "flat" and self.rescore_source is not None and len(allowed) <= EXACT_FILTER_LIMIT:
            scores = self.rescore_source(allowed) @ queries.T  # NaN rows (removed since) rank last
            return pad_top_k(top_k(scores.T, k, allowed), k)
        selector = faiss.IDSelectorBatch(allowed)
        if self.index_type in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(sel=selector, nprobe=ivf_part(self.index).nprobe)
            if self.index_type == "ivfpq":  # through the OPQ rotation
                params = faiss.SearchParametersPreTransform(index_params=params)
        elif self.index_type == "hnsw":
            hnsw = faiss.downcast_index(self.index.index).hnsw
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(hnsw.efSearch, k))
        else:
            params = faiss.SearchParameters(sel=selector)
        return self.index.search(queries, k, params=params)

    def memory_bytes(self) -> int:
        """Size of the index as FAISS writes it: close to what it occupies in memory."""
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)

    def set_search_effort(self, effort: int) -> None:
        """nprobe (IVF types) or efSearch (hnsw): how much of the index a query visits."""
        import faiss

        if self.index_type in ("ivf", "ivfpq"):
            ivf = ivf_part(self.index)
            effort = max(1, min(effort, ivf.nlist))
            ivf.nprobe = effort
            self.params = replace(self.params, nprobe=effort)
        elif self.index_type == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = effort
            self.params = replace(self.params, ef_search=effort)

    def search_effort(self) -> int:
        return self.params.nprobe if self.index_type in ("ivf", "ivfpq") else self.params.ef_search


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


def _make_faiss(dim: int, index_type: str, params: IndexParams, rotate: bool = True):
    import faiss

    if index_type == "flat":  # float16, as the catalog stores them: half the memory and scan time of float32
        qtype = faiss.ScalarQuantizer.QT_fp16
        return faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dim, qtype, faiss.METRIC_INNER_PRODUCT))
    if index_type == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = params.ef_construction
        graph.hnsw.efSearch = params.ef_search
        return faiss.IndexIDMap2(graph)
    if index_type == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
    else:  # OPQ rotates the vectors so that PQ's sub-vectors carry even shares of the variance: on text queries
        # it lifted recall@10 from 0.79 to 0.96 at 100 rescored candidates (100k CLIP-like vectors, 64 bytes each)
        factory = f"{f'OPQ{params.pq_m},' if rotate else ''}IVF{params.nlist},PQ{params.pq_m}x{params.pq_bits}"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if rotate:
            faiss.downcast_VectorTransform(index.chain.at(0)).niter = OPQ_ITERATIONS
    ivf = ivf_part(index)
    ivf.nprobe = params.nprobe
    ivf.cp.spherical = True  # unit vectors: centroids on the sphere suit inner product
    ivf.cp.min_points_per_centroid = 1  # small collections get fewer lists, not a warning per training run
    if index_type == "ivfpq":
        ivf.pq.cp.min_points_per_centroid = 1
    return index


def ivf_part(index):
    """The IndexIVF inside an IVF-type index (ivfpq sits behind its OPQ rotation)."""
    import faiss

    return faiss.downcast_index(faiss.extract_index_ivf(index))


def _detect_type(index) -> str:
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    for name, kind in (
        ("flat", faiss.IndexFlat),
        ("flat", faiss.IndexScalarQuantizer),
        ("hnsw", faiss.IndexHNSW),
        ("ivfpq", faiss.IndexIVFPQ),
        ("ivfpq", faiss.IndexPreTransform),
        ("ivf", faiss.IndexIVFFlat),
    ):
        if isinstance(inner, kind):
            return name
    raise IndexCorruptError(f"unsupported vector index type {type(inner).__name__}: run `clipsearch reindex`")


def _params_of(index, index_type: str) -> IndexParams:
    """The knobs a loaded FAISS file carries (nprobe and efSearch are saved with it)."""
    import faiss

    if index_type in ("ivf", "ivfpq"):
        ivf = ivf_part(index)
        pq_m = int(ivf.pq.M) if index_type == "ivfpq" else 0
        pq_bits = int(ivf.pq.nbits) if index_type == "ivfpq" else 8
        return IndexParams(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe), pq_m=pq_m, pq_bits=pq_bits)
    if index_type == "hnsw":
        hnsw = faiss.downcast_index(index.index).hnsw
        return IndexParams(ef_search=int(hnsw.efSearch), ef_construction=int(hnsw.efConstruction))
    return IndexParams()
