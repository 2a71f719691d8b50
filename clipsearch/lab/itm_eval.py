"""Evaluate the ITM re-ranker next to the dual encoder: recall@k after re-ranking the top N, and hard-negative
accuracy of both scorers.

The candidates of each caption are its top N images by the exact similarity matrix (what the index search
returns; ``retrieval.evaluate`` checks the two agree). Their image tokens are recomputed from the files, as
``clipsearch search --rerank`` does. A caption whose image is not in its top N keeps its dual-encoder rank:
re-ranking cannot find what the first stage missed, and ``ceiling`` says how often that happens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipsearch.lab.hard_negatives import hard_negative_accuracy, negative_trials, read_hard_negatives
from clipsearch.lab.metrics import recall_from_ranks
from retrieval.model.itm_tokens import ImageTokens


@dataclass(frozen=True)
class ItmEvalReport:
    """``rerank_t2i``: text→image recall@k after re-ranking the top ``depth``; ``ceiling``: share of captions
    whose image is in that top N; ``hard_negatives``: accuracy by scorer ("clip", "itm"), overall and per kind."""

    depth: int | None
    rerank_t2i: dict[int, float] | None
    ceiling: float | None
    rerank_seconds: float
    hard_negatives: dict[str, dict[str, float]] | None
    negative_trials: int
    reranker: str | None

    def as_dict(self) -> dict:
        return {
            "rerank_depth": self.depth,
            "rerank": {f"image_retrieval_recall@{k}": v for k, v in (self.rerank_t2i or {}).items()},
            "rerank_ceiling": self.ceiling,
            "rerank_seconds": round(self.rerank_seconds, 3),
            "hard_negatives": self.hard_negatives,
            "negative_trials": self.negative_trials,
            "reranker": self.reranker,
        }


def evaluate_itm(
    engine: Any,
    captioned: Any,
    staged: list[Path],
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    owners: np.ndarray,
    ks: tuple[int, ...],
    depth: int | None,
    negatives_file: Path | None,
) -> ItmEvalReport:
    """Re-ranked recall (when ``depth``) and hard-negative accuracy (when ``negatives_file``) on one set; the
    hard negatives alone need no re-ranker (then only the dual encoder is reported)."""
    scorer = engine.reranker if depth or _has_reranker(engine) else None
    tokens = _image_tokens(scorer, staged, engine.encoder.identity.image_size) if scorer is not None else None
    rerank_t2i, ceiling, began = None, None, time.perf_counter()
    if depth:
        ranks, ceiling = _rerank_ranks(scorer, tokens, captioned, text_emb, image_emb, owners, depth)
        rerank_t2i = recall_from_ranks(ranks, ks)
    seconds = time.perf_counter() - began
    hard, n_trials = None, 0
    if negatives_file is not None:
        trials = negative_trials(captioned.items, read_hard_negatives(negatives_file))
        n_trials = len(trials)

        def clip_score(images: list[int], texts: list[str]) -> np.ndarray:
            return np.sum(image_emb[images] * engine.encoder.encode_texts(texts), axis=1)

        def itm_score(images: list[int], texts: list[str]) -> np.ndarray:
            index = torch.tensor(images)
            return scorer.score(ImageTokens(tokens.grid[index], tokens.pooled[index]), texts)

        hard = {"clip": hard_negative_accuracy(trials, clip_score)}
        if scorer is not None:
            hard["itm"] = hard_negative_accuracy(trials, itm_score)
    folder = str(scorer.folder) if scorer is not None else None
    return ItmEvalReport(depth, rerank_t2i, ceiling, seconds, hard, n_trials, folder)


def _has_reranker(engine: Any) -> bool:
    from retrieval.search.rerank import default_rerank_folder

    folder = engine.rerank_model or default_rerank_folder(engine.model_spec.name)
    return folder is not None and Path(folder).expanduser().is_dir()


def _image_tokens(scorer: Any, staged: list[Path], image_size: int) -> ImageTokens:
    from retrieval.images import load_image

    pixels = [scorer.preprocess(load_image(path, image_size)) for path in staged]
    return scorer.image_tokens(torch.stack(pixels))


def _rerank_ranks(scorer, tokens: ImageTokens, captioned, text_emb, image_emb, owners, depth: int):
    """0-based rank of each caption's image after re-ranking its top ``depth``, and the share within reach."""
    texts, _ = captioned.captions_and_owners()
    sims = text_emb @ image_emb.T
    order = np.argsort(-sims, axis=1, kind="stable")
    ranks = np.argmax(order == owners[:, None], axis=1)
    top = order[:, :depth]
    within = ranks < depth
    for caption in np.flatnonzero(within):
        index = torch.from_numpy(top[caption])
        scores = scorer.score(ImageTokens(tokens.grid[index], tokens.pooled[index]), [texts[caption]])
        reordered = top[caption][np.argsort(-scores, kind="stable")]
        ranks[caption] = int(np.flatnonzero(reordered == owners[caption])[0])
    return ranks, float(np.mean(within))
