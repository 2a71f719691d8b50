"""Generate a captioned image set of coloured shapes in Karpathy-JSON layout, offline and deterministic.

Each image shows one shape (shape, colour, size, position) on a plain background; each gets several captions
in different phrasings. Every caption names the shape, colour, size and position (the *key*); the background
is named in some phrasings only. Images in the val and test splits each have a distinct key within their
split, so every held-out caption describes exactly one image of its split and recall@k is well defined.
The train split draws keys at random (duplicates allowed: that is what real data looks like).

    python scripts/make_shapes_dataset.py --out data/samples --images 300 --seed 7 --val 0 --test 200

Importable: ``generate_shapes_dataset(out_dir, n_images, seed, ...)`` is what ``main`` calls.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "blue": (35, 80, 220),
    "purple": (130, 50, 180),
    "pink": (250, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
}
# Shape diameter as a fraction of the image side; the ranges do not overlap.
SIZES: dict[str, tuple[float, float]] = {"small": (0.18, 0.23), "medium": (0.30, 0.35), "large": (0.44, 0.50)}
# Centre of each position as fractions of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.22, 0.5),
    "right": (0.78, 0.5),
    "top": (0.5, 0.22),
    "bottom": (0.5, 0.78),
    "top left": (0.22, 0.22),
    "top right": (0.78, 0.22),
    "bottom left": (0.22, 0.78),
    "bottom right": (0.78, 0.78),
}
SIZE_WORDS = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium", "medium-sized"),
    "large": ("large", "big"),
}
CAPTIONS_PER_IMAGE = 5
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeScene:
    """The attributes of one image; ``key`` is what every caption names."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.position)


def all_keys() -> list[tuple[str, str, str, str]]:
    return [(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS]


def _where(position: str, rng: random.Random) -> str:
    """A prepositional phrase for a position: 'on the left', 'in the top left corner', 'in the middle'."""
    if position == "center":
        return rng.choice(("in the center", "in the middle", "at the center"))
    if " " in position:
        return rng.choice((f"in the {position} corner", f"at the {position}", f"in the {position}"))
    if position in ("left", "right"):
        return rng.choice((f"on the {position}", f"on the {position} side", f"at the {position}"))
    return rng.choice((f"at the {position}", f"near the {position}", f"along the {position}"))


def _short_where(position: str, rng: random.Random) -> str:
    if position == "center":
        return rng.choice(("center", "middle"))
    if " " in position:
        return rng.choice((position, position.replace(" ", "-"), f"{position} corner"))
    return rng.choice((position, f"{position} side"))


def captions_for(scene: ShapeScene, rng: random.Random, count: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``count`` captions in distinct phrasings; all name the key, some the background."""
    s = scene
    size = rng.choice(SIZE_WORDS[s.size])
    bg = s.background

    def a(word: str) -> str:
        return f"an {word}" if word[0] in "aeiou" else f"a {word}"

    templates = [
        lambda: f"{a(size)} {s.colour} {s.shape} {_where(s.position, rng)} of {a(bg)} background",
        lambda: f"{s.colour} {s.shape}, {size}, {_short_where(s.position, rng)}",
        lambda: f"a picture of {a(size)} {s.colour} {s.shape} {_where(s.position, rng)}",
        lambda: f"{_short_where(s.position, rng)}: {a(s.colour)} {s.shape} that is {size}",
        lambda: f"there is {a(size)} {s.shape} coloured {s.colour} {_where(s.position, rng)} of the image",
        lambda: f"{bg} background with {a(size)} {s.colour} {s.shape} {_where(s.position, rng)}",
        lambda: f"{a(s.colour)} {s.shape} {_where(s.position, rng)}, {size}, on {bg}",
        lambda: f"{size} {s.colour} {s.shape} {_where(s.position, rng)}",
    ]
    chosen = rng.sample(range(len(templates)), count)
    return [templates[i]() for i in chosen]


def _polygon(n: int, cx: float, cy: float, r: float, angle: float, inner: float | None = None) -> list[tuple]:
    """Vertices of a regular polygon (or a star when ``inner`` gives the inner radius ratio)."""
    points = []
    steps = 2 * n if inner else n
    for i in range(steps):
        radius = r * inner if inner and i % 2 else r
        theta = angle - math.pi / 2 + 2 * math.pi * i / steps
        points.append((cx + radius * math.cos(theta), cy + radius * math.sin(theta)))
    return points


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    """One filled shape of radius ``r`` centred at (cx, cy); shared with the multi-shape scene generator."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(4, cx, cy, r * 1.2, angle + math.pi / 4), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(4, cx, cy, r * 1.05, angle), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(3, cx, cy + r * 0.15, r * 1.1, angle), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(5, cx, cy, r * 1.1, angle, inner=0.45), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(6, cx, cy, r, angle), fill=fill)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r, angle), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _cross(cx: float, cy: float, r: float, angle: float, arm: float = 0.36) -> list[tuple]:
    """A plus sign: twelve corners, arms ``arm * r`` wide each side of the centre lines."""
    outline = [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1)]
    outline += [(-x, -y) for x, y in outline]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in outline]


def render_scene(scene: ShapeScene, size_px: int, rng: random.Random) -> Image.Image:
    """Draw the scene anti-aliased (supersampled), with small jitter in place, size, angle and colour."""
    side = size_px * SUPERSAMPLE
    image = Image.new("RGB", (side, side), _jitter(BACKGROUNDS[scene.background], rng, 8))
    draw = ImageDraw.Draw(image)
    r = side * rng.uniform(*SIZES[scene.size]) / 2
    fx, fy = POSITIONS[scene.position]
    cx = side * (fx + rng.uniform(-0.04, 0.04))
    cy = side * (fy + rng.uniform(-0.04, 0.04))
    cx, cy = min(max(cx, r), side - r), min(max(cy, r), side - r)
    fill = _jitter(COLOURS[scene.colour], rng, 15)
    angle = math.radians(rng.uniform(-12, 12))
    draw_shape(draw, scene.shape, cx, cy, r, angle, fill)
    return image.resize((size_px, size_px), Image.Resampling.LANCZOS)


def _scenes(n_images: int, n_val: int, n_test: int, rng: random.Random) -> list[tuple[ShapeScene, str]]:
    """Scenes with their split: val and test keys distinct within each split, train keys at random."""
    keys = all_keys()
    for name, count in (("val", n_val), ("test", n_test)):
        if count > len(keys):
            raise ValueError(f"at most {len(keys)} {name} images (one per distinct shape key), not {count}")
    if n_val + n_test > n_images:
        raise ValueError(f"--val {n_val} + --test {n_test} is more than --images {n_images}")
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (n_images - n_val - n_test)
    unique_keys = {"val": rng.sample(keys, n_val), "test": rng.sample(keys, n_test)}
    scenes = []
    for split in splits:
        key = unique_keys[split].pop() if split in unique_keys else rng.choice(keys)
        scenes.append((ShapeScene(*key, background=rng.choice(list(BACKGROUNDS))), split))
    rng.shuffle(scenes)
    return scenes


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def generate_shapes_dataset(
    out_dir: Path | str,
    n_images: int,
    seed: int = 0,
    size: int = 64,
    n_val: int | None = None,
    n_test: int | None = None,
    image_format: str = "png",
) -> Path:
    """Write ``out_dir/images/*`` and ``out_dir/dataset.json`` (Karpathy layout); return the JSON path.

    ``n_val`` / ``n_test`` default to a tenth of the images each. The same arguments give the same files.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError("image_format must be png or jpg")
    n_val = n_images // 10 if n_val is None else n_val
    n_test = n_images // 10 if n_test is None else n_test
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries = []
    sentid = 0
    for imgid, (scene, split) in enumerate(_scenes(n_images, n_val, n_test, rng)):
        image_rng = random.Random(f"{seed}:{imgid}")
        filename = f"shape_{imgid:05d}.{image_format}"
        image = render_scene(scene, size, image_rng)
        if image_format == "jpg":
            image.save(images_dir / filename, quality=92)
        else:
            image.save(images_dir / filename, optimize=True)
        sentences = []
        for raw in captions_for(scene, image_rng):
            sentences.append({"raw": raw, "tokens": _tokens(raw), "imgid": imgid, "sentid": sentid})
            sentid += 1
        entries.append(
            {
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "attributes": {
                    "shape": scene.shape,
                    "colour": scene.colour,
                    "size": scene.size,
                    "position": scene.position,
                    "background": scene.background,
                },
            }
        )
    path = out / "dataset.json"
    path.write_text(json.dumps({"images": entries, "dataset": "shapes"}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/ and dataset.json)")
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--val", type=int, default=None, help="val images (default: a tenth)")
    parser.add_argument("--test", type=int, default=None, help="test images (default: a tenth)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    args = parser.parse_args(argv)
    try:
        path = generate_shapes_dataset(args.out, args.images, args.seed, args.size, args.val, args.test, args.format)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.images} images and {path}")


if __name__ == "__main__":
    main()
