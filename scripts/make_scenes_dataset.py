"""Generate captioned multi-shape scenes where binding matters, with hard negatives, offline and deterministic.

Each image is a 2x2 grid of four distinct coloured shapes. A caption names two neighbours and their relation
("a red circle above a blue square"), so it mentions half of what the image shows: a single image vector must
keep which colour goes with which shape and where, and a single text vector must keep word order. That is
where a dual encoder reads captions as a bag of words, and where a cross-attention re-ranker can help.

- **Disjoint held-out pairs**: a seeded 30% of all unordered pairs of objects (colour + shape) is held out.
  Training scenes never place a held-out pair next to each other; every test caption names a held-out pair.
  So no (object, relation, object) combination of a test caption was ever seen in training. Val captions name
  training pairs (in new scenes), so choosing the best epoch never looks at the test pairs.
- **Answerable captions**: val and test images carry one caption each, and no other image of the split makes
  that caption true, so recall@k has exactly one right answer per caption.
- **Hard negatives**: every caption (all splits) lists variants that differ only in binding and are false for
  its image: colours swapped, shapes swapped, objects swapped ("a blue square above a red circle"), relation
  reversed ("a red circle below a blue square"). They sit under ``sentences[i]["negatives"]``.
- **What is true**: each image lists every true neighbour statement (``attributes.statements``, both directions),
  so a generated caption can be checked against the scene that was drawn.
- **Questions** (``questions.json`` beside ``dataset.json``): four per image, one of each kind, answered from the
  drawn scene: colour ("what colour is the shape above the blue square?"), shape ("what shape is the red one?"),
  relation ("where is the red circle relative to the blue square?" -> above, below, left, right) and count ("how
  many green shapes are there?" -> zero ... four). Drawn with their own seed: the images and captions are the same
  with or without them.

    python scripts/make_scenes_dataset.py --out /tmp/scenes --train 6000 --val 300 --test 1000 --seed 3

Importable: ``generate_scenes_dataset(out_dir, n_train, n_val, n_test, seed)`` is what ``main`` calls.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_shapes_dataset import COLOURS as ALL_COLOURS  # noqa: E402
from make_shapes_dataset import SUPERSAMPLE, _jitter, draw_shape  # noqa: E402

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")  # no hexagon: a circle at 20 px
COLOURS = {
    **ALL_COLOURS,
    "white": (245, 245, 245),
    "brown": (120, 70, 30),
    "cyan": (40, 210, 220),
}
BACKGROUND = (60, 60, 60)
# 10 colours x 6 shapes: enough distinct (object, relation, object) facts for 1,000 held-out captions that
# each describe exactly one image of their split.
HELD_OUT_FRACTION = 0.3
# Cells in reading order: 0 top left, 1 top right, 2 bottom left, 3 bottom right.
CELL_CENTRES = ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73))
# Neighbours as (first, second, relation of first to second).
NEIGHBOURS = ((0, 1, "left of"), (2, 3, "left of"), (0, 2, "above"), (1, 3, "above"))
REVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NEGATIVE_KINDS = ("colours swapped", "shapes swapped", "objects swapped", "relation reversed")
QUESTION_KINDS = ("colour", "shape", "relation", "count")
RELATION_ANSWERS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
NUMBERS = ("zero", "one", "two", "three", "four")

Obj = tuple[str, str]  # (colour, shape)
Fact = tuple[Obj, str, Obj]  # (object, relation, object)


@dataclass(frozen=True)
class GridScene:
    """Four distinct objects in reading order (top left, top right, bottom left, bottom right)."""

    cells: tuple[Obj, Obj, Obj, Obj]

    def facts(self) -> set[Fact]:
        """Every true neighbour statement, in both directions."""
        out = set()
        for a, b, relation in NEIGHBOURS:
            out.add((self.cells[a], relation, self.cells[b]))
            out.add((self.cells[b], REVERSE[relation], self.cells[a]))
        return out

    def neighbour_pairs(self) -> list[frozenset[Obj]]:
        return [frozenset((self.cells[a], self.cells[b])) for a, b, _ in NEIGHBOURS]


def all_objects() -> list[Obj]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def held_out_pairs(seed: int) -> set[frozenset[Obj]]:
    """The unordered object pairs reserved for val/test captions (a fixed fraction, drawn with ``seed``)."""
    pairs = [frozenset(p) for p in itertools.combinations(all_objects(), 2)]
    rng = random.Random(f"held-out:{seed}")
    return set(rng.sample(pairs, round(len(pairs) * HELD_OUT_FRACTION)))


def phrase(fact: Fact) -> str:
    (c1, s1), relation, (c2, s2) = fact
    return f"{_a(c1)} {c1} {s1} {RELATION_WORDS[relation]} {_a(c2)} {c2} {s2}"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def binding_negatives(fact: Fact) -> dict[str, Fact]:
    """Variants of ``fact`` that keep its words (bar the relation) and change only what is bound to what."""
    (c1, s1), relation, (c2, s2) = fact
    return {
        "colours swapped": ((c2, s1), relation, (c1, s2)),
        "shapes swapped": ((c1, s2), relation, (c2, s1)),
        "objects swapped": ((c2, s2), relation, (c1, s1)),
        "relation reversed": ((c1, s1), REVERSE[relation], (c2, s2)),
    }


def _negatives_false_for(scene: GridScene, fact: Fact) -> list[dict[str, str]] | None:
    """The fact's binding negatives, or None when one of them is true for the scene (or repeats the fact)."""
    facts = scene.facts()
    out = []
    for kind, negative in binding_negatives(fact).items():
        if negative in facts or negative[0] == negative[2]:
            return None
        out.append({"kind": kind, "raw": phrase(negative)})
    return out


def _random_scene(rng: random.Random) -> GridScene:
    return GridScene(tuple(rng.sample(all_objects(), 4)))  # type: ignore[arg-type]


def _train_scene(rng: random.Random, held_out: set[frozenset[Obj]]) -> GridScene:
    while True:
        scene = _random_scene(rng)
        if not any(pair in held_out for pair in scene.neighbour_pairs()):
            return scene


def _held_out_scene(
    rng: random.Random, pairs: list[frozenset[Obj]], used_facts: set[Fact], split_facts: set[Fact]
) -> tuple[GridScene, Fact, list[dict[str, str]]]:
    """A scene with one of ``pairs`` as neighbours whose caption no other scene of the split makes true."""
    while True:
        first, second = sorted(rng.choice(pairs))
        if rng.random() < 0.5:
            first, second = second, first
        a, b, relation = rng.choice(NEIGHBOURS)
        others = [o for o in all_objects() if o not in (first, second)]
        rest = iter(rng.sample(others, 2))
        cells = [first if i == a else second if i == b else next(rest) for i in range(4)]
        scene = GridScene(tuple(cells))  # type: ignore[arg-type]
        fact = (first, relation, second) if rng.random() < 0.5 else (second, REVERSE[relation], first)
        negatives = _negatives_false_for(scene, fact)
        # No earlier scene makes this caption true, and this scene makes no earlier caption true.
        if negatives is None or fact in used_facts or scene.facts() & split_facts:
            continue
        return scene, fact, negatives


def render_grid(scene: GridScene, size_px: int, rng: random.Random) -> Image.Image:
    """Draw the four shapes anti-aliased, with small jitter in place, size, angle and colour."""
    side = size_px * SUPERSAMPLE
    image = Image.new("RGB", (side, side), _jitter(BACKGROUND, rng, 8))
    draw = ImageDraw.Draw(image)
    for (colour, shape), (fx, fy) in zip(scene.cells, CELL_CENTRES):
        r = side * rng.uniform(0.15, 0.19)
        cx = side * (fx + rng.uniform(-0.03, 0.03))
        cy = side * (fy + rng.uniform(-0.03, 0.03))
        angle = math.radians(rng.uniform(-12, 12))
        draw_shape(draw, shape, cx, cy, r, angle, _jitter(COLOURS[colour], rng, 15))
    return image.resize((size_px, size_px), Image.Resampling.LANCZOS)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _reference(scene: GridScene, obj: Obj) -> str:
    """How a question names an object: by its shape alone when no other shape of the scene has it."""
    colour, shape = obj
    alone = sum(s == shape for _, s in scene.cells) == 1
    return f"the {shape}" if alone else f"the {colour} {shape}"


def scene_questions(scene: GridScene, rng: random.Random) -> list[dict[str, str]]:
    """One question of each kind about ``scene``, each with the answer the drawn scene gives."""
    facts = sorted(scene.facts())
    (c1, s1), relation, other = rng.choice(facts)
    where = f"{RELATION_WORDS[relation]} {_reference(scene, other)}"
    colour = {"kind": "colour", "question": f"what colour is the shape {where}?", "answer": c1}
    (c1, s1), relation, other = rng.choice(facts)
    colours = [c for c, _ in scene.cells]
    if colours.count(c1) == 1 and rng.random() < 0.5:
        shape = {"kind": "shape", "question": f"what shape is the {c1} one?", "answer": s1}
    else:
        where = f"{RELATION_WORDS[relation]} {_reference(scene, other)}"
        shape = {"kind": "shape", "question": f"what shape is {where}?", "answer": s1}
    first, relation, second = rng.choice(facts)
    relation_q = {
        "kind": "relation",
        "question": f"where is {_reference(scene, first)} relative to {_reference(scene, second)}?",
        "answer": RELATION_ANSWERS[relation],
    }
    if rng.random() < 0.5:
        colour_asked = rng.choice(sorted(COLOURS))
        n = colours.count(colour_asked)
        count = {"kind": "count", "question": f"how many {colour_asked} shapes are there?", "answer": NUMBERS[n]}
    else:
        shape_asked = rng.choice(SHAPES)
        n = sum(s == shape_asked for _, s in scene.cells)
        count = {"kind": "count", "question": f"how many {_plural(shape_asked)} are there?", "answer": NUMBERS[n]}
    return [colour, shape, relation_q, count]


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _train_negatives(scene: GridScene, fact: Fact) -> list[dict[str, str]]:
    """The fact's binding negatives that are false for the scene, each once."""
    negatives, seen = [], set()
    for kind, negative in binding_negatives(fact).items():
        if negative not in scene.facts() and negative not in seen:
            seen.add(negative)
            negatives.append({"kind": kind, "raw": phrase(negative)})
    return negatives


def _plan(
    n_train: int, n_val: int, n_test: int, seed: int, all_statements: bool = False
) -> list[tuple[GridScene, str, list[tuple]]]:
    """(scene, split, [(fact, negatives)]) for every image, in file order. ``all_statements`` changes only the
    training captions (both directions of each neighbour pair), never the scenes."""
    rng = random.Random(seed)
    held_out = held_out_pairs(seed)
    pools = {
        "test": sorted(held_out, key=sorted),
        "val": sorted(
            (frozenset(p) for p in itertools.combinations(all_objects(), 2) if frozenset(p) not in held_out), key=sorted
        ),
    }
    planned = []
    for _ in range(n_train):
        scene = _train_scene(rng, held_out)
        captions = []
        for a, b, relation in NEIGHBOURS:
            fact = (scene.cells[a], relation, scene.cells[b])
            reverse = (scene.cells[b], REVERSE[relation], scene.cells[a])
            if rng.random() < 0.5:
                fact, reverse = reverse, fact
            captions.append((fact, _train_negatives(scene, fact)))
            if all_statements:
                captions.append((reverse, _train_negatives(scene, reverse)))
        planned.append((scene, "train", captions))
    for split, count in (("val", n_val), ("test", n_test)):
        used_facts: set[Fact] = set()  # every true statement of the split's scenes so far
        split_facts: set[Fact] = set()  # the split's captions so far
        for _ in range(count):
            scene, fact, negatives = _held_out_scene(rng, pools[split], used_facts, split_facts)
            used_facts |= scene.facts()
            split_facts.add(fact)
            planned.append((scene, split, [(fact, negatives)]))
    return planned


def generate_scenes_dataset(
    out_dir: Path | str,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    size: int = 64,
    only_split: str | None = None,
    limit: int | None = None,
    all_statements: bool = False,
) -> Path:
    """Write ``out_dir/images/*.png``, ``out_dir/dataset.json`` (Karpathy layout) and ``out_dir/questions.json``
    (``{"questions": [{"filename", "split", "kind", "question", "answer"}]}``); return the dataset's path.

    The same arguments give the same files. ``only_split`` / ``limit`` write only the first ``limit`` images of
    one split (the same files as the full run writes for them): a quick held-out subset for tests.
    ``all_statements``: each training image lists all 8 true statements (both directions of its 4 neighbour
    pairs) instead of 4, so that a trainer can tell a mined negative caption from one that is true for the
    image by its text alone (the ITM trainer does); the images and the held-out splits are the same.
    """
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    entries, questions, sentid, written = [], [], 0, 0
    for imgid, (scene, split, captions) in enumerate(_plan(n_train, n_val, n_test, seed, all_statements)):
        if only_split is not None and split != only_split:
            sentid += len(captions)
            continue
        if limit is not None and written >= limit:
            break
        written += 1
        filename = f"scene_{imgid:05d}.png"
        render_grid(scene, size, random.Random(f"{seed}:{imgid}")).save(images_dir / filename, optimize=True)
        sentences = []
        for fact, negatives in captions:
            raw = phrase(fact)
            sentences.append(
                {"raw": raw, "tokens": _tokens(raw), "imgid": imgid, "sentid": sentid, "negatives": negatives}
            )
            sentid += 1
        entries.append(
            {
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "attributes": {
                    "cells": [f"{c} {s}" for c, s in scene.cells],
                    "statements": sorted(phrase(fact) for fact in scene.facts()),
                },
            }
        )
        for asked in scene_questions(scene, random.Random(f"qa:{seed}:{imgid}")):
            questions.append({"filename": filename, "split": split, **asked})
    path = out / "dataset.json"
    path.write_text(json.dumps({"images": entries, "dataset": "shape-scenes", "seed": seed}) + "\n")
    (out / "questions.json").write_text(json.dumps({"questions": questions, "seed": seed}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/ and dataset.json)")
    parser.add_argument("--train", type=int, required=True, help="training images (4 captions each)")
    parser.add_argument("--val", type=int, default=300, help="validation images (1 caption each)")
    parser.add_argument("--test", type=int, default=1000, help="test images (1 caption each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--only-split", default=None, help="write only this split's images (train, val or test)")
    parser.add_argument("--limit", type=int, default=None, help="write at most this many images")
    parser.add_argument(
        "--all-statements", action="store_true", help="training images list all 8 true statements (for train-itm)"
    )
    args = parser.parse_args(argv)
    path = generate_scenes_dataset(
        args.out,
        args.train,
        args.val,
        args.test,
        args.seed,
        args.size,
        args.only_split,
        args.limit,
        args.all_statements,
    )
    print(f"wrote {len(json.loads(path.read_text())['images'])} images and {path}")


if __name__ == "__main__":
    main()
