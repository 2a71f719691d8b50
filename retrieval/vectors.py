"""The FAISS side: an ``IndexIDMap2`` whose ids are catalog keys, saved atomically, rebuilt from the catalog."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from retrieval.errors import IndexCorruptError
from retrieval.faults import fault_point

INDEX_TYPES = ("flat",)


class VectorIndex:
    """Inner-product search over L2-normalised vectors (= cosine similarity)."""

    def __init__(self, index):
        self.index = index

    @classmethod
    def create(cls, dim: int, index_type: str = "flat") -> VectorIndex:
        import faiss

        if index_type != "flat":
            raise ValueError(f"unknown index type {index_type!r}")
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @classmethod
    def build(cls, dim: int, batches: Iterable[tuple[np.ndarray, np.ndarray]], index_type: str = "flat"):
        index = cls.create(dim, index_type)
        for ids, vectors in batches:
            index.add(ids, vectors)
        return index

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        import faiss

        try:
            return cls(faiss.read_index(str(path)))
        except RuntimeError as error:
            raise IndexCorruptError(f"cannot read vector index {path}: {error}") from error

    def save(self, path: Path) -> None:
        """Write to a temporary file, fsync, then rename over the old one: readers see old or new, never half."""
        import faiss

        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:  # through Python's file: faiss's own writer ignores a full disk
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
                f.flush()
                os.fsync(f.fileno())
            fault_point("vectors_tmp_written")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: Iterable[int]) -> int:
        import faiss

        ids = np.fromiter(ids, dtype=np.int64)
        if not len(ids):
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def ids(self) -> np.ndarray:
        import faiss

        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; ids are -1 where fewer than k vectors qualify."""
        import faiss

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, len(self)))
        if allowed_ids is None:
            return self.index.search(queries, k)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(allowed_ids, dtype=np.int64)))
        return self.index.search(queries, k, params=params)
