"""Generate photo-sized images of printed text (signs, labels, receipts) on cluttered backgrounds, photos without
text, and queries that each name text printed in exactly one image: offline and deterministic.

Fonts are the machine's DejaVu and Liberation TrueType files (``retrieval.testing.machine_fonts``; where only one
family is installed, it alone is used). Each text photo is 1024-1600 px wide with one panel of several lines, light
or dark, rotated, pasted on a backdrop of colour fields, shapes and sensor grain. Queries are a word, a number or a
two-word phrase from one line, chosen so that its folded form (``retrieval.store.image_text.fold``: what the
search matches) occurs in that image's text and in no other's.

Two variants: ``tuning`` (the set the OCR defaults were chosen on: text 24-90 px, rotations up to 5 degrees, grain
8) and ``holdout`` (the second set they are checked on: text 20-70 px, rotations up to 8 degrees, grain 14, JPEG
quality 80).

    python scripts/make_text_photos.py --out /tmp/textset --text 40 --blank 10 --seed 0
    python scripts/make_text_photos.py --out /tmp/textset-b --text 40 --blank 10 --seed 7 --variant holdout

Importable: ``generate_text_photos(out_dir, n_text, n_blank, seed, variant)`` writes the JPEGs and
``queries.json`` (a list of {query, kind, target}) and returns the queries.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.store.image_text import fold
from retrieval.testing import cluttered_background, machine_fonts, printed_text_photo

_WORD_TEXT = """
harbour lantern bakery station pharmacy museum garden library theatre market orchard bridge castle meadow canyon
glacier volcano island lagoon forest prairie desert savanna tundra coral marble granite copper silver bronze
velvet cotton linen walnut cherry almond pepper ginger saffron vanilla cinnamon lemon orange mango papaya falcon
heron pelican otter badger beaver walrus jaguar panther zebra giraffe camel donkey rabbit turtle dolphin whale
salmon trout lobster oyster mussel squid anchor compass rudder paddle kayak canoe sailboat yacht ferry tunnel
highway avenue boulevard plaza fountain statue tower chapel temple palace cottage cabin barn stable warehouse
factory workshop studio gallery cinema stadium arena circus carnival parade festival concert opera ballet jazz
violin cello trumpet flute guitar piano drums poster ticket voucher coupon invoice receipt parcel package
envelope postcard stamp letter journal diary ledger notebook pencil marker crayon eraser ruler stapler scissors
hammer wrench chisel ladder bucket shovel rake hose sprinkler lawn hedge tulip daisy orchid lily violet jasmine"""
WORDS = _WORD_TEXT.split()
SHOPS = ["CAFE", "DINER", "KIOSK", "BISTRO", "DELI", "GROCER", "BAZAAR", "OUTLET"]


@dataclass(frozen=True)
class Strengths:
    font_px: tuple[int, int]
    max_angle: float
    grain: float
    quality: int


VARIANTS = {
    "tuning": Strengths(font_px=(24, 90), max_angle=5.0, grain=8.0, quality=90),
    "holdout": Strengths(font_px=(20, 70), max_angle=8.0, grain=14.0, quality=80),
}


def _lines(kind: str, rng: random.Random, words: list[str]) -> list[str]:
    """The text of one panel: a sign (1-2 lines), a label (2-3) or a receipt (4-6), words drawn from ``words``."""
    take = lambda: words.pop().upper() if kind == "sign" else words.pop().capitalize()  # noqa: E731
    if kind == "sign":
        return [f"{take()} {take()}", f"OPEN {rng.randint(6, 11)}-{rng.randint(17, 23)}"][: rng.randint(1, 2)]
    if kind == "label":
        return [f"{take()} {take()}", f"Lot {rng.randint(10000, 99999)}", f"{take()} {rng.randint(2, 9)}00 g"][
            : rng.randint(2, 3)
        ]
    items = [f"{take()} {rng.randint(1, 99)}.{rng.randint(0, 99):02d}" for _ in range(rng.randint(2, 4))]
    return [f"{rng.choice(SHOPS)} {take()}", *items, f"Total {rng.randint(100, 999)}.{rng.randint(0, 99):02d}"]


def _candidates(lines: list[str]) -> list[tuple[str, str]]:
    """(kind, query) a search could be asked for: words, numbers and two-word phrases of the panel."""
    found = []
    for line in lines:
        tokens = line.split()
        for token in tokens:
            kind = "number" if any(c.isdigit() for c in token) else "word"
            if len(fold(token)) >= 4:
                found.append((kind, token))
        found += [("phrase", f"{a} {b}") for a, b in zip(tokens, tokens[1:]) if not any(c.isdigit() for c in a + b)]
    return found


def generate_text_photos(out_dir: Path, n_text: int, n_blank: int, seed: int, variant: str = "tuning") -> list[dict]:
    strengths = VARIANTS[variant]
    rng = random.Random(seed)
    words = WORDS.copy()
    rng.shuffle(words)
    fonts = [f for f in machine_fonts() if "Oblique" not in f.name and "Italic" not in f.name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels: dict[str, list[str]] = {}
    for index in range(n_text):
        kind = ("sign", "label", "receipt")[index % 3]
        if len(words) < 12:
            words = [w + "s" for w in WORDS]  # plurals: still distinct, still real words
            rng.shuffle(words)
        lines = _lines(kind, rng, words)
        width = rng.randint(1024, 1600)
        size = (width, int(width * rng.choice((0.66, 0.75))))
        low, high = strengths.font_px
        high = low + (high - low) // 3 if kind == "receipt" else high  # receipts are small print
        font_px = rng.randint(low, min(high, int(size[0] * 0.9 / max(len(line) for line in lines) * 1.6)))
        image = printed_text_photo(
            lines,
            size,
            seed=seed * 10_000 + index,
            font_px=max(low, font_px),
            angle=rng.uniform(-strengths.max_angle, strengths.max_angle),
            dark_panel=rng.random() < 0.35,
            font=rng.choice(fonts),
            noise=strengths.grain,
        )
        name = f"{kind}_{index:03d}.jpg"
        image.save(out_dir / name, quality=strengths.quality)
        panels[name] = lines
    for index in range(n_blank):
        width = rng.randint(1024, 1600)
        backdrop = cluttered_background((width, int(width * 0.75)), np.random.default_rng(seed * 10_000 + 5000 + index))
        backdrop.save(out_dir / f"blank_{index:03d}.jpg", quality=strengths.quality)
    queries = _unique_queries(panels, rng)
    (out_dir / "queries.json").write_text(json.dumps(queries, indent=1))
    return queries


def _unique_queries(panels: dict[str, list[str]], rng: random.Random) -> list[dict]:
    """One query per text photo, kinds in turn, whose folded form only that photo's text holds."""
    folded = {name: "\n".join(fold(line) for line in lines) for name, lines in panels.items()}
    queries = []
    for index, (name, lines) in enumerate(panels.items()):
        wanted = ("word", "number", "phrase")[index % 3]
        options = _candidates(lines)
        rng.shuffle(options)
        options.sort(key=lambda option: option[0] != wanted)
        for kind, query in options:
            words = [fold(w) for w in query.split()]
            holders = [n for n, text in folded.items() if all(w in text for w in words)]
            if holders == [name]:
                queries.append({"query": query.lower() if kind != "number" else query, "kind": kind, "target": name})
                break
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--text", type=int, default=40, help="photos with printed text")
    parser.add_argument("--blank", type=int, default=10, help="photos without text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="tuning")
    args = parser.parse_args()
    queries = generate_text_photos(args.out, args.text, args.blank, args.seed, args.variant)
    kinds = {kind: sum(q["kind"] == kind for q in queries) for kind in ("word", "number", "phrase")}
    print(f"{args.text + args.blank} photos in {args.out}; {len(queries)} queries {kinds}")


if __name__ == "__main__":
    main()
