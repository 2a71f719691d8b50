"""Encode images and texts with a loaded CLIP model; every output is an L2-normalised float32 vector.

One ``Encoder`` per model and device per process: the indexer, the engine, evaluation and the server share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.model.build import build_model, build_text_model, model_identity, quantize_image_tower
from retrieval.model.device import precision_for, resolve_device
from retrieval.model.spec import ModelIdentity, ModelSpec, spec_key

if TYPE_CHECKING:
    import torch
    from PIL import Image


def encode_text_tokens(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised text features, computed only up to the batch's last end-of-text token.

    open_clip's CLIP text tower is causal and pools at the end-of-text position, so positions after it cannot
    change the result: a 5-word query runs ~8 of the 77 positions (several times faster, same vector). Models
    whose text tower is not the standard one fall back to ``encode_text``.
    """
    import open_clip
    import torch.nn.functional as F
    from open_clip.model import text_global_pool

    pool = getattr(model, "text_pool_type", None)
    standard = type(model).encode_text is open_clip.CLIP.encode_text and getattr(model, "attn_mask", None) is not None
    if not standard or pool not in ("argmax", "eos") or (pool == "eos" and model.text_eos_id is None):
        return model.encode_text(tokens, normalize=True)
    ends = tokens.argmax(dim=-1) if pool == "argmax" else (tokens == model.text_eos_id).int().argmax(dim=-1)
    length = int(ends.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, pool, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if hasattr(model.text_projection, "in_features") else x @ model.text_projection
    return F.normalize(x.float(), dim=-1)  # normalised in float32 also for fp16 / bf16 towers


def image_input_dtype(model: Any) -> torch.dtype:
    """The dtype the image tower's first layer consumes.

    open_clip's ``precision="fp16"`` / ``"bf16"`` is mixed precision: embeddings, LayerNorms and the logit scale
    stay float32 while convolutions and linear layers are half, so the first parameter's dtype (float32) says
    nothing about what the patch embedding takes. The first convolution or linear layer of the tower does.
    (The text tower needs no such rule: ``encode_text_tokens`` casts after its float32 embedding itself.)
    """
    import torch

    visual = getattr(model, "visual", model)
    for module in visual.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.weight.is_floating_point():
            return module.weight.dtype
    return next(p.dtype for p in visual.parameters() if p.is_floating_point())


_LOADED: dict[tuple[str, str], Encoder] = {}
_TEXT_BF16: dict[tuple[str, str], Encoder] = {}


class Encoder:
    """A loaded CLIP model with its preprocessing and tokenizer; all outputs are L2-normalised float32."""

    def __init__(
        self, model: Any, preprocess: Any, tokenizer: Any, identity: ModelIdentity, device: str, text_only=False
    ):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self.text_only = text_only  # loaded by load_text: the image tower has no weights

    @classmethod
    def load(cls, spec: ModelSpec, device: str = "auto", int8: bool = False) -> Encoder:
        """One load per process for a given model and device: the indexer, the engine, evaluation and the server
        share it instead of holding two copies (about 1 GB for ViT-B-32). ``int8``: dynamic int8 image tower
        (CPU only; ignored on CUDA, which runs fp16)."""
        device = resolve_device(device)
        int8 = int8 and device == "cpu"
        key = (spec_key(spec), device) + (("int8",) if int8 else ())
        if key not in _LOADED:
            _LOADED.clear()  # keep at most one model in memory
            _LOADED[key] = cls._build(spec, device, int8)
        return _LOADED[key]

    @classmethod
    def unload_all(cls) -> None:
        """Forget every shared encoder (frees their memory once no one else holds them)."""
        _LOADED.clear()
        _TEXT_BF16.clear()

    @classmethod
    def load_text(cls, spec: ModelSpec, device: str = "auto", bf16: bool = False) -> Encoder:
        """An encoder for text queries: the shared full encoder when one is loaded, else (on the CPU) one with
        only the text tower, which starts faster and holds ~40% of the memory for ViT-B-32.

        ``bf16`` (CPU, opt-in): a bfloat16 copy of the text tower, kept beside any full encoder. A query reads every
        weight once, so halving their size halves the time on CPUs with bf16 instructions (ViT-B-32: 29 -> 14 ms);
        query vectors move slightly (cosine >= 0.998 with float32 ones)."""
        device = resolve_device(device)
        key = (spec_key(spec), device)
        if bf16 and device == "cpu":
            if key not in _TEXT_BF16:
                _TEXT_BF16.clear()
                _TEXT_BF16[key] = cls._build_text_bf16(spec, device)
            return _TEXT_BF16[key]
        for loaded_key, encoder in _LOADED.items():
            if loaded_key[:2] == key:
                return encoder
        built = build_text_model(spec) if device == "cpu" else None
        if built is None:
            return cls.load(spec, device)
        import open_clip

        model, preprocess = built
        encoder = cls(model, preprocess, open_clip.get_tokenizer(spec.name), model_identity(spec, model), device, True)
        _LOADED.clear()
        _LOADED[key + ("text",)] = encoder
        return encoder

    @classmethod
    def _build_text_bf16(cls, spec: ModelSpec, device: str) -> Encoder:
        import open_clip
        import torch

        model, preprocess = build_text_model(spec) or build_model(spec, device=device)
        model = model.to(torch.bfloat16)
        return cls(model, preprocess, open_clip.get_tokenizer(spec.name), model_identity(spec, model), device, True)

    @classmethod
    def _build(cls, spec: ModelSpec, device: str, int8: bool = False) -> Encoder:
        import open_clip

        model, preprocess = build_model(spec, device=device, precision=precision_for(device))
        if int8:
            quantize_image_tower(model)
        tokenizer = open_clip.get_tokenizer(spec.name)
        return cls(model, preprocess, tokenizer, model_identity(spec, model), device)

    @property
    def dim(self) -> int:
        return self.identity.embed_dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype image batches are fed in: the one the image tower's first layer computes in."""
        return image_input_dtype(self.model)

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode a preprocessed batch (N, 3, H, W)."""
        import torch

        if self.text_only:
            raise RuntimeError("this encoder holds only the text tower: use Encoder.load for images")
        with torch.inference_mode():
            pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
            features = self.model.encode_image(pixels, normalize=False)
            features = torch.nn.functional.normalize(features.float(), dim=-1)  # in float32 for half towers too
        return features.cpu().numpy()

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        return self.encode_images(torch.stack([self.preprocess(image) for image in images]))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
                chunks.append(encode_text_tokens(self.model, tokens).float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks)
