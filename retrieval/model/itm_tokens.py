"""Token outputs of a CLIP model's two towers: the inputs of the fusion (ITM) re-ranker.

A dual encoder pools each side into one vector before the two meet; the re-ranker instead reads what comes
before the pooling: the image tower's last feature map (one token per grid cell or patch) and the text tower's
per-token states. Both are computed with the CLIP weights frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from retrieval.model.text_features import eos_id_of, pooled_features, text_states, truncated


@dataclass(frozen=True)
class ImageTokens:
    """``grid``: (B, cells, channels) of the last feature map; ``pooled``: (B, embed) the CLIP image vector."""

    grid: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class TextTokens:
    """``states``: (B, L, width) after the final LayerNorm; ``mask``: (B, L) True where a token is padding."""

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def image_token_dims(model: Any, image_size: int, stage: int = 1) -> tuple[int, int, int]:
    """(cells, channels, embed) of ``image_tokens`` for this model, from one blank image."""
    with torch.no_grad():
        tokens = image_tokens(model, torch.zeros(1, 3, image_size, image_size), stage)
    return tokens.grid.shape[1], tokens.grid.shape[2], tokens.pooled.shape[1]


def image_tokens(model: Any, pixels: torch.Tensor, stage: int = 1) -> ImageTokens:
    """A feature map of the image tower as tokens, and the normalised pooled vector.

    ``stage`` counts feature maps back from the last: 1 is the last (what the re-ranker reads), 2 the one before.
    open_clip's ``forward_intermediates`` gives the same NCHW maps for the ModifiedResNet (its stages: the one
    before the last is twice as fine, 4 x 4 cells instead of 2 x 2 at 64 px, and keeps more of each thing's shape)
    and the ViT (its blocks' patch tokens: one grid), so either tower works."""
    out = model.visual.forward_intermediates(pixels, indices=stage, output_fmt="NCHW")
    grid = out["image_intermediates"][0]
    pooled = out["image_features"]
    if isinstance(pooled, tuple):
        pooled = pooled[0]
    return ImageTokens(grid.flatten(2).transpose(1, 2).float(), F.normalize(pooled.float(), dim=-1))


def image_tokens_batched(
    model: Any, pixels: torch.Tensor, device: str = "cpu", batch_size: int = 128, stage: int = 1
) -> ImageTokens:
    """``image_tokens`` of preprocessed pixels, ``batch_size`` at a time on ``device`` in the model's dtype, without
    gradients: what the re-ranker and the captioning decoder read at query and index time."""
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        parts = [
            image_tokens(model, pixels[i : i + batch_size].to(device, dtype=dtype), stage)
            for i in range(0, len(pixels), batch_size)
        ]
    return ImageTokens(torch.cat([p.grid for p in parts]), torch.cat([p.pooled for p in parts]))


def text_tokens(model: Any, tokens: torch.Tensor) -> TextTokens:
    """Per-token states of the (causal) text tower up to the batch's last end-of-text token, and the pooled
    normalised vector the encoder gives (``retrieval.model.text_features``)."""
    states, ends = text_states(model, truncated(tokens, eos_id_of(model)))
    positions = torch.arange(states.shape[1], device=tokens.device)[None, :]
    return TextTokens(states.float(), positions > ends[:, None], pooled_features(model, states, ends))
