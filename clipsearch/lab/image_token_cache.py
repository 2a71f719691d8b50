"""The frozen CLIP's image tokens of a training set, computed once per run: the towers do not train, so a step of
the re-ranker or the captioning decoder costs only that small model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import UsageError
from retrieval.model.itm_tokens import ImageTokens, image_tokens_batched


def cache_image_tokens(
    model: Any,
    preprocess: Any,
    paths: Sequence[Path],
    workers: int = 0,
    device: str = "cpu",
    batch_size: int = 256,
    stage: int = 1,
) -> ImageTokens:
    """``image_tokens`` of every file (of feature map ``stage``, as ``image_tokens`` counts), in order, on the CPU
    (grid tokens kept as float16: a 3,000-image set in a few MB); an image that cannot be decoded is an error
    (captions and questions point at it by position)."""
    from clipsearch.lab.train_data import image_loader

    grids, pooled, order = [], [], []
    for indices, pixels in image_loader(list(paths), preprocess, batch_size, workers):
        if pixels is None:
            continue
        tokens = image_tokens_batched(model, pixels, device, batch_size, stage)
        grids.append(tokens.grid.half().cpu())
        pooled.append(tokens.pooled.float().cpu())
        order.extend(indices)
    if len(order) != len(paths):
        raise UsageError(f"{len(paths) - len(order)} training image(s) could not be decoded")
    if not grids:
        return ImageTokens(torch.zeros(0), torch.zeros(0))
    return ImageTokens(torch.cat(grids), torch.cat(pooled))
