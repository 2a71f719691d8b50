"""Array helpers for vector search on a GPU: the flat type with torch (float16 matrix on the device, exact float32
rescoring of the shortlist), the IVF types with faiss-gpu when it is installed. ``VectorIndex`` owns the device
copy these make and decides when to remake it; everything here also runs on CPU tensors, which is how CI tests it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.store.topk import top_k

QUERY_BLOCK = 256  # queries per GPU product: bounds the (n, queries) score matrix


def flat_to_device(stored: np.ndarray, ids: np.ndarray, device: str) -> tuple[Any, np.ndarray]:
    """A float16 copy of the stored vectors on ``device``, and the ids (kept on the host)."""
    import torch

    return torch.from_numpy(np.asarray(stored)).to(device, dtype=torch.float16), np.array(ids)


def scan_flat(matrix: Any, ids: np.ndarray, queries: np.ndarray, k: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over a float16 (n, dim) matrix: a float16 product picks ``k + margin`` candidates per query on
    the device, which are rescored in float32 and ranked on the host by the one top-k."""
    import torch

    shortlist = min(len(ids), k + margin)
    all_scores, all_ids = [], []
    for start in range(0, len(queries), QUERY_BLOCK):
        block = torch.from_numpy(queries[start : start + QUERY_BLOCK]).to(matrix.device)
        products = (matrix @ block.to(matrix.dtype).T).float()
        candidates = torch.topk(products, shortlist, dim=0).indices.T  # (queries, shortlist)
        exact = torch.einsum("qcd,qd->qc", matrix[candidates].float(), block.float())
        scores, found = top_k(exact.cpu().numpy(), k, ids[candidates.cpu().numpy()])
        all_scores.append(scores)
        all_ids.append(found)
    return np.concatenate(all_scores), np.concatenate(all_ids)


@dataclass(frozen=True)
class FlatCopy:
    """The flat type's device copy: its float16 matrix on the device, ids on the host, searched by ``scan_flat``."""

    matrix: Any
    ids: np.ndarray
    margin: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return scan_flat(self.matrix, self.ids, queries, k, self.margin)


def faiss_clone(index: Any, device: str) -> Any:
    """A faiss-gpu clone of an IVF-type index, or None when faiss has no GPU support."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return None
    try:
        if faiss.get_num_gpus() < 1:
            return None
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True  # ivfpq lookup tables in float16: needed for 64-byte codes
        clone = faiss.index_cpu_to_gpu(resources, _device_number(device), index, options)
        clone.referenced_resources = resources  # keep alive
    except (RuntimeError, AttributeError):
        return None
    return clone


def _device_number(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0
