"""The model's image preprocessing without torch: Pillow resizes and crops to a compact uint8 square, numpy
normalises it.

open_clip's eval transform (torchvision ``Resize`` of the shorter side, ``CenterCrop``, ``ToTensor``,
``Normalize``) calls Pillow's own resize for PIL images, so doing the same steps here with the same sizes and
filter gives the same pixels. Splitting it in two lets a decode worker hand over 3 bytes a pixel (150 KB for a
224 px image) instead of 12 bytes of float32, and the encode stage normalise a whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults, when a config names none
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "squash")  # open_clip's "longest" pads: left to torch
FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class SquareCrop:
    """One image to a (side, side, 3) uint8 array as open_clip's eval transform crops it (picklable: it travels
    to decode workers)."""

    side: int
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB") if image.mode != "RGB" else image
        width, height = image.size
        if self.resize_mode == "squash":
            size = (self.side, self.side)
        elif width <= height:  # torchvision's Resize(int): the shorter side to ``side``, the longer truncated
            size = (self.side, int(self.side * height / width))
        else:
            size = (int(self.side * width / height), self.side)
        if size != image.size:
            image = image.resize(size, FILTERS.get(self.interpolation, Image.Resampling.BICUBIC))
        width, height = image.size
        left = int(round((width - self.side) / 2.0))  # torchvision's center_crop
        top = int(round((height - self.side) / 2.0))
        if (left, top) != (0, 0) or image.size != (self.side, self.side):
            image = image.crop((left, top, left + self.side, top + self.side))
        return np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True)
class Normalisation:
    """ToTensor + Normalize for a batch of crops: (N, S, S, 3) uint8 -> (N, 3, S, S) float32."""

    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        scale = (1.0 / (255.0 * np.asarray(self.std, np.float32))).astype(np.float32)
        shift = (np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)).astype(np.float32)
        pixels = crops.astype(np.float32) * scale - shift  # channels last, broadcast per channel
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def unsupported_preprocess(preprocess: dict[str, Any]) -> str | None:
    """Why this preprocessing config cannot be done without torch, or None when it can."""
    mode = preprocess.get("resize_mode") or "shortest"
    if mode not in RESIZE_MODES:
        return f"resize mode {mode!r} is done by torch only"
    if (preprocess.get("interpolation") or "bicubic") not in FILTERS:
        return f"interpolation {preprocess.get('interpolation')!r} is done by torch only"
    return None


def crop_for(image_size: int, preprocess: dict[str, Any]) -> SquareCrop:
    """The crop of a model with this image side and preprocessing config (``ModelIdentity``)."""
    return SquareCrop(
        int(image_size), preprocess.get("interpolation") or "bicubic", preprocess.get("resize_mode") or "shortest"
    )


def normalisation_for(preprocess: dict[str, Any]) -> Normalisation:
    return Normalisation(_three(preprocess.get("mean") or OPENAI_MEAN), _three(preprocess.get("std") or OPENAI_STD))


def _three(value: Any) -> tuple[float, ...]:
    """One value per channel (open_clip also takes a single number)."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
