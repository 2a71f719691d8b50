"""Recall@k for text→image and image→text retrieval, two ways.

``reference_recall`` is LAION clip_benchmark's computation (``clip_benchmark.metrics.zeroshot_retrieval``),
step for step: a float32 ``texts @ images.T`` score matrix, ``torch.topk`` per query row, a hit when a correct
answer is among the k indices. Where scores tie exactly at the cut, ``topk`` decides which tied items make it
(neither index order nor anything documented: it depends on the row's values), so only the same computation on
the same float32 scores gives the same figure; ``TieReport`` says how many queries that concerns, and what
recall is with ties counted against the query.

``recall_at_k`` is the strict rule, used for training's validation recall: a caption's image is at rank r when
r other images score *at least* as high (float64 scores in row chunks of at most ``chunk_bytes``), so no tie
is broken by position and a model that maps everything to one vector is never flattered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.unit import unit_rows

if TYPE_CHECKING:
    import torch

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


@dataclass(frozen=True)
class TieReport:
    """Queries whose hit or miss at k depends on how exact score ties at the cut are ordered.

    ``t2i[k]`` / ``i2t[k]``: how many such queries; ``strict_*``: recall@k with every such tie a miss.
    """

    t2i: dict[int, int]
    i2t: dict[int, int]
    strict_t2i: dict[int, float]
    strict_i2t: dict[int, float]

    @property
    def total(self) -> int:
        return sum(self.t2i.values()) + sum(self.i2t.values())

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for k in self.t2i:
            out[f"image_retrieval_ties@{k}"] = self.t2i[k]
            out[f"image_retrieval_recall_strict@{k}"] = self.strict_t2i[k]
        for k in self.i2t:
            out[f"text_retrieval_ties@{k}"] = self.i2t[k]
            out[f"text_retrieval_recall_strict@{k}"] = self.strict_i2t[k]
        return out


def reference_recall(
    text_emb: torch.Tensor | np.ndarray,
    image_emb: torch.Tensor | np.ndarray,
    caption_to_image: np.ndarray | Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    row_batch: int = 64,
    device: str = "cpu",
) -> tuple[RetrievalMetrics, TieReport]:
    """clip_benchmark's recall@k on L2-normalised float32 embeddings, plus the ties at each cut.

    Every image is an image→text query, as there (one without captions is a miss). ``device``: where ``topk``
    runs (clip_benchmark runs it on its eval device; CUDA's ``topk`` may order exact ties differently).
    """
    import torch

    texts = torch.as_tensor(text_emb, dtype=torch.float32).cpu()
    images = torch.as_tensor(image_emb, dtype=torch.float32).cpu()
    owners = torch.as_tensor(_check_inputs(texts.numpy(), images.numpy(), caption_to_image, ks))
    scores = texts @ images.t()  # the very matrix clip_benchmark ranks
    n_texts, n_images = scores.shape
    t2i = {k: 0 for k in ks}
    i2t = {k: 0 for k in ks}
    t2i_ties, i2t_ties = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0)
    t2i_strict, i2t_strict = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0)
    for start in range(0, n_texts, row_batch):
        rows = scores[start : start + row_batch]
        own = owners[start : start + row_batch]
        own_score = rows.gather(1, own[:, None])
        others = torch.arange(n_images)[None, :] != own[:, None]
        above, level = _above_and_level(rows, own_score, others)
        for k in ks:
            top = torch.topk(rows.to(device), min(k, n_images), dim=1)[1].cpu()
            t2i[k] += int((top == own[:, None]).any(dim=1).sum())
            _count_ties(above, level, k, t2i_ties, t2i_strict)
    by_image = scores.t()
    image_index = torch.arange(n_images)
    for start in range(0, n_images, row_batch):
        rows = by_image[start : start + row_batch]
        others = owners[None, :] != image_index[start : start + row_batch, None]
        best = rows.masked_fill(others, -torch.inf).amax(dim=1, keepdim=True)
        above, level = _above_and_level(rows, best, others)
        for k in ks:
            top = torch.topk(rows.to(device), min(k, n_texts), dim=1)[1].cpu()
            i2t[k] += int((owners[top] == image_index[start : start + row_batch, None]).any(dim=1).sum())
            _count_ties(above, level, k, i2t_ties, i2t_strict)
    metrics = RetrievalMetrics(
        t2i={k: t2i[k] / n_texts for k in ks},
        i2t={k: i2t[k] / n_images for k in ks},
        n_images=n_images,
        n_captions=n_texts,
    )
    ties = TieReport(
        t2i=t2i_ties,
        i2t=i2t_ties,
        strict_t2i={k: t2i_strict[k] / n_texts for k in ks},
        strict_i2t={k: i2t_strict[k] / n_images for k in ks},
    )
    return metrics, ties


def _above_and_level(rows: torch.Tensor, own: torch.Tensor, competitors: torch.Tensor):
    """Per row: how many competitors score above the own score, and how many exactly equal it."""
    above = ((rows > own) & competitors).sum(dim=1)
    level = ((rows == own) & competitors).sum(dim=1)
    return above, level


def _count_ties(above, level, k: int, ties: dict[int, int], strict: dict[int, int]) -> None:
    ties[k] += int(((above < k) & (above + level >= k)).sum())
    strict[k] += int((above + level < k).sum())


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
