"""The catalog as the source of vectors: build the recorded index type from stored embeddings, and hand an
approximate index the exact vectors it rescores its candidates with.

What the catalog records about its FAISS index (all in ``meta``): the type in use, the type asked for (``auto`` or
a type), the memory budget ``auto`` plans with, the knobs (nlist, nprobe, efSearch, rescore), how many vectors it
was built from, and the recall@10 measured against exact search when it was built.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sqlalchemy import select

from retrieval.catalog import STATUS_OK, Catalog, ImageRow, decode_embedding, normalise
from retrieval.index_types import IndexParams
from retrieval.vectors import VectorIndex

INDEX_TYPE_KEY = "index_type"  # the type the FAISS file is built as
REQUESTED_TYPE_KEY = "index_type_requested"  # auto or a type: what `clipsearch index` keeps in force
MAX_MEMORY_KEY = "index_max_memory"  # bytes; the budget auto plans with
PARAMS_KEY = "index_params"  # IndexParams as JSON
BUILT_N_KEY = "index_built_n"  # vectors at the last (re)build: the IVF types are retrained once it doubles
RECALL_KEY = "index_recall"  # JSON: recall@10 against exact search, queries, kind, effort, when

FETCH_CHUNK = 500  # ids per SQL IN (...)


def build_from_catalog(catalog: Catalog, dim: int) -> VectorIndex:
    """The recorded index type with its recorded knobs, from the stored embeddings (no encoder needed)."""
    index_type = catalog.get_meta(INDEX_TYPE_KEY) or "flat"
    params = IndexParams.from_json(catalog.get_meta(PARAMS_KEY))
    index = VectorIndex.build(dim, catalog.iter_embeddings(), index_type, params)
    if params.nprobe or params.ef_search:
        index.set_search_effort(params.nprobe if index_type in ("ivf", "ivfpq") else params.ef_search)
    return attach_catalog(index, catalog)


def attach_catalog(index: VectorIndex, catalog: Catalog) -> VectorIndex:
    """Let the index fetch exact vectors by id (ivfpq rescoring, exact search inside a narrow ``--under``)."""
    if index.index_type != "flat":
        recorded = IndexParams.from_json(catalog.get_meta(PARAMS_KEY))
        index.params = replace(index.params, rescore=recorded.rescore)
        index.rescore_source = lambda ids: fetch_vectors(catalog, ids)
    return index


def fetch_vectors(catalog: Catalog, ids: np.ndarray) -> np.ndarray:
    """Normalised float32 embeddings of ``ids``, in that order; NaN rows for ids no longer indexed (a writer
    may have removed them since the search), which rank last."""
    ids = np.asarray(ids, dtype=np.int64)
    found: dict[int, bytes] = {}
    with catalog.session() as session:
        for start in range(0, len(ids), FETCH_CHUNK):
            chunk = [int(i) for i in ids[start : start + FETCH_CHUNK]]
            rows = session.execute(
                select(ImageRow.id, ImageRow.embedding).where(ImageRow.id.in_(chunk), ImageRow.status == STATUS_OK)
            )
            found.update({row_id: blob for row_id, blob in rows})
    vectors = np.full((len(ids), catalog_dim(found)), np.nan, dtype=np.float32)
    for row, image_id in enumerate(ids):
        blob = found.get(int(image_id))
        if blob is not None:
            vectors[row] = decode_embedding(blob)
    present = ~np.isnan(vectors[:, 0]) if len(vectors) and vectors.shape[1] else np.zeros(len(ids), dtype=bool)
    vectors[present] = normalise(vectors[present])
    return vectors


def catalog_dim(found: dict[int, bytes]) -> int:
    blob = next(iter(found.values()), None)
    return len(decode_embedding(blob)) if blob is not None else 0
