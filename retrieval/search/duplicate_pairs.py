"""Every pair of images whose embeddings reach a cosine threshold, found in memory that does not grow with 2 KB a
vector: the candidate side of ``clipsearch duplicates``.

Up to ``EXACT_PAIRS_LIMIT`` vectors every pair is scored exactly (they fit in memory: 100 MB at 50k). Past it all
pairs cost the square of the collection, and a float32 copy of the vectors alone is 20 GB at 10M, so the vectors
are streamed from their source in id order into an IVF index of 8-bit scalar-quantised codes (512 bytes a
512-d vector plus its id: 5.2 GB at 10M); each batch, once added, is range-searched against everything added so
far, at ``MARGIN`` below the threshold (the codes' inner products are within ~0.004 of the exact one), and the
candidate pairs are then scored exactly from the stored vectors, a block of pairs at a time, those under the
threshold dropped. The index is trained on a sample read by index seeks (``VectorSource.sample``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

QUERY_BLOCK = 4096  # query rows per exact range search: bounds FAISS's result buffers
EXACT_PAIRS_LIMIT = 50_000  # up to this many vectors every pair is scored exactly
LISTS_PER_ROOT = 2  # inverted lists: 2 * sqrt(N) (2,000 at 1M, 6,325 at 10M)
PROBES = 16  # lists searched per vector (the pairs' recall against exact: docs/duplicates.md)
MARGIN = 0.01  # candidates are range-searched this far below the threshold, then scored exactly
TRAIN_PER_LIST, TRAIN_MAX = 40, 200_000  # training vectors (2 KB each as float32)
VERIFY_BLOCK = 50_000  # candidate pairs scored exactly at a time (at most 100k vectors fetched)

Batches = Iterator[tuple[np.ndarray, np.ndarray]]  # (ids, unit float32 vectors), ids ascending


@dataclass(frozen=True)
class VectorSource:
    """Where the vectors come from: the catalog's stored embeddings, or an array in tests and benchmarks."""

    count: int
    batches: Callable[[], Batches]  # every vector once, in ascending id order
    sample: Callable[[int], np.ndarray]  # about n vectors spread over the collection
    fetch: Callable[[np.ndarray], np.ndarray]  # ids -> their unit float32 vectors, in that order

    @classmethod
    def of_array(cls, vectors: np.ndarray, batch: int = 20_000) -> VectorSource:
        """Rows of ``vectors``, their positions as ids."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)

        def batches() -> Batches:
            for start in range(0, len(vectors), batch):
                yield np.arange(start, start + len(vectors[start : start + batch])), vectors[start : start + batch]

        def sample(n: int) -> np.ndarray:
            return vectors[np.random.default_rng(0).permutation(len(vectors))[:n]]

        return cls(len(vectors), batches, sample, lambda ids: vectors[np.asarray(ids, dtype=np.int64)])

    @classmethod
    def of_catalog(cls, catalog) -> VectorSource:
        """The ok rows' stored embeddings (the truth; the FAISS file may be approximate), ids as the catalog's."""
        from retrieval.store.catalog import STATUS_OK
        from retrieval.store.sync import fetch_vectors

        return cls(
            catalog.count(STATUS_OK),
            catalog.iter_embeddings,
            lambda n: catalog.sample_embeddings(n)[1],
            lambda ids: fetch_vectors(catalog, ids),
        )


def similar_pairs(
    vectors: np.ndarray, threshold: float, exact_limit: int = EXACT_PAIRS_LIMIT
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows (i < j) of ``vectors`` whose inner product is at least ``threshold``."""
    return pairs_in(VectorSource.of_array(vectors), threshold, exact_limit)


def pairs_in(
    source: VectorSource, threshold: float, exact_limit: int = EXACT_PAIRS_LIMIT
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of ids (a < b) whose vectors' inner product is at least ``threshold``: (a, b, similarity)
    arrays in (a, b) order. Exact up to ``exact_limit`` vectors, bucketed past it (``_bucketed_pairs``)."""
    if source.count < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    if source.count > exact_limit:
        return _bucketed_pairs(source, threshold)
    batches = list(source.batches())
    ids = np.concatenate([batch_ids for batch_ids, _ in batches])
    first, second, score = _range_pairs(np.concatenate([vectors for _, vectors in batches]), threshold)
    return _unique_pairs(ids[first], ids[second], score)


def _range_pairs(vectors: np.ndarray, threshold: float):
    """Exact: the pairs (i, j), i != j, at or above ``threshold``, by range search (each pair both ways)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    radius = np.nextafter(np.float32(threshold), np.float32(-np.inf))  # FAISS keeps scores strictly above it
    firsts, seconds, scores = [], [], []
    for start in range(0, len(vectors), QUERY_BLOCK):
        block = np.arange(start, min(start + QUERY_BLOCK, len(vectors)))
        lims, found_scores, found = index.range_search(vectors[block], float(radius))
        queried = np.repeat(block, np.diff(lims).astype(np.int64))
        keep = (found != queried) & (found_scores >= threshold)
        firsts.append(queried[keep])
        seconds.append(found[keep].astype(np.int64))
        scores.append(found_scores[keep])
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(scores)


def _bucketed_pairs(source: VectorSource, threshold: float):
    """One pass over the source: each batch is added to an IVF index of 8-bit codes, then range-searched against
    every vector added so far (itself included), so each pair is proposed when its later member arrives; the
    proposals are then scored exactly (``_verified``)."""
    index = _trained_index(source)
    firsts, seconds = [], []
    radius = float(threshold - MARGIN)
    for ids, vectors in source.batches():
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index.add_with_ids(vectors, ids.astype(np.int64))
        for start in range(0, len(ids), QUERY_BLOCK):
            lims, _, found = index.range_search(vectors[start : start + QUERY_BLOCK], radius)
            queried = np.repeat(ids[start : start + QUERY_BLOCK], np.diff(lims).astype(np.int64))
            keep = found != queried
            firsts.append(np.minimum(queried[keep], found[keep]))
            seconds.append(np.maximum(queried[keep], found[keep]))
    del index
    first, second = _unique_ids(np.concatenate(firsts), np.concatenate(seconds))
    return _verified(source, first, second, threshold)


def _trained_index(source: VectorSource):
    import faiss

    lists = max(1, min(int(LISTS_PER_ROOT * math.sqrt(source.count)), source.count // TRAIN_PER_LIST))
    sample = np.ascontiguousarray(source.sample(min(TRAIN_MAX, lists * TRAIN_PER_LIST)), dtype=np.float32)
    lists = max(1, min(lists, len(sample) // TRAIN_PER_LIST))  # a sample by seeks may come back smaller
    dim = sample.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.train(sample)
    index.nprobe = min(PROBES, lists)
    return index


def _verified(source: VectorSource, first: np.ndarray, second: np.ndarray, threshold: float):
    """The proposed pairs scored from the exact vectors, a block at a time; those under ``threshold`` dropped."""
    firsts, seconds, scores = [], [], []
    for start in range(0, len(first), VERIFY_BLOCK):
        a, b = first[start : start + VERIFY_BLOCK], second[start : start + VERIFY_BLOCK]
        ids, at = np.unique(np.concatenate([a, b]), return_inverse=True)
        vectors = source.fetch(ids)
        cosine = np.einsum("ij,ij->i", vectors[at[: len(a)]], vectors[at[len(a) :]])
        keep = cosine >= threshold
        firsts.append(a[keep])
        seconds.append(b[keep])
        scores.append(cosine[keep].astype(np.float32))
    if not firsts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(scores)


def _unique_ids(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each (low, high) pair once, in (low, high) order."""
    low, high, _ = _first_of_each(low, high)
    return low, high


def _unique_pairs(first: np.ndarray, second: np.ndarray, score: np.ndarray):
    """Each pair once, as (i < j), in (i, j) order, whichever side found it."""
    low, high, at = _first_of_each(np.minimum(first, second), np.maximum(first, second))
    return low, high, score[at].astype(np.float32)


def _first_of_each(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    low, high = low.astype(np.int64), high.astype(np.int64)
    _, at = np.unique(low * (int(high.max(initial=0)) + 1) + high, return_index=True)
    return low[at], high[at], at
