"""Re-rank the dual encoder's top N with a fusion ITM model (ALBEF/BLIP's retrieve-then-rerank).

The candidates' image tokens are not stored in the index (a grid of tokens per image would dwarf the vectors),
so they are recomputed from the files: N decodes and N image-tower passes per query. The result set stays
inside the dual encoder's top N; only the order changes, and each result says which stage scored it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import UsageError

if TYPE_CHECKING:
    from retrieval.model.itm_scorer import ItmScorer

DEFAULT_FOLDER_SUFFIX = "-itm"
MAX_RERANK = 1000


def default_rerank_folder(model_name: str) -> Path | None:
    """``local-dir:X`` → ``X-itm`` beside it (where `clipsearch train-itm` is told to write), else None."""
    from retrieval.model.spec import folder_beside

    return folder_beside(model_name, DEFAULT_FOLDER_SUFFIX)


def rerank_text(query) -> str:
    """The text a query asks for, when it is one text and nothing else (the re-ranker reads one caption)."""
    terms = query.positive
    if len(terms) != 1 or terms[0].text is None or query.negative:
        raise UsageError("--rerank works on a query of one text (no images, --add or --sub)")
    return terms[0].text


def check_depth(depth: int, k: int) -> None:
    if not 1 <= depth <= MAX_RERANK:
        raise UsageError(f"--rerank must be between 1 and {MAX_RERANK}")
    if depth < k:
        raise UsageError(f"--rerank {depth} is smaller than -k {k}: re-ranking cannot return more than it scores")


def rerank_results(text: str, candidates: list, scorer: ItmScorer, image_size: int) -> list:
    """``candidates`` (the dual encoder's top N, ``SearchResult``s) ordered by ITM match probability: ``score``
    becomes that probability, ``clip_score`` keeps the cosine, ``stage`` says "itm". Undecodable files keep
    their place after every scored one."""
    import torch

    from retrieval.images import DecodeError, load_image

    pixels, scored, unscored = [], [], []
    for result in candidates:
        try:
            pixels.append(scorer.preprocess(load_image(Path(result.path), image_size)))
            scored.append(result)
        except (DecodeError, OSError):
            unscored.append(result)
    if not scored:
        return candidates
    probabilities = scorer.score(scorer.image_tokens(torch.stack(pixels)), [text])
    order = sorted(range(len(scored)), key=lambda i: (-probabilities[i], scored[i].rank))
    ranked = [replace(scored[i], score=float(probabilities[i]), clip_score=scored[i].score, stage="itm") for i in order]
    return [replace(r, rank=rank) for rank, r in enumerate(ranked + unscored, start=1)]
