"""JPEG decoding on the GPU (nvJPEG through torchvision), so decoding keeps up with a GPU encoder.

With CUDA, one CPU core draft-decodes ~25 twelve-megapixel JPEGs a second while a GPU encodes thousands: CPU
workers cannot keep up. Here the workers only read and hash the files; the main process decodes each batch of
JPEGs on the GPU, applies the EXIF orientation, and resizes, crops and normalises there, as open_clip's eval
transform does. Files that are not JPEGs, or that nvJPEG refuses, take the usual CPU path (``retrieval.images``).

Unmeasured: no GPU was available while this was written. The same code runs on the CPU in the tests
(``device="cpu"``), which checks its logic and its agreement with the Pillow path, not its speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retrieval.images import DecodedItem, DecodeError, ImageFileDataset, content_hash, decode_image_and_size, read_file
from retrieval.model.device import Device

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class RawJpeg:
    """A JPEG file's bytes, passed from a worker to the main process to be decoded on the GPU."""

    position: int
    data: Any  # 1-d uint8 torch tensor
    content_hash: str


class JpegBytesDataset(ImageFileDataset):
    """Workers read and hash; JPEGs come back as bytes, anything else decoded on the CPU as usual."""

    def __getitem__(self, position: int) -> RawJpeg | DecodedItem:
        import torch

        try:
            data = read_file(self.paths[position])
        except DecodeError as error:
            return DecodedItem(position, None, None, None, None, str(error))
        if not data.startswith(JPEG_MAGIC):
            return super().__getitem__(position)
        return RawJpeg(position, torch.frombuffer(bytearray(data), dtype=torch.uint8), content_hash(data))


def gpu_decode_available(device: Device, preprocess_cfg: dict) -> bool:
    """A CUDA device, torchvision's nvJPEG decoder, and a transform this module reproduces (shortest-side
    resize)."""
    if not device.is_cuda:
        return False
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return preprocess_cfg.get("resize_mode", "shortest") == "shortest"


def decode_batch(items: list, size: int, preprocess_cfg: dict, device: str, cpu_preprocess) -> list[DecodedItem]:
    """Turn a loader batch (RawJpeg and DecodedItem mixed) into DecodedItems with pixels on ``device`` (a torch
    device name: ``Device.torch_name``)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raws = [item for item in items if isinstance(item, RawJpeg)]
    decoded: dict[int, DecodedItem] = {}
    images: list = []
    if raws:
        try:
            images = decode_jpeg(
                [r.data for r in raws], mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
            )
        except RuntimeError:  # one bad file fails the whole batch: decode one by one
            images = [_decode_one(r, device) for r in raws]
    for raw, image in zip(raws, images):
        if image is None:
            decoded[raw.position] = _cpu_fallback(raw, size, cpu_preprocess, device)
            continue
        height, width = int(image.shape[1]), int(image.shape[2])
        pixels = preprocess_on_device(image, size, preprocess_cfg)
        decoded[raw.position] = DecodedItem(raw.position, pixels, raw.content_hash, width, height, None)
    out = []
    for item in items:
        if isinstance(item, RawJpeg):
            out.append(decoded[item.position])
        elif item.pixels is not None:
            pixels = item.pixels.to(device)
            out.append(DecodedItem(item.position, pixels, item.content_hash, item.width, item.height, None))
        else:
            out.append(item)
    return out


def preprocess_on_device(image, size: int, preprocess_cfg: dict):
    """open_clip's eval transform on a (3, H, W) uint8 tensor: bicubic resize of the shorter side to ``size``
    (antialiased), centre crop, scale to [0, 1], normalise."""
    import torch
    import torch.nn.functional as F
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    height, width = image.shape[1:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    mode = "bilinear" if preprocess_cfg.get("interpolation") == "bilinear" else "bicubic"
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    cropped = resized[0, :, top : top + size, left : left + size].clamp(0, 255).round() / 255.0
    mean = torch.tensor(preprocess_cfg.get("mean") or OPENAI_DATASET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(preprocess_cfg.get("std") or OPENAI_DATASET_STD, device=image.device).view(3, 1, 1)
    return (cropped - mean) / std


def _decode_one(raw: RawJpeg, device: str):
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(raw.data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:
        return None


def _cpu_fallback(raw: RawJpeg, size: int, cpu_preprocess, device: str) -> DecodedItem:
    """Pillow's safe path for what nvJPEG refused (CMYK, progressive oddities, corrupt files)."""
    try:
        image, (width, height) = decode_image_and_size(raw.data.numpy().tobytes(), size)
        pixels = cpu_preprocess(image).to(device)
        return DecodedItem(raw.position, pixels, raw.content_hash, width, height, None)
    except DecodeError as error:
        return DecodedItem(raw.position, None, raw.content_hash, None, None, str(error))
