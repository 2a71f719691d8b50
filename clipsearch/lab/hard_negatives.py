"""Binding hard negatives: captions that differ from a true one only in what is bound to what.

They come with the annotations: a Karpathy JSON sentence may carry ``"negatives": [{"kind": ..., "raw": ...}]``,
variants that are false for its image (``scripts/make_scenes_dataset.py`` writes them). The accuracy of
choosing the true caption over each variant (as in ARO and Winoground) shows whether a scorer reads captions as
a bag of words: swapped colours or objects leave the bag unchanged.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsearch.lab.datasets import CaptionedImage, DatasetError


@dataclass(frozen=True)
class HardNegative:
    kind: str
    text: str


@dataclass(frozen=True)
class NegativeTrial:
    """One choice: image ``image`` (index into the items), true caption ``caption`` against ``negative``."""

    image: int
    caption: str
    negative: HardNegative


def read_hard_negatives(annotations: Path | str) -> dict[tuple[str, str], tuple[HardNegative, ...]]:
    """(image file name, caption) → its negatives, from a Karpathy JSON; empty when it carries none."""
    path = Path(annotations).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read hard negatives from {path}: {error}") from None
    table = {}
    for image in data.get("images", []) if isinstance(data, dict) else []:
        for sentence in image.get("sentences", []):
            negatives = tuple(HardNegative(n["kind"], n["raw"]) for n in sentence.get("negatives", []))
            if negatives:
                table[(Path(image["filename"]).name, sentence["raw"].strip())] = negatives
    return table


def negative_trials(
    items: Sequence[CaptionedImage], table: dict[tuple[str, str], tuple[HardNegative, ...]]
) -> list[NegativeTrial]:
    """Every (image, true caption, negative) of ``items``; an error when none of their captions has any."""
    trials = [
        NegativeTrial(index, caption, negative)
        for index, item in enumerate(items)
        for caption in item.captions
        for negative in table.get((item.path.name, caption), ())
    ]
    if not trials:
        raise DatasetError("the annotations carry no hard negatives for these images (sentences[].negatives)")
    return trials


def hard_negative_accuracy(
    trials: Sequence[NegativeTrial], score: Callable[[list[int], list[str]], np.ndarray]
) -> dict[str, float]:
    """Share of trials where ``score(images, texts)`` ranks the true caption above the negative: overall and
    per kind. A tie counts as a miss."""
    images = [t.image for t in trials]
    true = score(images, [t.caption for t in trials])
    false = score(images, [t.negative.text for t in trials])
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for trial, won in zip(trials, true > false):
        by_kind[trial.negative.kind].append(bool(won))
    result = {"all": float(np.mean(true > false))}
    result.update({kind: float(np.mean(wins)) for kind, wins in sorted(by_kind.items())})
    return result
