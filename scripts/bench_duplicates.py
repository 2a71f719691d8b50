"""Precision and recall of near-duplicate grouping on a generated set (scripts/make_duplicates_set.py).

Generates originals with re-encoded, resized, cropped and EXIF-rotated copies plus distinct near-misses, indexes
them with a model, and scores ``retrieval.search.duplicates`` over every pair of files: precision = share of the
pairs put in one group that truly belong together, recall = share of the true pairs put in one group. Prints the
cosine and pixel margins per kind of pair, a row per cosine threshold and linkage (pixel threshold at its
default), a row per pixel threshold (cosine at its default), and the default ``find_duplicates`` call: its
precision, recall, how often the original leads its group, and its time.

    python scripts/bench_duplicates.py                                     # tuning set, seed 1 (800 files)
    python scripts/bench_duplicates.py --variant holdout --seed 11         # the other set (700 files)
    python scripts/bench_duplicates.py --model vit-b-32-random             # a seeded random-weight ViT-B-32
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.pipeline import IndexSettings, index_paths  # noqa: E402
from retrieval.model.spec import ModelSpec  # noqa: E402
from retrieval.search.duplicate_defaults import DEFAULT_PIXEL_THRESHOLD, DEFAULT_THRESHOLD  # noqa: E402
from retrieval.search.duplicate_pairs import EXACT_PAIRS_LIMIT  # noqa: E402
from retrieval.search.duplicates import LINKAGES, best_first_key, candidate_pairs, find_duplicates, link_pairs  # noqa: E402
from retrieval.store.catalog import Catalog  # noqa: E402
from retrieval.store.layout import IndexLayout  # noqa: E402
from retrieval.testing import load_script  # noqa: E402

SHAPES_MODEL = ROOT / "data" / "models" / "shapes-clip"
THRESHOLDS = (0.70, 0.80, 0.85, 0.90, 0.95, 0.98, 0.99)
PIXEL_THRESHOLDS = (0.80, 0.85, 0.87, 0.89, 0.91, 0.93, 0.95)


def model_spec(name: str, scratch: Path) -> ModelSpec:
    if name == "shapes":
        return ModelSpec(f"local-dir:{SHAPES_MODEL}", None)
    if name == "vit-b-32-random":
        import open_clip

        from retrieval.testing import make_random_model_dir

        folder = make_random_model_dir(scratch / "vit-b-32-random", open_clip.get_model_config("ViT-B-32"), seed=0)
        return ModelSpec(f"local-dir:{folder}", None)
    return ModelSpec(name, None)


def pair_set(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(pair)) for group in groups for pair in itertools.combinations(group, 2)}


def score(predicted: set, true: set) -> tuple[float, float]:
    hits = len(predicted & true)
    return (hits / len(predicted) if predicted else 1.0), (hits / len(true) if true else 1.0)


def true_groups(truth: dict[str, str]) -> list[list[str]]:
    by_label: dict[str, list[str]] = {}
    for name, label in truth.items():
        by_label.setdefault(label, []).append(name)
    return list(by_label.values())


def kind(name: str) -> str:
    """original, a copy's kind (q70, half, crop, exif) or miss_<kind>, from the generator's file names."""
    stem = name.removesuffix(".jpg")
    if "_miss_" in stem:
        return "miss_" + stem.split("_miss_")[1]
    parts = stem.split("_")
    return parts[2] if len(parts) > 2 else "original"


def margins(names: dict[int, str], truth: dict[str, str], pairs) -> list[str]:
    """Per kind of pair among the files of one scene: the lowest cosine and pixel similarity of true pairs, the
    highest of near-miss pairs (pairs below the lowest cosine threshold count as 0: never compared)."""
    cosine, pixels = {}, {}
    for a, b, cos, pix in zip(pairs.first.tolist(), pairs.second.tolist(), pairs.cosine, pairs.pixels):
        cosine[(a, b)], pixels[(a, b)] = float(cos), float(pix)
    by_scene: dict[str, list[int]] = {}
    for image_id, name in names.items():
        by_scene.setdefault(name[:10], []).append(image_id)
    found: dict[str, list[tuple[float, float]]] = {}
    for members in by_scene.values():
        for a, b in itertools.combinations(sorted(members), 2):
            same = truth[names[a]] == truth[names[b]]
            kinds = sorted((kind(names[a]), kind(names[b])))
            if not same and all(k.startswith("miss") for k in kinds):
                continue
            label = ("copy " if same else "miss ") + "/".join(kinds)
            found.setdefault(label, []).append((cosine.get((a, b), 0.0), pixels.get((a, b), 0.0)))
    lines = []
    for label in sorted(found):
        values = np.array(found[label])
        pick = values.min(axis=0) if label.startswith("copy") else values.max(axis=0)
        word = "lowest " if label.startswith("copy") else "highest"
        lines.append(f"  {label:<28} {word} cosine {pick[0]:.4f}  pixels {pick[1]:.4f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="shapes, vit-b-32-random, or an open_clip name")
    parser.add_argument("--originals", type=int, default=100, help="scenes; each makes 8 files")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variant", default="tuning", help="make_duplicates_set.py variant: tuning or holdout")
    parser.add_argument("--workdir", type=Path, help="keep the set and index here (reused when present)")
    parser.add_argument(
        "--exact-limit", type=int, default=EXACT_PAIRS_LIMIT, help="0: the streamed pass a large collection takes"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-dups-") as temporary:
        scratch = args.workdir or Path(temporary)
        photos = scratch / "photos"
        if (photos / "truth.json").is_file():
            truth = json.loads((photos / "truth.json").read_text())
        else:
            truth = load_script("make_duplicates_set").generate_duplicate_set(
                photos, args.originals, args.seed, args.variant
            )
        spec = model_spec(args.model, scratch)
        started = time.perf_counter()
        index_paths(scratch / "index", [photos], IndexSettings(model=spec, workers=0), progress=False)
        print(f"model {args.model}: indexed {len(truth)} files in {time.perf_counter() - started:.1f} s")

        catalog = Catalog(IndexLayout(scratch / "index").catalog)
        try:
            ids = np.concatenate([batch_ids for batch_ids, _ in catalog.iter_embeddings()])
            rows = catalog.rows_by_id(ids.tolist())
            names = {int(i): Path(rows[int(i)].path).name for i in ids}
            true_pairs = pair_set(true_groups(truth))
            print(f"{len(names)} files, {len(true_pairs)} true pairs\n")
            pairs = candidate_pairs(catalog, min(THRESHOLDS), args.exact_limit)
            print("\n".join(margins(names, truth, pairs)))
            keys = {image_id: best_first_key(row) for image_id, row in rows.items()}

            def scored(keep: np.ndarray, linkage: str) -> str:
                groups = link_pairs(pairs.first[keep], pairs.second[keep], keys, linkage)
                precision, recall = score(pair_set([[names[p] for p in g] for g in groups]), true_pairs)
                return f"{precision:9.4f} {recall:9.4f}"

            print(f"\npixels >= {DEFAULT_PIXEL_THRESHOLD}; cosine at or above:")
            print(f"{'cosine':>9}  " + "  ".join(f"{f'{k} P':>9} {f'{k} R':>9}" for k in LINKAGES))
            for threshold in THRESHOLDS:
                keep = (pairs.cosine >= threshold) & (pairs.pixels >= DEFAULT_PIXEL_THRESHOLD)
                print(f"{threshold:9.2f}  " + "  ".join(scored(keep, linkage) for linkage in LINKAGES))
            print(f"\ncosine >= {DEFAULT_THRESHOLD}; pixels at or above:")
            print(f"{'pixels':>9}  " + "  ".join(f"{f'{k} P':>9} {f'{k} R':>9}" for k in LINKAGES))
            for threshold in PIXEL_THRESHOLDS:
                keep = (pairs.cosine >= DEFAULT_THRESHOLD) & (pairs.pixels >= threshold)
                print(f"{threshold:9.2f}  " + "  ".join(scored(keep, linkage) for linkage in LINKAGES))

            started = time.perf_counter()
            groups = find_duplicates(catalog)
            took = time.perf_counter() - started
            found = pair_set([[Path(m.path).name for m in g.members] for g in groups])
            precision, recall = score(found, true_pairs)
            kept = sum(kind(Path(g.best.path).name) in ("original", "exif") for g in groups)
            print(
                f"\nfind_duplicates (defaults: cosine {DEFAULT_THRESHOLD}, pixels {DEFAULT_PIXEL_THRESHOLD}): "
                f"{len(groups)} groups, precision {precision:.4f}, recall {recall:.4f}, original (or its EXIF twin) "
                f"kept in {kept}/{len(groups)}, {took * 1000:.0f} ms"
            )
            print(json.dumps({"model": args.model, "variant": args.variant, "seed": args.seed, "precision": precision,
                              "recall": recall, "groups": len(groups), "kept_original": kept,
                              "ms": round(took * 1000)}))  # fmt: skip
        finally:
            catalog.close()


if __name__ == "__main__":
    main()
