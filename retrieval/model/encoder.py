"""Encode images and texts with a loaded CLIP model; every output is an L2-normalised float32 vector.

One ``Encoder`` per model and device per process: the indexer, the engine, evaluation and the server share it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.model.build import build_model, build_text_model, model_identity, quantize_image_tower
from retrieval.model.device import CPU, Device
from retrieval.model.spec import ModelIdentity, ModelSpec, spec_key
from retrieval.model.text_features import text_features

if TYPE_CHECKING:
    import torch
    from PIL import Image


def image_input_dtype(model: Any) -> torch.dtype:
    """The dtype the image tower's first layer consumes.

    open_clip's ``precision="fp16"`` / ``"bf16"`` is mixed precision: embeddings, LayerNorms and the logit scale
    stay float32 while convolutions and linear layers are half, so the first parameter's dtype (float32) says
    nothing about what the patch embedding takes. The first convolution or linear layer of the tower does.
    (The text tower needs no such rule: ``text_features`` casts after its float32 embedding itself.)
    """
    import torch

    visual = getattr(model, "visual", model)
    for module in visual.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.weight.is_floating_point():
            return module.weight.dtype
    return next(p.dtype for p in visual.parameters() if p.is_floating_point())


_LOADED: dict[tuple[str, ...], Encoder] = {}
_LOADING = threading.Lock()  # the server's warm-up and a watcher's preload may ask at once: one build, shared
_TEXT_BF16: dict[str, Encoder] = {}


class Encoder:
    """A loaded CLIP model with its preprocessing and tokenizer; all outputs are L2-normalised float32.

    A ``TextEncoder`` (``retrieval.model.text_encoder``), as the whole model or, from ``load_text_only``, its text
    tower alone; which one answers text queries is chosen there."""

    def __init__(
        self, model: Any, preprocess: Any, tokenizer: Any, identity: ModelIdentity, device: Device, text_only=False
    ):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self.text_only = text_only  # loaded by load_text_only: the image tower has no weights

    @classmethod
    def load(cls, spec: ModelSpec, device: Device, int8: bool = False) -> Encoder:
        """One load per process for a given model and device: the indexer, the engine, evaluation and the server
        share it instead of holding two copies (about 1 GB for ViT-B-32). ``int8``: dynamic int8 image tower
        (CPU only; ignored on CUDA, which runs fp16)."""
        int8 = int8 and not device.is_cuda
        key = (spec_key(spec), device.torch_name) + (("int8",) if int8 else ())
        with _LOADING:
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
    def shared(cls, spec: ModelSpec, device: Device) -> Encoder | None:
        """The encoder of this model on this device that the process holds already (whole or text-only), if any."""
        key = (spec_key(spec), device.torch_name)
        return next((encoder for loaded_key, encoder in _LOADED.items() if loaded_key[:2] == key), None)

    @classmethod
    def load_text_only(cls, spec: ModelSpec, bf16: bool = False) -> Encoder:
        """On the CPU, only the text tower: it starts faster and holds ~40% of the memory for ViT-B-32 (the whole
        model when the text-only build does not apply). Float32 weights, also from a checkpoint stored in fp16.

        ``bf16``: a bfloat16 copy of the text tower, kept beside any full encoder. A query reads every weight once,
        so halving their size halves the time on CPUs with bf16 instructions (ViT-B-32: 29 -> 14 ms); query vectors
        move slightly (cosine >= 0.998 with float32 ones)."""
        import open_clip

        key = spec_key(spec)
        if bf16:
            if key not in _TEXT_BF16:
                _TEXT_BF16.clear()
                _TEXT_BF16[key] = cls._build_text_bf16(spec)
            return _TEXT_BF16[key]
        shared = cls.shared(spec, CPU)
        if shared is not None:
            return shared
        built = build_text_model(spec)
        if built is None:
            return cls.load(spec, CPU)
        model, preprocess = built
        encoder = cls(model, preprocess, open_clip.get_tokenizer(spec.name), model_identity(spec, model), CPU, True)
        _LOADED.clear()
        _LOADED[(key, CPU.torch_name, "text")] = encoder
        return encoder

    @classmethod
    def _build_text_bf16(cls, spec: ModelSpec) -> Encoder:
        import open_clip
        import torch

        model, preprocess = build_text_model(spec) or build_model(spec, device=CPU.torch_name)
        model = model.to(torch.bfloat16)
        return cls(model, preprocess, open_clip.get_tokenizer(spec.name), model_identity(spec, model), CPU, True)

    @classmethod
    def _build(cls, spec: ModelSpec, device: Device, int8: bool = False) -> Encoder:
        import open_clip

        model, preprocess = build_model(spec, device=device.torch_name, precision=device.precision)
        if int8:
            quantize_image_tower(model)
        tokenizer = open_clip.get_tokenizer(spec.name)
        return cls(model, preprocess, tokenizer, model_identity(spec, model), device)

    def describe(self) -> str:
        """What answers, for `clipsearch info` and logs: e.g. ``torch text tower (cpu, float32)``."""
        text_weights = (p for name, p in self.model.named_parameters() if not name.startswith("visual."))
        dtype = str(next(text_weights).dtype).removeprefix("torch.")
        precision = "fp16 mixed" if self.device.precision == "fp16" else dtype
        return f"torch {'text tower' if self.text_only else 'model'} ({self.device}, {precision})"

    @property
    def dim(self) -> int:
        return self.identity.embed_dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype image batches are fed in: the one the image tower's first layer computes in."""
        return image_input_dtype(self.model)

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode a preprocessed batch (N, 3, H, W): a tensor or a numpy array (an ``ImageEncoder``)."""
        import torch

        if self.text_only:
            raise RuntimeError("this encoder holds only the text tower: use Encoder.load for images")
        with torch.inference_mode():
            pixels = torch.as_tensor(pixels).to(self.device.torch_name, dtype=self.dtype, non_blocking=True)
            features = self.model.encode_image(pixels, normalize=False)
            features = torch.nn.functional.normalize(features.float(), dim=-1)  # in float32 for half towers too
        return features.cpu().numpy()

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        """Encode a (N, S, S, 3) uint8 batch of ``retrieval.model.pixels`` crops (the ONNX path's workers make
        them; torch encodes them when the ONNX tower does not open)."""
        from retrieval.model.pixels import normalisation_for

        return self.encode_images(normalisation_for(self.identity.preprocess)(crops))

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        return self.encode_images(torch.stack([self.preprocess(image) for image in images]))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device.torch_name)
                chunks.append(text_features(self.model, tokens).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks)
