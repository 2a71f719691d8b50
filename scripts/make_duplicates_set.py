"""Generate a near-duplicate test set of coloured-shape photos, with the true grouping, offline and deterministic.

Each original (a 256 px JPEG of one shape on a plain background, the scenes of ``make_shapes_dataset.py``) comes
with four copies a duplicate finder must group with it:

- ``q70``: re-encoded at JPEG quality 70;
- ``half``: resized to half the side;
- ``crop``: 2% cut from every edge;
- ``exif``: pixels stored rotated by 90 degrees with EXIF orientation 6, so it displays (and indexes) upright;

and three near-misses it must keep apart (distinct photos, each in a group of its own):

- ``shape``: the same scene with another shape (same colour, size, place, background and jitter);
- ``colour``: the same scene with the shape in another colour;
- ``shift``: the same scene framed 12% further right (the camera panned).

Originals have distinct attribute keys, near-misses included, so no two scenes are accidentally the same picture.

    python scripts/make_duplicates_set.py --out /tmp/dups --originals 100 --seed 0

Importable: ``generate_duplicate_set(out_dir, n_originals, seed)`` writes the files and ``truth.json`` (relative
path -> group label) and returns the truth.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from retrieval.testing import load_script

SIDE = 256
SHIFT = 0.12  # the shifted near-miss moves the frame by this share of its side
COPIES = ("q70", "half", "crop", "exif")
NEAR_MISSES = ("shape", "colour", "shift")
EXIF_ORIENTATION = 0x0112


shapes = load_script("make_shapes_dataset")


def _frame(scene, seed: str, shift: float = 0.0) -> Image.Image:
    """The scene drawn with the jitter of ``seed``; ``shift`` pans the frame right by that share of its side (the
    content moves left, the plain background fills in)."""
    image = shapes.render_scene(scene, SIDE, random.Random(seed))
    if not shift:
        return image
    panned = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    panned.paste(image, (-int(round(shift * SIDE)), 0))
    return panned


def _scenes(n_originals: int, rng: random.Random) -> list[tuple]:
    """(original, other-shape, other-colour) scene triples whose keys, background included, are all distinct."""
    used: set[tuple] = set()
    triples = []
    keys = shapes.all_keys()
    backgrounds = list(shapes.BACKGROUNDS)
    while len(triples) < n_originals:
        shape, colour, size, position = rng.choice(keys)
        background = rng.choice(backgrounds)
        other_shape = rng.choice([s for s in shapes.SHAPES if s != shape])
        other_colour = rng.choice([c for c in shapes.COLOURS if c != colour])
        scenes = (
            shapes.ShapeScene(shape, colour, size, position, background),
            shapes.ShapeScene(other_shape, colour, size, position, background),
            shapes.ShapeScene(shape, other_colour, size, position, background),
        )
        found = {(s.key, s.background) for s in scenes}
        if len(found) < 3 or found & used:
            continue
        used |= found
        triples.append(scenes)
    return triples


def _save_copies(original: Image.Image, folder: Path, name: str) -> list[str]:
    files = {f"{name}.jpg": (original, {"quality": 95}), f"{name}_q70.jpg": (original, {"quality": 70})}
    files[f"{name}_half.jpg"] = (original.resize((SIDE // 2, SIDE // 2), Image.Resampling.LANCZOS), {"quality": 90})
    cut = round(SIDE * 0.02)
    files[f"{name}_crop.jpg"] = (original.crop((cut, cut, SIDE - cut, SIDE - cut)), {"quality": 90})
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display = stored pixels turned 90 degrees clockwise
    stored = original.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise, undone by the tag
    files[f"{name}_exif.jpg"] = (stored, {"quality": 88, "exif": exif.tobytes()})
    for filename, (image, options) in files.items():
        image.save(folder / filename, **options)
    return list(files)


def generate_duplicate_set(out_dir: Path | str, n_originals: int, seed: int = 0) -> dict[str, str]:
    """Write ``n_originals`` x (1 original + 4 copies + 3 near-misses) JPEGs and ``truth.json``; return the truth
    (file name -> group label: an original and its copies share one, each near-miss has its own)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth: dict[str, str] = {}
    for number, (scene, other_shape, other_colour) in enumerate(_scenes(n_originals, random.Random(seed))):
        name = f"scene_{number:04d}"
        jitter = f"{seed}:{number}"
        for filename in _save_copies(_frame(scene, jitter), out, name):
            truth[filename] = name
        misses = {
            "shape": _frame(other_shape, jitter),
            "colour": _frame(other_colour, jitter),
            "shift": _frame(scene, jitter, SHIFT),
        }
        for kind, image in misses.items():
            filename = f"{name}_miss_{kind}.jpg"
            image.save(out / filename, quality=95)
            truth[filename] = f"{name}_miss_{kind}"
    (out / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return truth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (JPEGs and truth.json)")
    parser.add_argument("--originals", type=int, default=100, help="number of original scenes (8 files each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    truth = generate_duplicate_set(args.out, args.originals, args.seed)
    print(f"wrote {len(truth)} images and {args.out / 'truth.json'}")


if __name__ == "__main__":
    main()
