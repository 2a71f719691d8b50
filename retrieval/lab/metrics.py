"""Recall@k for text→image and image→text retrieval, the standard way (CLIP, open_clip, clip_benchmark).

Scores are cosine similarities of L2-normalised embeddings, computed in float64 in row chunks of the
captions × images matrix, so the full matrix never sits in memory (``chunk_bytes`` bounds one chunk).

Ties count against the query: a caption's image is at rank r when r other images score *at least* as high,
and an image's best own caption is at rank r when r captions of other images score at least as high. So the
result does not depend on the order of images and captions nor on the chunk size (no tie is broken by
position), and a model that maps everything to the same vector is never flattered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.unit import unit_rows

DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK_BYTES = 128 << 20


@dataclass(frozen=True)
class RetrievalMetrics:
    """Recall@k as fractions in [0, 1]: ``t2i`` text→image (image retrieval), ``i2t`` image→text."""

    t2i: dict[int, float]
    i2t: dict[int, float]
    n_images: int
    n_captions: int

    @property
    def mean_r1(self) -> float:
        """Mean of the two recall@1 (a fraction)."""
        return (self.t2i[1] + self.i2t[1]) / 2 if 1 in self.t2i and 1 in self.i2t else float("nan")

    @property
    def rsum(self) -> float:
        """Sum of all recall@k values in percent points, as papers report it (600 is perfect for k=1,5,10)."""
        return 100 * (sum(self.t2i.values()) + sum(self.i2t.values()))

    def as_dict(self) -> dict[str, float | int]:
        """Flat names, also clip_benchmark's (image_retrieval: text→image, text_retrieval: image→text)."""
        out: dict[str, float | int] = {}
        for k, value in self.t2i.items():
            out[f"text_to_image_recall@{k}"] = value
            out[f"image_retrieval_recall@{k}"] = value
        for k, value in self.i2t.items():
            out[f"image_to_text_recall@{k}"] = value
            out[f"text_retrieval_recall@{k}"] = value
        out["mean_recall@1"] = self.mean_r1
        out["rsum"] = self.rsum
        out["n_images"] = self.n_images
        out["n_captions"] = self.n_captions
        return out


def recall_at_k(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    caption_to_image: np.ndarray | Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> RetrievalMetrics:
    """Text→image and image→text recall@k; ``caption_to_image[c]``: the ``image_emb`` row caption c describes.

    Images without any caption still compete as distractors for text→image but are not image→text queries.
    """
    owners = _check_inputs(text_emb, image_emb, caption_to_image, ks)
    t2i_ranks = text_to_image_ranks(text_emb, image_emb, owners, chunk_bytes)
    i2t_ranks = image_to_text_ranks(text_emb, image_emb, owners, chunk_bytes)
    queried = np.bincount(owners, minlength=len(image_emb)) > 0
    return RetrievalMetrics(
        t2i=recall_from_ranks(t2i_ranks, ks),
        i2t=recall_from_ranks(i2t_ranks[queried], ks),
        n_images=len(image_emb),
        n_captions=len(text_emb),
    )


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose first correct answer is within the top k (rank 0 is the top)."""
    if len(ranks) == 0:
        return {k: float("nan") for k in ks}
    return {k: float(np.count_nonzero(ranks < k)) / len(ranks) for k in ks}


def text_to_image_ranks(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    caption_to_image: np.ndarray,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> np.ndarray:
    """For each caption, how many other images score at least as high as its own image."""
    images = unit_rows(image_emb, np.float64)
    owners = np.asarray(caption_to_image, dtype=np.int64)
    ranks = np.empty(len(text_emb), dtype=np.int64)
    for start, stop in _chunks(len(text_emb), len(image_emb), chunk_bytes):
        scores = unit_rows(text_emb[start:stop], np.float64) @ images.T
        own = scores[np.arange(stop - start), owners[start:stop]]
        ranks[start:stop] = np.count_nonzero(scores >= own[:, None], axis=1) - 1
    return ranks


def image_to_text_ranks(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    caption_to_image: np.ndarray,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> np.ndarray:
    """For each image, how many captions of other images score at least as high as its best own caption.

    An image without captions gets the number of captions (never a hit).
    """
    texts = unit_rows(text_emb, np.float64)
    owners = np.asarray(caption_to_image, dtype=np.int64)
    by_owner = np.argsort(owners, kind="stable")
    first_caption = np.searchsorted(owners[by_owner], np.arange(len(image_emb) + 1))
    ranks = np.empty(len(image_emb), dtype=np.int64)
    for start, stop in _chunks(len(image_emb), len(text_emb), chunk_bytes):
        scores = unit_rows(image_emb[start:stop], np.float64) @ texts.T
        own_captions = by_owner[first_caption[start] : first_caption[stop]]
        rows = owners[own_captions] - start
        own = scores[rows, own_captions]
        best = np.full(stop - start, -np.inf)
        np.maximum.at(best, rows, own)
        at_least_best = np.count_nonzero(scores >= best[:, None], axis=1)
        own_at_least_best = np.bincount(rows, weights=own >= best[rows], minlength=stop - start)
        ranks[start:stop] = at_least_best - own_at_least_best.astype(np.int64)
    return ranks


def _check_inputs(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    caption_to_image: np.ndarray | Sequence[int],
    ks: Sequence[int],
) -> np.ndarray:
    if text_emb.ndim != 2 or image_emb.ndim != 2 or text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"embeddings must be (n, d) with one d, got {text_emb.shape} and {image_emb.shape}")
    owners = np.asarray(caption_to_image, dtype=np.int64)
    if owners.shape != (len(text_emb),):
        raise ValueError(f"caption_to_image needs one entry a caption ({len(text_emb)}), got {owners.shape}")
    if len(owners) and (owners.min() < 0 or owners.max() >= len(image_emb)):
        raise ValueError(f"caption_to_image holds image indices outside 0..{len(image_emb) - 1}")
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be positive, got {list(ks)}")
    return owners


def _chunks(n_rows: int, n_columns: int, chunk_bytes: int):
    step = max(1, chunk_bytes // (8 * max(1, n_columns)))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)
