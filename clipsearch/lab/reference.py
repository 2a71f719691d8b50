"""The reference protocol's embeddings: computed as LAION clip_benchmark computes them, step for step.

Each image is decoded at full resolution by Pillow and converted, ``Image.open(path).convert("RGB")`` (no draft
decode, no EXIF rotation: clip_benchmark's Flickr/COCO loaders do neither), then goes through the model's own
open_clip eval transform. The model runs in float32. Images are encoded ``batch_size`` at a time, in set order,
and the captions of each batch's images are tokenized to the full context and encoded together, each output
``F.normalize``-d: clip_benchmark's ``zeroshot_retrieval.evaluate`` loop with ``--no_amp``. Same batches, same
arithmetic, so on one machine the float32 vectors, and hence even the order of exact score ties, are its own.

The vectors are cached per (model, device, batch size, image files and captions), so a second run loads nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import retrieval.images  # noqa: F401  (sets Pillow's decompression-bomb limit, which applies here too)
from clipsearch.lab.datasets import CaptionedSet
from retrieval.atomic import atomic_write
from retrieval.model.device import CPU, Device
from retrieval.model.spec import ModelSpec, spec_key

CACHE_FORMAT = 1


@dataclass(frozen=True)
class ReferenceEmbeddings:
    """Float32 unit vectors, one image row per set item and one text row per caption (``owners``: its image)."""

    images: np.ndarray
    texts: np.ndarray
    owners: np.ndarray
    model: str
    failed: tuple[tuple[int, str], ...]  # (item index, reason) of images Pillow could not decode
    seconds: float
    cached: bool


class ReferenceImages:
    """Map-style dataset: ``preprocess(Image.open(path).convert("RGB"))``; a bad file yields its reason."""

    def __init__(self, paths: list[Path], preprocess: Any):
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, Any, str | None]:
        try:
            with Image.open(self.paths[position]) as image:
                return position, self.preprocess(image.convert("RGB")), None
        except Exception as error:  # a worker must never die on one file
            return position, None, f"cannot decode ({type(error).__name__}: {error})"


def _keep_items(items: list) -> list:
    return items


def reference_embeddings(
    captioned: CaptionedSet,
    spec: ModelSpec,
    cache_dir: Path,
    prompt: str = "",
    batch_size: int = 64,
    workers: int = 0,
    device: Device = CPU,
    progress: bool = False,
) -> ReferenceEmbeddings:
    """Embed the set's images and captions the reference way (cached in ``cache_dir``)."""
    path = cache_dir / f"{_cache_key(captioned, spec, prompt, batch_size, device)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            failed = tuple((int(i), str(r)) for i, r in zip(cached["failed_index"], cached["failed_reason"]))
            return ReferenceEmbeddings(
                cached["images"], cached["texts"], cached["owners"], str(cached["model"]), failed, 0.0, True
            )
    started = time.perf_counter()
    model, preprocess, tokenizer, description = _load(spec, device)
    images, texts, owners, failed = _encode(
        captioned, model, preprocess, tokenizer, prompt, batch_size, workers, device, progress
    )
    result = ReferenceEmbeddings(images, texts, owners, description, failed, time.perf_counter() - started, False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "images": images,
        "texts": texts,
        "owners": owners,
        "model": np.array(description),
        "failed_index": np.array([i for i, _ in failed], dtype=np.int64),
        "failed_reason": np.array([r for _, r in failed], dtype=str),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays), durable=False)
    return result


def _load(spec: ModelSpec, device: Device) -> tuple[Any, Any, Any, str]:
    """The float32 model: the process's shared encoder when that is float32 (the CPU), else a float32 build."""
    import open_clip
    import torch

    from retrieval.model.build import build_model, model_identity
    from retrieval.model.encoder import Encoder

    if not device.is_cuda:
        encoder = Encoder.load(spec, device)
        if encoder.dtype == torch.float32:
            return encoder.model, encoder.preprocess, encoder.tokenizer, encoder.identity.describe()
    model, preprocess = build_model(spec, device=device.torch_name, precision="fp32")
    return model, preprocess, open_clip.get_tokenizer(spec.name), model_identity(spec, model).describe()


def _encode(captioned, model, preprocess, tokenizer, prompt, batch_size, workers, device, progress):
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    dataset = ReferenceImages([item.path for item in captioned.items], preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_keep_items, shuffle=False)
    image_rows, text_rows, owners, failed = [], [], [], []
    for batch in tqdm(loader, desc="reference", unit="batch", disable=not progress):
        failed += [(position, reason) for position, pixels, reason in batch if pixels is None]
        good = [(position, pixels) for position, pixels, _ in batch if pixels is not None]
        if not good:
            continue
        captions = [(prompt + c, position) for position, _ in good for c in captioned.items[position].captions]
        with torch.no_grad():
            pixels = torch.stack([p for _, p in good]).to(device.torch_name)
            tokens = tokenizer([text for text, _ in captions]).to(device.torch_name)
            image_rows.append(F.normalize(model.encode_image(pixels), dim=-1).float().cpu())
            text_rows.append(F.normalize(model.encode_text(tokens), dim=-1).float().cpu())
        owners += [position for _, position in captions]
    if not image_rows:  # every image failed: the caller says so
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64), tuple(failed)
    images, texts = torch.cat(image_rows).numpy(), torch.cat(text_rows).numpy()
    return images, texts, np.asarray(owners, dtype=np.int64), tuple(failed)


def _cache_key(captioned: CaptionedSet, spec: ModelSpec, prompt: str, batch_size: int, device: Device) -> str:
    import open_clip
    import torch

    digest = hashlib.sha256(
        f"{CACHE_FORMAT}\n{spec_key(spec)}\n{device.torch_name}\n{batch_size}\n{prompt}\n"
        f"{torch.__version__}\n{open_clip.__version__}\n".encode()
    )
    for item in captioned.items:
        stat = item.path.stat()
        digest.update(f"{item.path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        for caption in item.captions:
            digest.update(caption.encode() + b"\0")
    return digest.hexdigest()[:24]
