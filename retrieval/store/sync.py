"""Keep the FAISS file in step with the catalog, the source of its vectors.

The catalog counts every change to its vectors (``MetaKey.VECTORS_GENERATION``); the FAISS file is current only
when the generation recorded at its last save matches. A crash between a catalog commit and a FAISS save therefore
costs a rebuild, never a wrong answer. A rebuild takes the recorded index type and knobs, and reads the stored
embeddings: no encoder needed. An approximate index is also handed the exact vectors it rescores candidates with.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import IndexCorruptError
from retrieval.faults import fault_point
from retrieval.store.catalog_reads import STATUS_OK, CatalogReader, MetaKey, decode_embedding
from retrieval.store.index_types import AUTO, DEFAULT_TYPE, IndexParams
from retrieval.store.layout import IndexLayout
from retrieval.store.tuning import RecallReport
from retrieval.store.vectors import FAST_SCAN_MAX_QUERIES, VectorIndex
from retrieval.unit import unit_rows

if TYPE_CHECKING:
    from retrieval.store.catalog import Catalog

SAMPLE_CHECK = 16  # stored embeddings looked up in a FAISS file on open (a few ms even at 1M vectors)


def open_vectors(
    catalog: CatalogReader, layout: IndexLayout, dim: int, persist: bool, read_only: bool = False
) -> VectorIndex:
    """The current vector index; ``persist`` saves a rebuilt one (only a writer holding the lock may);
    ``read_only``: for searching only, the file is mapped rather than read (``VectorIndex.load``), and its size
    is not checked against a count of the catalog's rows (0.45 s at 10M rows): the generation stamp and the
    sample check vouch for it, and a writer (which counts) rebuilds a file that disagrees."""
    generation = catalog.vectors_generation()
    if faiss_file_current(catalog, layout):
        try:
            index = VectorIndex.load(layout.vectors, read_only=read_only)
        except IndexCorruptError:  # a damaged derived file is rebuilt, never fatal
            index = None
        if index is not None and index.dim == dim and (read_only or len(index) == catalog.count(STATUS_OK)):
            index = attach_catalog(index, catalog)
            if agrees_with_catalog(index, catalog):
                return index
    index = build_from_catalog(catalog, dim)
    if persist:
        save_vectors(catalog, layout, index, generation)
    return index


def agrees_with_catalog(index: VectorIndex, catalog: CatalogReader, sample: int = SAMPLE_CHECK) -> bool:
    """A cheap look inside a file that claims to be current: a sample of stored embeddings, searched for, must
    find their own ids near the top with a cosine of about 1. Flipped bytes in the vectors or the id map fail it,
    so a damaged file is rebuilt instead of answering with the wrong images (an approximate index may miss a
    few of its own vectors: most must be found)."""
    ids, vectors = catalog.sample_embeddings(sample)
    if not len(ids):
        return True
    stored = index.vectors_of(ids)  # kinds that keep exact vectors: looked up by id, no scan
    if stored is not None:
        return bool(np.all(np.sum(unit_rows(np.nan_to_num(stored)) * vectors, axis=1) > 0.98))
    ids, vectors = ids[:FAST_SCAN_MAX_QUERIES], vectors[:FAST_SCAN_MAX_QUERIES]
    scores, found = index.search(vectors, min(10, len(index)))
    hits = [bool(np.any((row_ids == i) & (row_scores > 0.98))) for i, row_ids, row_scores in zip(ids, found, scores)]
    return float(np.mean(hits)) >= 0.75


def faiss_file_current(catalog: CatalogReader, layout: IndexLayout) -> bool:
    """Whether the FAISS file was saved at the catalog's present generation (its contents are not read)."""
    saved = catalog.get_meta(MetaKey.FAISS_GENERATION)
    return layout.vectors.is_file() and saved is not None and int(saved) == catalog.vectors_generation()


def save_vectors(catalog: Catalog, layout: IndexLayout, index: VectorIndex, generation: int) -> None:
    """Save, then record which catalog generation the file reflects (a crash in between only forces a rebuild)."""
    if index.needs_rebuild:  # an hnsw index that was asked to remove vectors: rebuilt in place from the catalog
        index.replace_with(build_from_catalog(catalog, index.dim))
    index.save(layout.vectors)
    fault_point("vectors_replaced")
    catalog.set_meta(MetaKey.FAISS_GENERATION, str(generation))


def build_from_catalog(catalog: CatalogReader, dim: int) -> VectorIndex:
    """The recorded index type with its recorded knobs, from the stored embeddings (no encoder needed)."""
    index_type = recorded_type(catalog)
    params = IndexParams.from_json(catalog.get_meta(MetaKey.PARAMS))
    index = VectorIndex.build(dim, catalog.iter_embeddings(), index_type, params)
    if params.nprobe or params.ef_search:
        index.set_search_effort(index.kind.effort(params))
    return attach_catalog(index, catalog)


def attach_catalog(index: VectorIndex, catalog: CatalogReader) -> VectorIndex:
    """Let the index fetch exact vectors by id (ivfpq rescoring, exact search inside a narrow ``--under``)."""
    if not index.kind.exact:
        recorded = IndexParams.from_json(catalog.get_meta(MetaKey.PARAMS))
        index.params = replace(index.params, rescore=recorded.rescore)
        index.rescore_source = lambda ids: fetch_vectors(catalog, ids)
    return index


def fetch_vectors(catalog: CatalogReader, ids: np.ndarray) -> np.ndarray:
    """Normalised float32 embeddings of ``ids``, in that order; NaN rows for ids no longer indexed (a writer
    may have removed them since the search), which rank last."""
    ids = np.asarray(ids, dtype=np.int64)
    found = catalog.embeddings_by_id(ids.tolist())
    blob = next(iter(found.values()), None)
    dim = len(decode_embedding(blob)) if blob is not None else 0
    vectors = np.full((len(ids), dim), np.nan, dtype=np.float32)
    for row, image_id in enumerate(ids):
        blob = found.get(int(image_id))
        if blob is not None:
            vectors[row] = decode_embedding(blob)
    present = ~np.isnan(vectors[:, 0]) if len(vectors) and vectors.shape[1] else np.zeros(len(ids), dtype=bool)
    vectors[present] = unit_rows(vectors[present])
    return vectors


def recorded_type(catalog: CatalogReader) -> str:
    return catalog.get_meta(MetaKey.INDEX_TYPE) or DEFAULT_TYPE


def requested_type(catalog: CatalogReader) -> str:
    return catalog.get_meta(MetaKey.REQUESTED_TYPE) or AUTO


def recorded_recall(catalog: CatalogReader) -> RecallReport | None:
    text = catalog.get_meta(MetaKey.RECALL)
    return RecallReport(**json.loads(text)) if text else None


def record_build(catalog: Catalog, index: VectorIndex, count: int, report: RecallReport | None) -> None:
    """After a rebuild is saved: its type, knobs, size and measured recall, in one transaction."""
    with catalog.session() as session, session.begin():
        catalog.set_meta(MetaKey.INDEX_TYPE, index.index_type, session)
        catalog.set_meta(MetaKey.PARAMS, index.params.to_json(), session)
        catalog.set_meta(MetaKey.BUILT_N, str(count), session)
        catalog.set_meta(MetaKey.RECALL, json.dumps(report.__dict__) if report else "", session)


def record_request(catalog: Catalog, index_type: str | None, max_memory: int | None) -> None:
    """What later runs keep in force: the type asked for (auto or a type) and the memory budget."""
    if index_type is not None and catalog.get_meta(MetaKey.REQUESTED_TYPE) != index_type:
        catalog.set_meta(MetaKey.REQUESTED_TYPE, index_type)
    if max_memory is not None:
        catalog.set_meta(MetaKey.MAX_MEMORY, str(int(max_memory)))


def recorded_budget(catalog: CatalogReader) -> int | None:
    budget = catalog.get_meta(MetaKey.MAX_MEMORY)
    return int(budget) if budget else None


def built_count(catalog: CatalogReader) -> int:
    return int(catalog.get_meta(MetaKey.BUILT_N) or 0)
