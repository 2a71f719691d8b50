"""Shared fixtures: a tiny seeded open_clip model saved as a local-dir folder, and generated image folders."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.pipeline import IndexSettings
from retrieval.model.spec import ModelSpec
from retrieval.testing import make_random_model_dir

# A test run started in the background (`cmd &`, many CI harnesses) inherits SIGINT ignored, and Python then never
# turns Ctrl-C into KeyboardInterrupt: the Ctrl-C tests need the handler an interactive run has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# `clipsearch index` exports the text tower to ONNX after encoding (seconds each time): tests of indexing leave it
# out; tests/test_text_onnx.py exports on purpose.
os.environ.setdefault("CLIPSEARCH_EXPORT_TEXT", "0")
os.environ.setdefault("CLIPSEARCH_EXPORT_IMAGE", "0")  # the same for the image tower (tests/test_image_onnx.py)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight, seeded, 32-dim CLIP (64 px images) written as `local-dir:` — real open_clip, made small."""
    return make_random_model_dir(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec(f"local-dir:{tiny_model_dir}", None)


@pytest.fixture
def settings(tiny_spec) -> IndexSettings:
    """In-process decoding keeps small tests fast; worker processes are tested on their own, and so is the text
    tower export that follows a run (tests/test_text_onnx.py: seconds per run, so not after every test's)."""
    return IndexSettings(model=tiny_spec, batch_size=8, workers=0, chunk_size=8, device="cpu", export_text=False)


def write_image(path: Path, seed: int, size: tuple[int, int] = (96, 72), fmt: str | None = None) -> Path:
    """A distinct picture per seed: smooth colour gradients plus noise, so encoders see different content."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = (np.stack(channels, axis=-1) * 100 + 128 + rng.normal(0, 20, (height, width, 3))).clip(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)
    return path


def make_images(folder: Path, count: int, seed: int = 0, suffix: str = ".jpg") -> list[Path]:
    return [write_image(folder / f"img_{seed}_{i:03d}{suffix}", seed * 1000 + i) for i in range(count)]


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    folder = tmp_path / "photos"
    make_images(folder, 10, seed=1)
    make_images(folder / "2023" / "summer", 6, seed=2, suffix=".png")
    return folder
