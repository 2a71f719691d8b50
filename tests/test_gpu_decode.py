"""The GPU decoding path agrees with the Pillow path. Its logic runs here on the CPU (torchvision decodes JPEGs on
either device); the speed and the CUDA run itself are checked only where a GPU exists (marker ``gpu``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from indexer.gpu_decode import JpegBytesDataset, RawJpeg, decode_batch
from retrieval.images import ImageFileDataset
from tests.conftest import write_image

SIZE = 64
CFG = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic"}


@pytest.fixture
def files(tmp_path):
    paths = [write_image(tmp_path / f"photo{i}.jpg", seed=i, size=(640, 480)) for i in range(3)]
    rotated = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.open(paths[0]).save(rotated, exif=exif.tobytes())
    png = write_image(tmp_path / "drawing.png", seed=5, size=(300, 200))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 50)
    return [*paths, rotated, png, broken]


def test_batch_decoding_matches_the_pillow_path_file_by_file(files):
    preprocess = open_clip.image_transform(SIZE, is_train=False)
    raw = JpegBytesDataset([str(p) for p in files], preprocess, SIZE)
    items = [raw[i] for i in range(len(files))]
    assert [isinstance(item, RawJpeg) for item in items] == [True, True, True, True, False, True]
    decoded = decode_batch(items, SIZE, CFG, "cpu", preprocess)
    reference = ImageFileDataset([str(p) for p in files], preprocess, SIZE)
    for got, item in zip(decoded, (reference[i] for i in range(len(files)))):
        assert (got.position, got.width, got.height, got.error) == (item.position, item.width, item.height, item.error)
        assert got.content_hash == item.content_hash
        if item.pixels is not None:
            assert got.pixels.shape == (3, SIZE, SIZE)
            assert float((got.pixels - item.pixels).abs().mean()) < 0.02
    assert (decoded[3].width, decoded[3].height) == (480, 640)  # EXIF orientation applied
    assert decoded[5].pixels is None and decoded[5].error  # refused by the decoder, then by Pillow: recorded


def test_one_bad_file_does_not_fail_its_batch(files):
    preprocess = open_clip.image_transform(SIZE, is_train=False)
    raw = JpegBytesDataset([str(p) for p in files], preprocess, SIZE)
    good, bad = raw[0], raw[5]
    decoded = decode_batch([good, replace(bad, position=1)], SIZE, CFG, "cpu", preprocess)
    assert decoded[0].pixels is not None and decoded[1].pixels is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_indexing_agrees_with_cpu_indexing(tmp_path, files, settings):
    from indexer.pipeline import index_paths
    from retrieval.search.engine import SearchEngine

    folder = files[0].parent
    vectors = {}
    for device in ("cpu", "cuda"):
        index_dir = tmp_path / f"index-{device}"
        index_paths(index_dir, [folder], replace(settings, device=device, workers=2), progress=False)
        with SearchEngine(index_dir, device=device) as engine:
            vectors[device] = engine.vectors_for_paths([str(p) for p in files[:5]])
    assert np.all(np.sum(vectors["cpu"] * vectors["cuda"], axis=1) > 0.98)
