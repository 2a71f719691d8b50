"""The four FAISS index types, their knobs, how much memory each needs, and which one `auto` picks.

flat   exact inner product over float32 vectors (``IndexIDMap2`` over ``IndexFlatIP``): the default, and auto's
       choice up to ``EXACT_LIMIT`` vectors.
ivf    inverted lists over full vectors (``IndexIVFFlat``): supports removal; ``nprobe`` calibrated for recall.
ivfpq  inverted lists over product-quantised codes (``IndexIVFPQ``, about 64 bytes a vector instead of 2 KB at
       512-d): candidates are rescored against the catalog's stored embeddings, so recall stays high.
hnsw   a graph over full vectors (``IndexHNSWFlat``): fast, but FAISS cannot remove from it, so any removal
       marks the index for a rebuild from the catalog at its next save. Never picked by auto for that reason.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

from retrieval.errors import UsageError

INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
APPROXIMATE_TYPES = ("ivf", "ivfpq", "hnsw")
CHOICES = ("auto", *INDEX_TYPES)
EXACT_LIMIT = 1_000_000  # auto keeps exact search up to this many vectors
ID_BYTES = 24  # an int64 id plus its share of the reverse map
TARGET_RECALL = 0.95


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
    params = params or IndexParams()
    if index_type == "flat":
        return 4 * dim + ID_BYTES
    if index_type == "ivf":
        return 4 * dim + 8
    if index_type == "ivfpq":
        return (params.pq_m or default_pq_m(dim)) * params.pq_bits / 8 + 8
    if index_type == "hnsw":
        return 4 * dim + params.hnsw_m * 2 * 4 * 1.05 + ID_BYTES
    raise UsageError(f"unknown index type {index_type!r}: use one of {', '.join(CHOICES)}")


def default_memory_budget() -> int:
    """Half of physical memory: the vectors share the machine with the model and everything else."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_index_type(n: int, dim: int, max_memory: int | None = None) -> str:
    """Exact search while it fits (up to ``EXACT_LIMIT`` vectors), then IVF over full vectors, then IVF-PQ."""
    budget = default_memory_budget() if max_memory is None else max_memory
    if n <= EXACT_LIMIT and n * bytes_per_vector("flat", dim) <= budget:
        return "flat"
    if n * bytes_per_vector("ivf", dim) <= budget:
        return "ivf"
    return "ivfpq"


def check_index_type(index_type: str) -> str:
    if index_type not in CHOICES:
        raise UsageError(f"unknown index type {index_type!r}: use one of {', '.join(CHOICES)}")
    return index_type


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
