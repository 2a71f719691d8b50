"""Vector search on a GPU: the flat type with torch (float16 matrix on the device, exact float32 rescoring of the
shortlist), the IVF types with faiss-gpu when it is installed. Everything else, and any failure, stays on the CPU.

Unmeasured: no GPU was available while this was written; the CPU path is the one benchmarked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from retrieval.vectors import VectorIndex

QUERY_BLOCK = 256  # queries per GPU product: bounds the (n, queries) score matrix


def resolve_search_device(device: str) -> str:
    """``cuda``/``cuda:N`` when asked for (or ``auto``) and available, else ``cpu``."""
    if device == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if device == "auto" else device


def scan_flat(index: VectorIndex, queries: np.ndarray, k: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the flat index's float16 vectors, kept on the GPU between searches."""
    import torch

    matrix, ids = _device_copy(index)
    shortlist = min(len(ids), k + margin)
    all_scores, all_ids = [], []
    for start in range(0, len(queries), QUERY_BLOCK):
        block = torch.from_numpy(queries[start : start + QUERY_BLOCK]).to(matrix.device)
        candidates = torch.topk((matrix @ block.half().T).float(), shortlist, dim=0).indices.T  # (queries, shortlist)
        exact = torch.einsum("qcd,qd->qc", matrix[candidates].float(), block)
        order = torch.argsort(exact, dim=1, descending=True)[:, :k]
        all_scores.append(exact.gather(1, order).cpu().numpy())
        all_ids.append(ids[candidates.gather(1, order).cpu().numpy()])
    return np.concatenate(all_scores), np.concatenate(all_ids)


def faiss_index_on_gpu(index: VectorIndex):
    """A faiss-gpu clone of an IVF index (rebuilt after changes), or None when faiss has no GPU support."""
    import faiss

    if index.index_type not in ("ivf", "ivfpq") or not hasattr(faiss, "StandardGpuResources"):
        return None
    cached = getattr(index, "_gpu_cache", None)
    if cached is not None and cached[0] == index.version:
        return cached[1]
    try:
        if faiss.get_num_gpus() < 1:
            return None
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True  # ivfpq lookup tables in float16: needed for 64-byte codes
        clone = faiss.index_cpu_to_gpu(resources, _device_number(index.device), index.index, options)
        clone.referenced_resources = resources  # keep alive
    except (RuntimeError, AttributeError):
        return None
    index._gpu_cache = (index.version, clone)
    return clone


def _device_copy(index: VectorIndex):
    import torch

    cached = getattr(index, "_gpu_cache", None)
    if cached is not None and cached[0] == index.version:
        return cached[1]
    stored, ids = index._flat_storage()
    copy = (torch.from_numpy(np.asarray(stored)).to(index.device, dtype=torch.float16), np.array(ids))
    index._gpu_cache = (index.version, copy)
    return copy


def _device_number(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0
