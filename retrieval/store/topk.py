"""The one exact top-k: best ``k`` per query row, best first, ties kept in column order (as a stable sort keeps
them), so every search path (CPU scan, GPU scan, filtered search, rescoring, recall probes) ranks alike."""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(queries, k) scores and labels of the best ``k`` columns of a (queries, n) matrix; ``labels`` maps columns
    to ids (default: the column numbers), either shared (n,) or per query (queries, n). NaN ranks last."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float32))
    n = scores.shape[1]
    k = max(0, min(k, n))
    keyed = np.where(np.isnan(scores), -np.inf, scores)
    columns = _best_columns(keyed, k)
    if labels is None:
        found = columns
    elif np.ndim(labels) == 2:
        found = np.take_along_axis(np.asarray(labels), columns, axis=1)
    else:
        found = np.asarray(labels)[columns]
    return np.take_along_axis(keyed, columns, axis=1), np.asarray(found, dtype=np.int64)


def merge_top_k(
    best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a new block of (queries, m) scores with their ids into a running top-k (for scans in blocks)."""
    block = top_k(scores, k, ids)
    merged_scores = np.concatenate([best[0], block[0]], axis=1)
    merged_ids = np.concatenate([best[1], block[1]], axis=1)
    return top_k(merged_scores, k, merged_ids)


def empty_top_k(queries: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((queries, 0), np.float32), np.zeros((queries, 0), np.int64)


def pad_top_k(result: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad short results as FAISS does: score -inf, id -1."""
    scores, ids = result
    width = k - scores.shape[1]
    if width <= 0:
        return scores, ids
    return (
        np.pad(scores, ((0, 0), (0, width)), constant_values=-np.inf),
        np.pad(ids, ((0, 0), (0, width)), constant_values=-1),
    )


def _best_columns(keyed: np.ndarray, k: int) -> np.ndarray:
    """Columns of the best ``k`` per row in rank order; of tied scores at the cut, the lowest columns win. A
    partition finds each row's k-th value (no full sort of n columns); only rows with ties at the cut are sorted."""
    rows, n = keyed.shape
    if k == 0:
        return np.zeros((rows, 0), dtype=np.int64)
    kth = np.partition(keyed, n - k, axis=1)[:, n - k : n - k + 1]
    chosen = keyed >= kth
    if np.all(chosen.sum(axis=1) == k):
        columns = np.nonzero(chosen)[1].reshape(rows, k)  # ascending columns within each row
    else:
        columns = np.empty((rows, k), dtype=np.int64)
        for row in range(rows):
            candidates = np.flatnonzero(chosen[row])
            columns[row] = candidates[np.argsort(-keyed[row, candidates], kind="stable")[:k]]
        return columns
    order = np.argsort(-np.take_along_axis(keyed, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)
