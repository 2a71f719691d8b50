"""Keep the FAISS file in step with the catalog: load it when current, rebuild it from stored embeddings when not.

The catalog counts every change to its vectors (``vectors_generation``); the FAISS file is current only when the
generation recorded at its last save matches. A crash between a catalog commit and a FAISS save therefore costs
a rebuild, never a wrong answer.
"""

from __future__ import annotations

from retrieval.catalog import STATUS_OK, Catalog
from retrieval.errors import IndexCorruptError
from retrieval.faults import fault_point
from retrieval.layout import IndexLayout
from retrieval.vectors import VectorIndex

FAISS_GENERATION_KEY = "faiss_generation"
INDEX_TYPE_KEY = "index_type"


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
            return index
    index = rebuild_vectors(catalog, dim)
    if persist:
        save_vectors(catalog, layout, index, generation)
    return index


def rebuild_vectors(catalog: Catalog, dim: int) -> VectorIndex:
    index_type = catalog.get_meta(INDEX_TYPE_KEY) or "flat"
    return VectorIndex.build(dim, catalog.iter_embeddings(), index_type)


def save_vectors(catalog: Catalog, layout: IndexLayout, index: VectorIndex, generation: int) -> None:
    """Save, then record which catalog generation the file reflects (a crash in between only forces a rebuild)."""
    index.save(layout.vectors)
    fault_point("vectors_replaced")
    catalog.set_meta(FAISS_GENERATION_KEY, str(generation))
