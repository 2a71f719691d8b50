"""Score image-text pairs with a fusion ITM model on top of the CLIP model it was trained for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import UsageError
from retrieval.model.device import CPU, Device
from retrieval.model.itm import FusionItm, load_itm, worse_than_dual
from retrieval.model.itm_tokens import ImageTokens, image_tokens_batched, text_tokens


class ItmScorer:
    """A loaded re-ranker: CLIP tokens in, match probabilities out. ``clip`` is the open_clip model (frozen)."""

    def __init__(self, itm: FusionItm, clip: Any, tokenizer: Any, preprocess: Any, device: Device = CPU):
        self.itm = itm.to(device.torch_name).eval()
        self.clip = clip
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.folder: Path | None = None  # where it was loaded from

    @classmethod
    def load(cls, folder: Path | str, encoder: Any, clip_key: str, force: bool = False) -> ItmScorer:
        """The re-ranker in ``folder`` on ``encoder``'s model; refused when it was trained for another CLIP, or
        (unless ``force``) when it validated worse than the dual encoder alone."""
        if not force and (reason := worse_than_dual(folder)):
            raise UsageError(f"{reason}: retrain it, or pass --force-rerank to use it anyway")
        itm = load_itm(folder)
        if itm.config.clip_key != clip_key:
            raise UsageError(
                f"the re-ranker in {folder} was trained on another CLIP model ({itm.config.clip_model or '?'}) "
                "than this index uses"
            )
        if getattr(encoder, "text_only", False):
            raise UsageError("re-ranking needs the full CLIP model, not a text-only encoder")
        scorer = cls(itm, encoder.model, encoder.tokenizer, encoder.preprocess, encoder.device)
        scorer.folder = Path(folder).expanduser()
        return scorer

    def image_tokens(self, pixels: torch.Tensor, batch_size: int = 128) -> ImageTokens:
        return image_tokens_batched(self.clip, pixels, self.device.torch_name, batch_size)

    @torch.inference_mode()
    def score(self, images: ImageTokens, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
        """Match probability of image i with text i (one text is paired with every image)."""
        if len(texts) == 1 and len(images.grid) > 1:
            texts = list(texts) * len(images.grid)
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            text = text_tokens(self.clip, self.tokenizer(chunk).to(self.device.torch_name))
            grid = images.grid[start : start + batch_size].float()
            pooled = images.pooled[start : start + batch_size].float()
            out.append(self.itm.match_probability(grid, pooled, text.states, text.mask).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
