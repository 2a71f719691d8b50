"""Precision and recall of near-duplicate grouping on a generated set (scripts/make_duplicates_set.py).

Generates originals with re-encoded, resized, cropped-2% and EXIF-rotated copies plus distinct near-misses,
indexes them with a model, and scores ``retrieval.search.duplicates`` over every pair of files: precision = share
of the pairs put in one group that truly belong together, recall = share of the true pairs put in one group.
Prints a row per threshold and linkage, the similarity margins, and the time of one ``find_duplicates`` call.

    python scripts/bench_duplicates.py                          # bundled shapes model, 100 originals (800 files)
    python scripts/bench_duplicates.py --model vit-b-32-random  # a seeded random-weight ViT-B-32 instead
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
from retrieval.search.duplicates import LINKAGES, find_duplicates, link_pairs, similar_pairs  # noqa: E402
from retrieval.store.catalog import Catalog  # noqa: E402
from retrieval.store.layout import IndexLayout  # noqa: E402
from retrieval.testing import load_script  # noqa: E402

SHAPES_MODEL = ROOT / "data" / "models" / "shapes-clip"
THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)


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


def margins(names: list[str], vectors: np.ndarray, truth: dict[str, str]) -> dict[str, float]:
    """The lowest similarity inside a true group, and the highest between an original and each kind of near-miss
    (and between any two files of different groups)."""
    position = {name: i for i, name in enumerate(names)}
    sims = vectors @ vectors.T
    labels = np.array([truth[name] for name in names])
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    other = labels[:, None] != labels[None, :]
    found = {"lowest true pair": float(sims[same].min()), "highest other pair": float(sims[other].max())}
    for kind in ("shape", "colour", "shift"):
        pairs = [
            (position[name], position[name.replace(".jpg", f"_miss_{kind}.jpg")])
            for name in names
            if "_miss_" not in name and truth[name] == name.removesuffix(".jpg")
        ]
        found[f"highest {kind} near-miss"] = float(max(sims[a, b] for a, b in pairs))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="shapes, vit-b-32-random, or an open_clip name")
    parser.add_argument("--originals", type=int, default=100, help="scenes; each makes 8 files")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.95, help="the threshold timed with find_duplicates")
    parser.add_argument("--workdir", type=Path, help="keep the set and index here (reused when present)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-dups-") as temporary:
        scratch = args.workdir or Path(temporary)
        photos = scratch / "photos"
        if (photos / "truth.json").is_file():
            truth = json.loads((photos / "truth.json").read_text())
        else:
            truth = load_script("make_duplicates_set").generate_duplicate_set(photos, args.originals, args.seed)
        spec = model_spec(args.model, scratch)
        started = time.perf_counter()
        index_paths(scratch / "index", [photos], IndexSettings(model=spec, workers=0), progress=False)
        print(f"model {args.model}: indexed {len(truth)} files in {time.perf_counter() - started:.1f} s")

        catalog = Catalog(IndexLayout(scratch / "index").catalog)
        try:
            batches = list(catalog.iter_embeddings())
            ids = np.concatenate([b[0] for b in batches])
            vectors = np.concatenate([b[1] for b in batches])
            rows = catalog.rows_by_id(ids.tolist())
            names = [Path(rows[int(i)].path).name for i in ids]
            true_pairs = pair_set(true_groups(truth))
            print(f"{len(names)} files, {len(true_pairs)} true pairs\n")
            for name, value in margins(names, vectors, truth).items():
                print(f"  {name:<26} {value:.4f}")
            first, second, sims = similar_pairs(vectors, min(THRESHOLDS))
            keys = {pos: (-(rows[int(ids[pos])].width or 0) * (rows[int(ids[pos])].height or 0),
                          -rows[int(ids[pos])].size, names[pos]) for pos in range(len(ids))}  # fmt: skip
            print(f"\n{'threshold':>9}  " + "  ".join(f"{f'{k} P':>9} {f'{k} R':>9}" for k in LINKAGES))
            for threshold in THRESHOLDS:
                keep = sims >= threshold
                cells = []
                for linkage in LINKAGES:
                    groups = link_pairs(first[keep], second[keep], keys, linkage)
                    precision, recall = score(pair_set([[names[p] for p in g] for g in groups]), true_pairs)
                    cells.append(f"{precision:9.4f} {recall:9.4f}")
                print(f"{threshold:9.2f}  " + "  ".join(cells))

            started = time.perf_counter()
            groups = find_duplicates(catalog, args.threshold)
            took = time.perf_counter() - started
            found = pair_set([[Path(m.path).name for m in g.members] for g in groups])
            precision, recall = score(found, true_pairs)
            originals_first = sum(truth[Path(g.best.path).name] == Path(g.best.path).stem for g in groups)
            print(
                f"\nfind_duplicates(threshold={args.threshold}): {len(groups)} groups, precision {precision:.4f}, "
                f"recall {recall:.4f}, original first in {originals_first}/{len(groups)}, {took * 1000:.0f} ms"
            )
            print(json.dumps({"model": args.model, "threshold": args.threshold, "precision": precision,
                              "recall": recall, "groups": len(groups), "ms": round(took * 1000)}))  # fmt: skip
        finally:
            catalog.close()


if __name__ == "__main__":
    main()
