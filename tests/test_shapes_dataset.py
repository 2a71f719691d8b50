"""The synthetic shapes generator: Karpathy layout, deterministic, answerable held-out captions."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.testing import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shapes_dataset.py"


shapes = load_script("make_shapes_dataset")


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_writes_karpathy_layout_with_images_and_splits(tmp_path: Path) -> None:
    path = shapes.generate_shapes_dataset(tmp_path, n_images=40, seed=3, n_val=5, n_test=10)
    data = json.loads(path.read_text())

    assert data["dataset"] == "shapes"
    splits = [entry["split"] for entry in data["images"]]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (25, 5, 10)
    sentids = []
    for entry in data["images"]:
        assert (tmp_path / "images" / entry["filename"]).is_file()
        assert len(entry["sentences"]) == shapes.CAPTIONS_PER_IMAGE
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        assert all(s["imgid"] == entry["imgid"] and s["tokens"] for s in entry["sentences"])
        assert len({s["raw"] for s in entry["sentences"]}) == shapes.CAPTIONS_PER_IMAGE
        sentids += entry["sentids"]
    assert len(set(sentids)) == len(sentids)


def test_every_caption_names_shape_colour_and_position(tmp_path: Path) -> None:
    data = json.loads(shapes.generate_shapes_dataset(tmp_path, n_images=30, seed=1).read_text())
    for entry in data["images"]:
        attributes = entry["attributes"]
        for sentence in entry["sentences"]:
            raw = sentence["raw"].replace("-", " ")
            assert attributes["shape"] in raw and attributes["colour"] in raw
            assert attributes["position"] in raw or (attributes["position"] == "center" and "middle" in raw)
            assert any(word in sentence["tokens"] for word in shapes.SIZE_WORDS[attributes["size"]])


def test_held_out_images_are_distinct_so_each_caption_has_one_answer(tmp_path: Path) -> None:
    data = json.loads(shapes.generate_shapes_dataset(tmp_path, n_images=300, seed=0, n_test=200).read_text())
    keys = [
        tuple(entry["attributes"][a] for a in ("shape", "colour", "size", "position"))
        for entry in data["images"]
        if entry["split"] == "test"
    ]
    assert len(keys) == 200 and len(set(keys)) == 200


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        shapes.generate_shapes_dataset(tmp_path / name, n_images=12, seed=seed)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "c")


def test_script_runs_and_rejects_impossible_splits(tmp_path: Path) -> None:
    run = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--seed", "2", "--size", "48"]
    ok = subprocess.run([*run, "--images", "6", "--format", "jpg"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 6

    too_many = subprocess.run([*run, "--images", "5", "--test", "9"], capture_output=True, text=True)
    assert too_many.returncode != 0
    assert "more than --images" in too_many.stderr


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "star", "diamond", "hexagon"])
def test_each_shape_is_drawn_in_its_colour_where_the_caption_says(shape: str) -> None:
    import random

    scene = shapes.ShapeScene(shape, "red", "large", "top left", "white")
    image = shapes.render_scene(scene, 64, random.Random(0))
    pixels = np.asarray(image).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    red_pixels = {"top left": int(red[:32, :32].sum()), "bottom right": int(red[32:, 32:].sum())}
    assert red_pixels["top left"] > 100
    assert red_pixels["bottom right"] == 0
