"""What the int8 image tower (dynamic, per channel: ``indexer.image_export``) costs in recall, against float32.

    python scripts/bench_image_int8.py                        # bundled shapes set + ViT-B-32 on generated JPEGs
    python scripts/bench_image_int8.py --shapes-dir DIR       # another shapes set (scripts/make_shapes_dataset.py)

  shapes     R@1 / R@5 text-to-image on a captioned shapes set with the bundled shapes-clip model, image vectors
             from the float32 and the int8 graph (text vectors from the same torch text tower), and the mean
             top-10 overlap of every caption's results between the two
  vit-b-32   mean top-10 overlap of the probe text queries (retrieval.store.tuning.probe_texts) over N generated
             500x375 JPEGs (seeded random weights: the arithmetic of a trained ViT-B-32, not its semantics), and the
             mean cosine int8 vs float32
Both models' towers are exported (once, into the per-user cache) when missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tower(spec, folder: Path):
    """The model's cached image tower, exported first (an index of a few of ``folder``'s images) when missing."""
    from indexer.image_export import export_image_tower
    from indexer.pipeline import IndexSettings, index_paths
    from retrieval.model.image_onnx import cached_image_tower
    from retrieval.model.spec import spec_key

    tower = cached_image_tower(spec_key(spec, check=False))
    if not tower.current or not tower.has_int8:
        index_dir = Path(tempfile.mkdtemp(prefix="bench-int8-"))
        index_paths(index_dir, [folder], IndexSettings(model=spec, device="cpu", export_text=False), progress=False)
        export_image_tower(index_dir)
        tower = cached_image_tower(spec_key(spec, check=False))
    assert tower.current and tower.has_int8, tower.problem or "the export kept no int8 graph"
    return tower


def _encode_files(encoder, paths: list[Path]) -> np.ndarray:
    from retrieval.images import load_image

    out = []
    for start in range(0, len(paths), 32):
        images = [load_image(path, encoder.side) for path in paths[start : start + 32]]
        out.append(encoder.encode_pil(images))
    return np.concatenate(out)


def _overlap(texts: np.ndarray, a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    top_a = np.argsort(-(texts @ a.T), axis=1)[:, :k]
    top_b = np.argsort(-(texts @ b.T), axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)]))


def shapes(shapes_dir: Path) -> dict:
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec

    spec = ModelSpec(f"local-dir:{ROOT / 'data' / 'models' / 'shapes-clip'}", None)
    data = json.loads((shapes_dir / "dataset.json").read_text())
    paths = [shapes_dir / "images" / image["filename"] for image in data["images"]]
    captions = [(i, s["raw"]) for i, image in enumerate(data["images"]) for s in image["sentences"]]
    tower = _tower(spec, shapes_dir / "images")
    texts = Encoder.load_text_only(spec).encode_texts([text for _, text in captions])
    owners = np.array([owner for owner, _ in captions])
    result = {"set": str(shapes_dir), "images": len(paths), "captions": len(captions)}
    vectors = {}
    for name, int8 in (("float32", False), ("int8", True)):
        vectors[name] = _encode_files(tower.open(int8=int8), paths)
        ranks = np.argsort(-(texts @ vectors[name].T), axis=1)
        result[f"{name}_r1"] = round(float(np.mean(ranks[:, 0] == owners)), 4)
        result[f"{name}_r5"] = round(float(np.mean([owner in row[:5] for owner, row in zip(owners, ranks)])), 4)
    result["top10_overlap"] = round(_overlap(texts, vectors["float32"], vectors["int8"]), 4)
    return result


def vit_b_32(count: int) -> dict:
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec
    from retrieval.store.tuning import probe_texts
    from scripts.bench_index import CACHE, SETS, ensure_model, ensure_photos

    spec = ModelSpec(ensure_model(None), None)
    width, height, name = SETS["small"]
    paths = ensure_photos(CACHE / name, count, width, height)
    tower = _tower(spec, CACHE / name)
    as_float, as_int8 = _encode_files(tower.open(), paths), _encode_files(tower.open(int8=True), paths)
    texts = Encoder.load_text_only(spec).encode_texts(probe_texts())
    return {
        "images": count,
        "queries": len(texts),
        "top10_overlap": round(_overlap(texts, as_float, as_int8), 4),
        "mean_cosine": round(float(np.mean(np.sum(as_float * as_int8, axis=1))), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes-dir", type=Path, default=ROOT / "data" / "samples")
    parser.add_argument("--images", type=int, default=1000, help="generated JPEGs for the ViT-B-32 figure")
    parser.add_argument("--only", nargs="*", default=["shapes", "vit-b-32"])
    args = parser.parse_args()
    if "shapes" in args.only:
        print(json.dumps({"figure": "shapes", **shapes(args.shapes_dir)}), flush=True)
    if "vit-b-32" in args.only:
        print(json.dumps({"figure": "vit-b-32", **vit_b_32(args.images)}), flush=True)


if __name__ == "__main__":
    main()
