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


def image_token_dims(model: Any, image_size: int) -> tuple[int, int, int]:
    """(cells, channels, embed) of ``image_tokens`` for this model, from one blank image."""
    with torch.no_grad():
        tokens = image_tokens(model, torch.zeros(1, 3, image_size, image_size))
    return tokens.grid.shape[1], tokens.grid.shape[2], tokens.pooled.shape[1]


def image_tokens(model: Any, pixels: torch.Tensor) -> ImageTokens:
    """The last feature map of the image tower as tokens, and the normalised pooled vector.

    open_clip's ``forward_intermediates`` gives the same NCHW map for the ModifiedResNet (last stage) and the
    ViT (last block's patch tokens), so either tower works."""
    out = model.visual.forward_intermediates(pixels, indices=1, output_fmt="NCHW")
    grid = out["image_intermediates"][-1]
    pooled = out["image_features"]
    if isinstance(pooled, tuple):
        pooled = pooled[0]
    return ImageTokens(grid.flatten(2).transpose(1, 2).float(), F.normalize(pooled.float(), dim=-1))


def text_tokens(model: Any, tokens: torch.Tensor) -> TextTokens:
    """Per-token states of the (causal) text tower up to the batch's last end-of-text token, and the pooled
    normalised vector that ``encode_text`` would give."""
    ends = tokens.argmax(dim=-1)  # CLIP's end-of-text token has the largest id
    length = int(ends.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    pooled = x[torch.arange(x.shape[0]), ends]
    pooled = (
        pooled @ model.text_projection
        if not hasattr(model.text_projection, "in_features")
        else model.text_projection(pooled)
    )
    positions = torch.arange(length, device=tokens.device)[None, :]
    return TextTokens(x.float(), positions > ends[:, None], F.normalize(pooled.float(), dim=-1))
