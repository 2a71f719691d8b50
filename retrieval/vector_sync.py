"""Keep the FAISS file in step with the catalog: load it when current, rebuild it from stored embeddings when not.

The catalog counts every change to its vectors (``vectors_generation``); the FAISS file is current only when the
generation recorded at its last save matches. A crash between a catalog commit and a FAISS save therefore costs
a rebuild, never a wrong answer.
"""

from __future__ import annotations

from retrieval.catalog import STATUS_OK, Catalog
from retrieval.catalog_vectors import INDEX_TYPE_KEY, attach_catalog, build_from_catalog
from retrieval.errors import IndexCorruptError
from retrieval.faults import fault_point
from retrieval.layout import IndexLayout
from retrieval.vectors import VectorIndex

FAISS_GENERATION_KEY = "faiss_generation"
__all__ = ["FAISS_GENERATION_KEY", "INDEX_TYPE_KEY", "open_vectors", "rebuild_vectors", "save_vectors"]


def open_vectors(catalog: Catalog, layout: IndexLayout, dim: int, persist: bool) -> VectorIndex:
    """The current vector index; ``persist`` saves a rebuilt one (only a writer holding the lock may)."""
    generation = catalog.vectors_generation()
    saved = catalog.get_meta(FAISS_GENERATION_KEY)
    if layout.vectors.is_file() and saved is not None and int(saved) == generation:
        try:
            index = VectorIndex.load(layout.vectors)
        except IndexCorruptError:  # a damaged derived file is rebuilt, never fatal
            index = None
        if index is not None and index.dim == dim and len(index) == catalog.count(STATUS_OK):
            return attach_catalog(index, catalog)
    index = rebuild_vectors(catalog, dim)
    if persist:
        save_vectors(catalog, layout, index, generation)
    return index


def rebuild_vectors(catalog: Catalog, dim: int) -> VectorIndex:
    return build_from_catalog(catalog, dim)  # the recorded type and knobs (retrieval.catalog_vectors)


def save_vectors(catalog: Catalog, layout: IndexLayout, index: VectorIndex, generation: int) -> None:
    """Save, then record which catalog generation the file reflects (a crash in between only forces a rebuild)."""
    if index.needs_rebuild:  # an hnsw index that was asked to remove vectors: rebuilt in place from the catalog
        index.replace_with(build_from_catalog(catalog, index.dim))
    index.save(layout.vectors)
    fault_point("vectors_replaced")
    catalog.set_meta(FAISS_GENERATION_KEY, str(generation))
