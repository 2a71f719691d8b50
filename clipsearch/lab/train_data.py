"""Training data for contrastive fine-tuning: the train/val split, and batches of (image, one random caption).

Captions are tokenised once up front; each epoch draws a fresh random caption per image from a generator seeded
by (seed, epoch), in the main process, so a run is reproducible whatever the number of DataLoader workers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.lab.datasets import CaptionedImage, CaptionedSet, DatasetError

TRAIN_SPLITS = ("train", "restval")
HELD_OUT_FRACTION = 0.05
MAX_VAL_IMAGES = 1000


@dataclass(frozen=True)
class TrainValSplit:
    """The images to train on and the images to validate on; ``val_source`` says where the latter came from."""

    train: tuple[CaptionedImage, ...]
    val: tuple[CaptionedImage, ...]
    val_source: str


def split_train_val(
    captioned: CaptionedSet,
    val_split: str = "val",
    seed: int = 0,
    max_val_images: int = MAX_VAL_IMAGES,
) -> TrainValSplit:
    """Train on ``train``/``restval`` (or every image when the annotations carry no split) and validate on
    ``val_split``; annotations without that split get a seeded 5% of the training images held out instead.
    """
    items = captioned.items
    if captioned.has_splits:
        train = tuple(item for item in items if item.split in TRAIN_SPLITS or item.split is None)
        val = tuple(item for item in items if item.split == val_split)
        source = f"split {val_split!r}"
    else:
        train, val, source = items, (), ""
    if not val and len(train) >= 40:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = min(max_val_images, max(2, round(len(train) * HELD_OUT_FRACTION)))
        held_out = set(order[:n_val])
        val = tuple(item for i, item in enumerate(train) if i in held_out)
        train = tuple(item for i, item in enumerate(train) if i not in held_out)
        source = f"{n_val} training images held out (seed {seed})"
    if len(val) > max_val_images:
        val = tuple(random.Random(seed).sample(val, max_val_images))
        source += f", {max_val_images} of them drawn at random"
    if len(train) < 2:
        raise DatasetError(f"need at least 2 training images with captions, found {len(train)}")
    return TrainValSplit(train, val, source or "none")


class CaptionPairs:
    """Map-style dataset: index ``(image, caption)`` gives (pixels, caption tokens), or None when undecodable."""

    def __init__(self, items: Sequence[CaptionedImage], tokenize: Callable[[list[str]], Any], preprocess: Any):
        import torch

        self.paths = [item.path for item in items]
        self.caption_counts = [len(item.captions) for item in items]
        first, offsets = 0, []
        for count in self.caption_counts:
            offsets.append(first)
            first += count
        self.offsets = offsets
        captions = [caption for item in items for caption in item.captions]
        unique = list(dict.fromkeys(captions))  # captions repeat a lot in some sets: tokenise each once
        row_of = {caption: row for row, caption in enumerate(unique)}
        unique_tokens = tokenize(unique).to(torch.long)
        self.tokens = unique_tokens[torch.tensor([row_of[c] for c in captions], dtype=torch.long)]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, pair: tuple[int, int]) -> tuple[Any, Any] | None:
        from retrieval.images import DecodeError, load_image

        image_index, caption_index = pair
        try:
            pixels = self.preprocess(load_image(self.paths[image_index], min_side=_min_side(self.preprocess)))
        except DecodeError:
            return None
        return pixels, self.tokens[self.offsets[image_index] + caption_index]


def _min_side(preprocess: Any) -> int | None:
    """The side the eval transform resizes to, for JPEG draft decoding (None when it cannot be told)."""
    for transform in getattr(preprocess, "transforms", ()):
        size = getattr(transform, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size:
            return int(min(size))
    return None


def epoch_pairs(caption_counts: Sequence[int], seed: int, epoch: int) -> list[tuple[int, int]]:
    """Every image once, in a seeded random order, each with one caption drawn at random."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(caption_counts)))
    rng.shuffle(order)
    return [(i, rng.randrange(caption_counts[i])) for i in order if caption_counts[i] > 0]


def collate_pairs(batch: list[tuple[Any, Any] | None]) -> tuple[Any, Any] | None:
    """Stack the decodable pairs of a batch (undecodable images are dropped, not fatal)."""
    import torch

    pairs = [pair for pair in batch if pair is not None]
    if len(pairs) < 2:
        return None
    return torch.stack([p for p, _ in pairs]), torch.stack([t for _, t in pairs])


def pair_loader(dataset: CaptionPairs, batch_size: int, seed: int, epoch: int, workers: int) -> Any:
    """One epoch of shuffled (pixels, tokens) batches; the last, short batch is dropped when full ones exist."""
    from torch.utils.data import DataLoader

    pairs = epoch_pairs(dataset.caption_counts, seed, epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=pairs,
        drop_last=len(pairs) >= batch_size,
        num_workers=workers,
        collate_fn=collate_pairs,
        persistent_workers=False,
    )


class ImagesOnly:
    """Map-style dataset of preprocessed images for validation: (index, pixels or None when undecodable)."""

    def __init__(self, paths: Sequence[Path], preprocess: Any):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        from retrieval.images import DecodeError, load_image

        try:
            return index, self.preprocess(load_image(self.paths[index], min_side=_min_side(self.preprocess)))
        except DecodeError:
            return index, None


def collate_images(batch: list[tuple[int, Any]]) -> tuple[list[int], Any]:
    """The indices and stacked pixels of the decodable images of a batch."""
    import torch

    good = [(index, pixels) for index, pixels in batch if pixels is not None]
    return [index for index, _ in good], torch.stack([pixels for _, pixels in good]) if good else None


def image_loader(paths: Sequence[Path], preprocess: Any, batch_size: int, workers: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(
        ImagesOnly(paths, preprocess), batch_size=batch_size, num_workers=workers, collate_fn=collate_images
    )
