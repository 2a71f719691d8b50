"""The FAISS index types as objects, one registry entry each; their knobs, memory, and which one `auto` picks.

flat   exact inner product over float16 vectors (``IndexIDMap2`` over ``IndexScalarQuantizer``): the default, and
       auto's choice up to ``EXACT_LIMIT`` vectors.
ivf    inverted lists over full vectors (``IndexIVFFlat``): supports removal; ``nprobe`` calibrated for recall.
ivfpq  inverted lists over product-quantised codes (``IndexIVFPQ``, about 64 bytes a vector instead of 2 KB at
       512-d): candidates are rescored against the catalog's stored embeddings, so recall stays high.
hnsw   a graph over full vectors (``IndexHNSWFlat``): fast, but FAISS cannot remove from it, so any removal
       marks the index for a rebuild from the catalog at its next save. Never picked by auto for that reason.

Each type is one ``IndexKind``: how it makes its FAISS index, what a vector costs, what it can do (exact search,
exact vectors kept, removal, rescoring), its search-effort knob and the ladder tuning climbs, its GPU copy. The
rest of the code asks the kind (``kind(name)``, ``VectorIndex.kind``) and never compares type names, so a new type
is a new class here and its entry in ``KINDS`` (``tests/test_index_types.py`` keeps it that way).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from retrieval.errors import IndexCorruptError, UsageError

if TYPE_CHECKING:
    import numpy as np

EXACT_LIMIT = 1_000_000  # auto keeps exact search up to this many vectors at most
LATENCY_TARGET_S = 0.020  # auto keeps exact search while a lone query's scan is measured to take less
ALWAYS_EXACT = 50_000  # below this many vectors a scan takes a few ms on any machine: not measured
LEAVE_EXACT = 1.5  # an index that is exact now stays so until its scan is this much over the target (no flapping)
SCAN_SHARE = 0.5  # of the target, for the bare scan: a lone query's whole path took 1.9x it at 1M (docs/scale.md)
SCAN_SAMPLE = 131_072  # vectors in the timed scan: 128 MB at 512-d float16, past the CPU caches like a real one
ID_BYTES = 24  # an int64 id plus its share of the reverse map
TARGET_RECALL = 0.95
RESCORE_MARGIN = 32  # extra candidates ranked exactly: covers float16 rounding (GPU) and ties at the cut
OPQ_ITERATIONS = 20  # FAISS's default 50 costs minutes at 512-d for little recall
OPQ_MIN_TRAIN = 10_000  # OPQ trains a 256-centroid PQ of its own: below this, plain IVF-PQ
HNSW_EFFORTS = (16, 32, 64, 128, 256, 512, 1024)
HNSW_MAX_M = 128  # the densest graph tried before an hnsw index that misses the target recall stays exact


@dataclass(frozen=True)
class IndexParams:
    """Build and search knobs of the approximate types; zeros mean "derive from the collection size"."""

    nlist: int = 0  # ivf, ivfpq: inverted lists
    nprobe: int = 0  # ivf, ivfpq: lists visited per query (calibrated after building)
    pq_m: int = 0  # ivfpq: sub-quantisers = bytes per vector
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 64  # hnsw: candidates kept while searching (calibrated after building)
    rescore: int = 10  # ivfpq: k * rescore candidates are rescored exactly (when the catalog is at hand)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> IndexParams:
        if not text:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{key: int(value) for key, value in json.loads(text).items() if key in known})


# ---------------------------------------------------------------------------------------------- the kinds


class IndexKind:
    """One index type. Subclasses set the facts and override what differs; FAISS is imported only when used."""

    name: str = ""
    note: str = ""  # a caveat for --index-type's help
    exact: bool = False  # every vector scored exactly: nothing to tune or measure
    keeps_vectors: bool = False  # the stored vectors read back in ``ids()`` order (check compares them)
    removes: bool = True  # FAISS deletes ids; otherwise a removal marks the index for a rebuild
    rescores: bool = False  # candidates are re-ranked with the catalog's exact vectors
    trains: bool = False  # fitted to a sample: retrained once the collection has doubled since

    def __repr__(self) -> str:
        return f"IndexKind({self.name})"

    def make(self, dim: int, params: IndexParams, sample: int | None = None) -> Any:
        """An empty FAISS index; ``sample``: how many vectors it is about to train on (None: not known yet)."""
        raise NotImplementedError

    def bytes_per_vector(self, dim: int, params: IndexParams) -> float:
        """Resident memory per vector, ids included (the estimate `auto` budgets with)."""
        raise NotImplementedError

    def faiss_types(self) -> tuple[type, ...]:
        """The FAISS classes (inside the id map, if any) that a loaded file of this kind is made of."""
        raise NotImplementedError

    def params_of(self, index: Any) -> IndexParams:
        """The knobs a loaded FAISS file carries (nprobe and efSearch are saved with it)."""
        return IndexParams()

    def ids(self, index: Any) -> np.ndarray:
        """Every id the index holds."""
        raise NotImplementedError

    def stored_vectors(self, index: Any) -> np.ndarray:
        """The vectors as stored, in ``ids()`` order (kinds that keep them)."""
        raise ValueError(f"a {self.name} index does not keep its vectors in order")

    def effort(self, params: IndexParams) -> int:
        """How much of the index a query visits (0: all of it)."""
        return 0

    def with_effort(self, index: Any, params: IndexParams, effort: int) -> IndexParams:
        """Set the search effort on ``index``; the knobs with it recorded."""
        return params

    def efforts(self, index: Any) -> list[int]:
        """The efforts tuning tries, cheapest first."""
        return []

    def strengthened(self, params: IndexParams) -> IndexParams | None:
        """Build knobs for a denser index, when the search effort alone did not reach the target recall; None
        when this kind has no stronger build (its effort ladder already reaches exact search)."""
        return None

    def filtered_search(self, index: Any, selector: Any, k: int, share: float = 1.0) -> Any:
        """FAISS search parameters that keep results to ``selector``'s ids, which are ``share`` of the index."""
        import faiss

        return faiss.SearchParameters(sel=selector)

    def device_copy(self, index: Any, device: str) -> Any:
        """A copy that searches on ``device`` (anything with ``search(queries, k)``), or None: search on the host."""
        return None


class IdMappedKind(IndexKind):
    """Storage inside an ``IndexIDMap2``: catalog ids in its map, the vectors read back in that order."""

    keeps_vectors = True

    def ids(self, index: Any) -> np.ndarray:
        import faiss
        import numpy as np

        return faiss.vector_to_array(index.id_map).astype(np.int64)

    def stored_vectors(self, index: Any) -> np.ndarray:
        import faiss
        import numpy as np

        inner = faiss.downcast_index(index.index)
        n = int(index.ntotal)
        return inner.reconstruct_n(0, n) if n else np.zeros((0, int(index.d)), np.float32)


class Flat(IdMappedKind):
    name = "flat"
    exact = True

    def make(self, dim: int, params: IndexParams, sample: int | None = None) -> Any:
        import faiss

        # float16, as the catalog stores them: half the memory and scan time of float32
        storage = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(storage)

    def bytes_per_vector(self, dim: int, params: IndexParams) -> float:
        return 4 * dim + ID_BYTES

    def faiss_types(self) -> tuple[type, ...]:
        import faiss

        return faiss.IndexFlat, faiss.IndexScalarQuantizer

    def storage(self, index: Any) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) view of the stored vectors (float16, or float32 in indexes written before float16) and ids."""
        import faiss
        import numpy as np

        n, dim = int(index.ntotal), int(index.d)
        inner = faiss.downcast_index(index.index)
        ids = faiss.rev_swig_ptr(index.id_map.data(), n)
        if isinstance(inner, faiss.IndexScalarQuantizer):
            codes = faiss.rev_swig_ptr(inner.codes.data(), n * inner.code_size)
            return codes.view(np.float16).reshape(n, dim), ids
        return faiss.rev_swig_ptr(inner.get_xb(), n * dim).reshape(n, dim), ids

    def device_copy(self, index: Any, device: str) -> Any:
        from retrieval.store import gpu

        return gpu.FlatCopy(*gpu.flat_to_device(*self.storage(index), device), margin=RESCORE_MARGIN)


class Hnsw(IdMappedKind):
    name = "hnsw"
    note = "fast, but any removal rebuilds it"
    removes = False  # FAISS cannot delete graph nodes: rebuilt from the catalog when saved

    def make(self, dim: int, params: IndexParams, sample: int | None = None) -> Any:
        import faiss

        graph = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = params.ef_construction
        graph.hnsw.efSearch = params.ef_search
        return faiss.IndexIDMap2(graph)

    def bytes_per_vector(self, dim: int, params: IndexParams) -> float:
        return 4 * dim + params.hnsw_m * 2 * 4 * 1.05 + ID_BYTES

    def faiss_types(self) -> tuple[type, ...]:
        import faiss

        return (faiss.IndexHNSW,)

    def params_of(self, index: Any) -> IndexParams:
        hnsw = _graph(index)
        return IndexParams(ef_search=int(hnsw.efSearch), ef_construction=int(hnsw.efConstruction))

    def effort(self, params: IndexParams) -> int:
        return params.ef_search

    def with_effort(self, index: Any, params: IndexParams, effort: int) -> IndexParams:
        _graph(index).efSearch = effort
        return replace(params, ef_search=effort)

    def efforts(self, index: Any) -> list[int]:
        return list(HNSW_EFFORTS)

    def strengthened(self, params: IndexParams) -> IndexParams | None:
        """A graph with twice the links per node and a wider build search: text queries sit apart from the image
        vectors (the modality gap) and a sparse graph misses their neighbours whatever efSearch is."""
        if params.hnsw_m >= HNSW_MAX_M:
            return None
        return replace(params, hnsw_m=params.hnsw_m * 2, ef_construction=params.ef_construction * 2)

    def filtered_search(self, index: Any, selector: Any, k: int, share: float = 1.0) -> Any:
        import faiss

        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(_graph(index).efSearch, k))


class Ivf(IndexKind):
    """Inverted lists over full vectors; the IVF types number their own ids (an ``IndexIDMap2`` around an IVF
    index would mis-number them after a removal)."""

    name = "ivf"
    trains = True

    def make(self, dim: int, params: IndexParams, sample: int | None = None) -> Any:
        import faiss

        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
        return self._configured(index, params)

    def _configured(self, index: Any, params: IndexParams) -> Any:
        ivf = ivf_part(index)
        ivf.nprobe = params.nprobe
        ivf.cp.spherical = True  # unit vectors: centroids on the sphere suit inner product
        ivf.cp.min_points_per_centroid = 1  # small collections get fewer lists, not a warning per training run
        return index

    def bytes_per_vector(self, dim: int, params: IndexParams) -> float:
        return 4 * dim + 8

    def faiss_types(self) -> tuple[type, ...]:
        import faiss

        return (faiss.IndexIVFFlat,)

    def params_of(self, index: Any) -> IndexParams:
        ivf = ivf_part(index)
        return IndexParams(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))

    def ids(self, index: Any) -> np.ndarray:
        import faiss
        import numpy as np

        lists = ivf_part(index).invlists
        found = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)) for i in range(lists.nlist)]
        return np.concatenate([np.array(part, dtype=np.int64) for part in found if part is not None] or [[]])

    def effort(self, params: IndexParams) -> int:
        return params.nprobe

    def with_effort(self, index: Any, params: IndexParams, effort: int) -> IndexParams:
        ivf = ivf_part(index)
        effort = max(1, min(effort, ivf.nlist))
        ivf.nprobe = effort
        return replace(params, nprobe=effort)

    def efforts(self, index: Any) -> list[int]:
        """Powers of two up to every list."""
        nlist = int(ivf_part(index).nlist)
        ladder, step = [], 1
        while step < nlist:
            ladder.append(step)
            step *= 2
        return [*ladder, nlist]

    def filtered_search(self, index: Any, selector: Any, k: int, share: float = 1.0) -> Any:
        """nprobe divided by ``share``: lists hold the allowed ids in that share, so a query visits about as many
        allowed vectors as an unfiltered one visits vectors (a one-month filter over ten years: every list)."""
        import faiss

        ivf = ivf_part(index)
        nprobe = min(int(ivf.nlist), math.ceil(ivf.nprobe / max(share, 1e-9)))
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)

    def device_copy(self, index: Any, device: str) -> Any:
        from retrieval.store import gpu

        return gpu.faiss_clone(index, device)


class IvfPq(Ivf):
    """IVF over product-quantised codes, behind an OPQ rotation once the training sample is large enough."""

    name = "ivfpq"
    rescores = True

    def make(self, dim: int, params: IndexParams, sample: int | None = None) -> Any:
        import faiss

        # OPQ rotates the vectors so that PQ's sub-vectors carry even shares of the variance: on text queries it
        # lifted recall@10 from 0.79 to 0.96 at 100 rescored candidates (100k CLIP-like vectors, 64 bytes each)
        rotate = sample is None or sample >= OPQ_MIN_TRAIN
        factory = f"{f'OPQ{params.pq_m},' if rotate else ''}IVF{params.nlist},PQ{params.pq_m}x{params.pq_bits}np"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if rotate:
            faiss.downcast_VectorTransform(index.chain.at(0)).niter = OPQ_ITERATIONS
        ivf_part(index).pq.cp.min_points_per_centroid = 1
        return self._configured(index, params)

    def bytes_per_vector(self, dim: int, params: IndexParams) -> float:
        return (params.pq_m or default_pq_m(dim)) * params.pq_bits / 8 + 8

    def faiss_types(self) -> tuple[type, ...]:
        import faiss

        return faiss.IndexIVFPQ, faiss.IndexPreTransform

    def params_of(self, index: Any) -> IndexParams:
        ivf = ivf_part(index)
        return replace(super().params_of(index), pq_m=int(ivf.pq.M), pq_bits=int(ivf.pq.nbits))

    def filtered_search(self, index: Any, selector: Any, k: int, share: float = 1.0) -> Any:
        """Behind the OPQ rotation when there is one (an index trained on few vectors has none)."""
        import faiss

        params = super().filtered_search(index, selector, k, share)
        if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
            return faiss.SearchParametersPreTransform(index_params=params)
        return params


FLAT, IVF, IVFPQ, HNSW = Flat(), Ivf(), IvfPq(), Hnsw()
KINDS: dict[str, IndexKind] = {kind.name: kind for kind in (FLAT, IVF, IVFPQ, HNSW)}
INDEX_TYPES = tuple(KINDS)
APPROXIMATE_TYPES = tuple(name for name, kind in KINDS.items() if not kind.exact)
AUTO = "auto"
CHOICES = (AUTO, *INDEX_TYPES)
DEFAULT_TYPE = FLAT.name  # what an index records before anything else was asked for


def kind(name: str) -> IndexKind:
    """The kind called ``name``; a user error for any other name."""
    found = KINDS.get(name)
    if found is None:
        raise UsageError(f"unknown index type {name!r}: use one of {', '.join(CHOICES)}")
    return found


def detect(index: Any) -> IndexKind:
    """The kind of a FAISS index read from a file."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    for candidate in KINDS.values():
        if isinstance(inner, candidate.faiss_types()):
            return candidate
    raise IndexCorruptError(f"unsupported vector index type {type(inner).__name__}: run `clipsearch reindex`")


def ivf_part(index: Any) -> Any:
    """The IndexIVF inside an IVF-type index (ivfpq sits behind its OPQ rotation)."""
    import faiss

    return faiss.downcast_index(faiss.extract_index_ivf(index))


def _graph(index: Any) -> Any:
    import faiss

    return faiss.downcast_index(index.index).hnsw


# ---------------------------------------------------------------------------------------------- sizes and auto


def default_params(index_type: str, n: int, dim: int, base: IndexParams | None = None) -> IndexParams:
    """Fill the zero knobs of ``base`` for a collection of ``n`` vectors."""
    params = base or IndexParams()
    nlist = params.nlist or max(1, min(65536, round(math.sqrt(max(n, 1)))))
    nlist = max(1, min(nlist, n // 39)) if n else nlist  # FAISS wants ~39 training points per list
    nprobe = params.nprobe or max(1, min(nlist, nlist // 16 or 1))
    pq_m = params.pq_m or default_pq_m(dim)
    return replace(params, nlist=nlist, nprobe=min(nprobe, nlist), pq_m=pq_m)


def default_pq_m(dim: int) -> int:
    """Sub-vectors of about 8 dimensions, at most 64 of them (64 bytes a vector at 512-d)."""
    return largest_divisor_at_most(dim, max(1, min(64, dim // 8)))


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def bytes_per_vector(index_type: str, dim: int, params: IndexParams | None = None) -> float:
    """Resident memory per vector, ids included (the estimate `auto` budgets with)."""
    return kind(index_type).bytes_per_vector(dim, params or IndexParams())


def default_memory_budget() -> int:
    """Half of physical memory: the vectors share the machine with the model and everything else."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


AUTO_RULE = (  # for --index-type's help
    f"exact flat while a query's scan is measured under {LATENCY_TARGET_S * 1000:.0f} ms here (at most 1M "
    "images), then ivf, then ivfpq to fit --max-memory"
)


def choose_index_type(
    n: int, dim: int, max_memory: int | None = None, current: str | None = None, scan_s: float | None = None
) -> str:
    """Exact search while it fits and a lone query answers within ``LATENCY_TARGET_S`` (its bare scan, timed on
    this machine: ``scan_s`` seconds a vector, measured when None, within ``SCAN_SHARE`` of the target; an index
    that is exact now stays exact up to ``LEAVE_EXACT`` times that), then IVF over full vectors, then IVF-PQ."""
    budget = default_memory_budget() if max_memory is None else max_memory
    params = IndexParams()
    if n <= EXACT_LIMIT and n * FLAT.bytes_per_vector(dim, params) <= budget:
        allowed = LATENCY_TARGET_S * SCAN_SHARE * (LEAVE_EXACT if current == FLAT.name else 1.0)
        if n <= ALWAYS_EXACT or n * (scan_s or exact_scan_seconds(dim)) <= allowed:
            return FLAT.name
    if n * IVF.bytes_per_vector(dim, params) <= budget:
        return IVF.name
    return IVFPQ.name


@functools.cache
def exact_scan_seconds(dim: int) -> float:
    """Seconds of CPU a lone query's exact scan takes per vector on this machine: the flat kind's own search over
    ``SCAN_SAMPLE`` random vectors, best of 5. CPU time, not the clock: on a busy machine the clock counts the
    time spent waiting for a core (10x at load 8 on 2 cores), and the type chosen must not follow the load."""
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    index = FLAT.make(dim, IndexParams())
    index.add_with_ids(rng.standard_normal((SCAN_SAMPLE, dim), dtype=np.float32), np.arange(SCAN_SAMPLE))
    query = rng.standard_normal((1, dim), dtype=np.float32)
    index.search(query, 10)
    best = math.inf
    for _ in range(5):
        started = time.process_time()
        index.search(query, 10)
        best = min(best, time.process_time() - started)
    return best / SCAN_SAMPLE


def check_index_type(index_type: str) -> str:
    if index_type != AUTO:
        kind(index_type)
    return index_type


def choices_help() -> str:
    """What --index-type accepts, from the registry: auto's rule, then each kind with its caveat."""
    names = [f"{k.name} ({k.note})" if k.note else k.name for k in KINDS.values()]
    return f"auto ({AUTO_RULE}), {', '.join(names[:-1])} or {names[-1]}"


def parse_memory(text: str | None) -> int | None:
    """``"8G"``, ``"512M"``, ``"2.5GB"`` or a plain byte count."""
    if text is None or not text.strip():
        return None
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in "KMGT" else value
    try:
        amount = float(number) * scale
    except ValueError:
        raise UsageError(f"cannot read memory size {text!r}: use e.g. 512M or 8G") from None
    if amount <= 0:
        raise UsageError(f"memory size must be positive, not {text!r}")
    return int(amount)
