"""Generate a near-duplicate test set of coloured-shape photos, with the true grouping, offline and deterministic.

Each original (a JPEG of one shape on a plain background, the scenes of ``make_shapes_dataset.py``) comes with
four copies a duplicate finder must group with it (strengths of the ``tuning`` variant, ``holdout`` in brackets):

- ``q70``: re-encoded at JPEG quality 70 [55];
- ``half``: resized to half the side [0.4];
- ``crop``: 2% cut from every edge [3.5%];
- ``exif``: pixels stored rotated with EXIF orientation 6 [8], so it displays (and indexes) upright;

and near-misses it must keep apart (distinct photos, each in a group of its own):

- ``shape``: the same scene with another shape (same colour, size, place, background and jitter);
- ``colour``: the same scene with the shape in another colour;
- ``shift``: the same scene framed 12% further right (the camera panned);
- ``background``: the same scene on another background colour (``holdout`` only).

``tuning`` (256 px, near-misses shape, colour and shift) is the set the defaults were chosen on; ``holdout``
(320 px originals at quality 90, other copy strengths, near-misses colour and background: one colour changed) is
the second set they are checked on. Originals have distinct attribute keys, near-misses included, so no two
scenes are accidentally the same picture.

    python scripts/make_duplicates_set.py --out /tmp/dups --originals 100 --seed 0
    python scripts/make_duplicates_set.py --out /tmp/dups-b --originals 100 --seed 11 --variant holdout

Importable: ``generate_duplicate_set(out_dir, n_originals, seed, variant)`` writes the files and ``truth.json``
(relative path -> group label) and returns the truth.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from retrieval.testing import load_script

SHIFT = 0.12  # the shifted near-miss moves the frame by this share of its side
COPIES = ("q70", "half", "crop", "exif")
EXIF_ORIENTATION = 0x0112
# The stored pixels for an EXIF orientation, so that the tag turns them back upright.
STORED_FOR = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}


@dataclass(frozen=True)
class Variant:
    """How a set is made: the originals' side and quality, the copies' strengths and the near-miss kinds."""

    side: int
    original_quality: int
    quality: int  # the re-encoded copy (file name q70 in both variants)
    scale: float  # the resized copy's side, as a share of the original's
    crop: float  # cut from every edge of the cropped copy
    orientation: int  # EXIF orientation of the rotated copy
    near_misses: tuple[str, ...]


VARIANTS = {
    "tuning": Variant(256, 95, 70, 0.5, 0.02, 6, ("shape", "colour", "shift")),
    "holdout": Variant(320, 90, 55, 0.4, 0.035, 8, ("colour", "background")),
}
NEAR_MISSES = ("shape", "colour", "shift", "background")


shapes = load_script("make_shapes_dataset")


def _frame(scene, seed: str, side: int, shift: float = 0.0) -> Image.Image:
    """The scene drawn with the jitter of ``seed``; ``shift`` pans the frame right by that share of its side (the
    content moves left, the plain background fills in)."""
    image = shapes.render_scene(scene, side, random.Random(seed))
    if not shift:
        return image
    panned = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    panned.paste(image, (-int(round(shift * side)), 0))
    return panned


def _scenes(n_originals: int, rng: random.Random) -> list[tuple]:
    """(original, other-shape, other-colour, other-background) scenes whose keys, background included, are all
    distinct."""
    used: set[tuple] = set()
    triples = []
    keys = shapes.all_keys()
    backgrounds = list(shapes.BACKGROUNDS)
    while len(triples) < n_originals:
        shape, colour, size, position = rng.choice(keys)
        background = rng.choice(backgrounds)
        other_shape = rng.choice([s for s in shapes.SHAPES if s != shape])
        other_colour = rng.choice([c for c in shapes.COLOURS if c != colour])
        other_background = rng.choice([b for b in backgrounds if b != background])
        scenes = (
            shapes.ShapeScene(shape, colour, size, position, background),
            shapes.ShapeScene(other_shape, colour, size, position, background),
            shapes.ShapeScene(shape, other_colour, size, position, background),
            shapes.ShapeScene(shape, colour, size, position, other_background),
        )
        found = {(s.key, s.background) for s in scenes}
        if len(found) < len(scenes) or found & used:
            continue
        used |= found
        triples.append(scenes)
    return triples


def _save_copies(original: Image.Image, folder: Path, name: str, variant: Variant) -> list[str]:
    side = variant.side
    files = {f"{name}.jpg": (original, {"quality": variant.original_quality})}
    files[f"{name}_q70.jpg"] = (original, {"quality": variant.quality})
    small = round(side * variant.scale)
    files[f"{name}_half.jpg"] = (original.resize((small, small), Image.Resampling.LANCZOS), {"quality": 90})
    cut = round(side * variant.crop)
    files[f"{name}_crop.jpg"] = (original.crop((cut, cut, side - cut, side - cut)), {"quality": 90})
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = variant.orientation
    stored = original.transpose(STORED_FOR[variant.orientation])  # the tag turns it back upright
    files[f"{name}_exif.jpg"] = (stored, {"quality": 88, "exif": exif.tobytes()})
    for filename, (image, options) in files.items():
        image.save(folder / filename, **options)
    return list(files)


def generate_duplicate_set(
    out_dir: Path | str, n_originals: int, seed: int = 0, variant: str = "tuning"
) -> dict[str, str]:
    """Write ``n_originals`` x (1 original + 4 copies + the variant's near-misses) JPEGs and ``truth.json``; return
    the truth (file name -> group label: an original and its copies share one, each near-miss has its own)."""
    made = VARIANTS[variant]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth: dict[str, str] = {}
    for number, (scene, *others) in enumerate(_scenes(n_originals, random.Random(seed))):
        name = f"scene_{number:04d}"
        jitter = f"{seed}:{number}"
        for filename in _save_copies(_frame(scene, jitter, made.side), out, name, made):
            truth[filename] = name
        other_shape, other_colour, other_background = others
        drawn = {"shape": (other_shape, 0.0), "colour": (other_colour, 0.0), "shift": (scene, SHIFT),
                 "background": (other_background, 0.0)}  # fmt: skip
        for kind in made.near_misses:
            filename = f"{name}_miss_{kind}.jpg"
            what, shift = drawn[kind]
            _frame(what, jitter, made.side, shift).save(out / filename, quality=made.original_quality)
            truth[filename] = f"{name}_miss_{kind}"
    (out / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return truth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (JPEGs and truth.json)")
    parser.add_argument("--originals", type=int, default=100, help="number of original scenes (7 or 8 files each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="tuning", help="copy strengths, near-misses")
    args = parser.parse_args(argv)
    truth = generate_duplicate_set(args.out, args.originals, args.seed, args.variant)
    print(f"wrote {len(truth)} images and {args.out / 'truth.json'}")


if __name__ == "__main__":
    main()
