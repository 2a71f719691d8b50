"""Binding hard negatives: captions that differ from a true one only in what is bound to what.

Two sources, merged per caption. The annotations: a Karpathy JSON sentence may carry
``"negatives": [{"kind": ..., "raw": ...}]``, variants that are false for its image
(``scripts/make_scenes_dataset.py`` writes them). And the caption's own text (``derived_negatives``): a caption
that relates two things ("a red circle above a blue square") yields the relation reversed, both perpendicular
relations ("... to the left of ..."), the two things swapped, and their colours or head nouns swapped; plain
captions of a user's photos can so train and test a re-ranker without a hand-made list. The accuracy of
choosing the true caption over each variant (as in ARO and Winoground) shows whether a scorer reads captions as
a bag of words: swapped colours or objects leave the bag unchanged.
"""

from __future__ import annotations

import json
import re
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


# Spatial relations a caption may use, each with its reverse and the two at right angles to it. Longer phrasings
# first, so "to the left of" is read whole.
RELATIONS = {
    "to the left of": ("to the right of", ("above", "below")),
    "to the right of": ("to the left of", ("above", "below")),
    "left of": ("right of", ("above", "below")),
    "right of": ("left of", ("above", "below")),
    "on top of": ("below", ("to the left of", "to the right of")),
    "above": ("below", ("to the left of", "to the right of")),
    "below": ("above", ("to the left of", "to the right of")),
    "under": ("above", ("to the left of", "to the right of")),
}
_RELATION = re.compile(r"\b(" + "|".join(re.escape(r) for r in RELATIONS) + r")\b")
COLOUR_WORDS = frozenset(
    ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "brown", "cyan", "gray")
    + ("grey", "beige", "violet", "magenta")
)
_ARTICLE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)


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


def derived_negatives(caption: str) -> tuple[HardNegative, ...]:
    """Binding variants of a caption that relates two things with one spatial relation; () for any other.

    Kinds: relation reversed, relation perpendicular (both right angles), objects swapped, colours swapped (when
    both things have one colour word), shapes swapped (their last words, when they differ)."""
    found = list(_RELATION.finditer(caption))
    if len(found) != 1:
        return ()
    match = found[0]
    relation, before, after = match.group(1), caption[: match.start()].strip(), caption[match.end() :].strip()
    first, second = _ARTICLE.sub("", before), _ARTICLE.sub("", after)
    if not first or not second or first.lower() == second.lower():
        return ()
    reverse, perpendicular = RELATIONS[relation]

    def said(a: str, rel: str, b: str) -> str:
        return f"{_with_article(before, a)} {rel} {_with_article(after, b)}"

    out = [HardNegative("relation reversed", said(first, reverse, second))]
    out += [HardNegative("relation perpendicular", said(first, other, second)) for other in perpendicular]
    out.append(
        HardNegative("objects swapped", f"{_with_article(before, second)} {relation} {_with_article(after, first)}")
    )
    words_a, words_b = first.split(), second.split()
    colours_a = [i for i, w in enumerate(words_a) if w.lower() in COLOUR_WORDS]
    colours_b = [i for i, w in enumerate(words_b) if w.lower() in COLOUR_WORDS]
    if len(colours_a) == 1 and len(colours_b) == 1 and words_a[colours_a[0]] != words_b[colours_b[0]]:
        a, b = list(words_a), list(words_b)
        a[colours_a[0]], b[colours_b[0]] = words_b[colours_b[0]], words_a[colours_a[0]]
        out.append(HardNegative("colours swapped", said(" ".join(a), relation, " ".join(b))))
    if len(words_a) > 1 and len(words_b) > 1 and words_a[-1].lower() != words_b[-1].lower():
        a, b = words_a[:-1] + words_b[-1:], words_b[:-1] + words_a[-1:]
        out.append(HardNegative("shapes swapped", said(" ".join(a), relation, " ".join(b))))
    return tuple(out)


def _with_article(original: str, words: str) -> str:
    """``words`` with the article ``original`` began with (a/an agreeing with the new first word)."""
    article = _ARTICLE.match(original)
    if article is None:
        return words
    word = article.group(1)
    if word.lower() in ("a", "an"):
        agreeing = "an" if words[:1].lower() in tuple("aeiou") else "a"
        word = agreeing if word.islower() else agreeing.capitalize()
    return f"{word} {words}"


def negatives_for(
    image_name: str,
    caption: str,
    table: dict[tuple[str, str], tuple[HardNegative, ...]],
    true_captions: frozenset[str] = frozenset(),
) -> tuple[HardNegative, ...]:
    """The annotations' negatives of a caption and those derived from its text, without repeats and without
    any that is one of the image's own (true) captions."""
    seen, out = set(true_captions) | {caption}, []
    for negative in (*table.get((image_name, caption), ()), *derived_negatives(caption)):
        if negative.text not in seen:
            seen.add(negative.text)
            out.append(negative)
    return tuple(out)


def negative_trials(
    items: Sequence[CaptionedImage], table: dict[tuple[str, str], tuple[HardNegative, ...]]
) -> list[NegativeTrial]:
    """Every (image, true caption, negative) of ``items``, from the annotations and from the captions' text; an
    error when no caption has any."""
    trials = [
        NegativeTrial(index, caption, negative)
        for index, item in enumerate(items)
        for caption in item.captions
        for negative in negatives_for(item.path.name, caption, table, frozenset(item.captions))
    ]
    if not trials:
        raise DatasetError(
            "no caption has binding negatives: none in the annotations (sentences[].negatives) and none that "
            "relates two things with a spatial relation"
        )
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
