"""`clipsearch eval` end to end on the synthetic shapes set with a tiny model: both protocols, cached, exact.

Parity of the default (reference) protocol with clip_benchmark itself: tests/test_clip_benchmark_parity.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.lab.datasets import DatasetError, load_captioned_set
from clipsearch.lab.evaluate import AS_INDEXED, REFERENCE, STAGE_FOLDER, EvalSettings, evaluate
from retrieval.errors import UsageError
from retrieval.model.device import CPU
from retrieval.search.engine import SearchEngine
from tests.test_metrics import brute_force
from tests.test_shapes_dataset import shapes

runner = CliRunner()


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> Path:
    """60 shapes, 30 of them in the test split (5 captions each): written once for this module."""
    out = tmp_path_factory.mktemp("shapes")
    return shapes.generate_shapes_dataset(out, n_images=60, seed=11, n_val=6, n_test=30)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_set(shapes_set: Path, split: str = "test"):
    return load_captioned_set(shapes_set, shapes_set.parent / "images", split)


test_set.__test__ = False  # a helper, not a test


def settings_for(tiny_spec, **overrides) -> EvalSettings:
    return EvalSettings(model=tiny_spec, workers=0, device="cpu", **overrides)


@pytest.mark.slow
def test_as_indexed_cli_equals_an_independent_computation(shapes_set: Path, tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "recall.json"
    index_dir = tmp_path / "eval-index"
    args = ["eval", "captions", "--images", str(shapes_set.parent / "images"), "--annotations", str(shapes_set)]
    args += ["--split", "test", "--model", f"local-dir:{tiny_model_dir}", "--pretrained", ""]
    args += ["--index", str(index_dir), "--workers", "0", "--device", "cpu", "--json", str(out), "-q", "--as-indexed"]

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    assert "30 images, 150 captions" in result.output
    assert "text→image" in result.output and "image→text" in result.output
    assert "FAISS text→image recall equals the exact matrix" in result.output
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert report["protocol"] == AS_INDEXED and list(report["protocols"]) == [AS_INDEXED]
    assert report["faiss_check"]["agrees"] is True
    assert report["encode"]["images_encoded"] == 30

    # The same embeddings, read back from the index and the model, scored by a plain loop.
    captioned = test_set(shapes_set)
    texts, owners = captioned.captions_and_owners()
    staged = [index_dir / STAGE_FOLDER / item.path.name for item in captioned.items]
    with SearchEngine(index_dir, device="cpu") as engine:
        image_emb = engine.vectors_for_paths(staged)
        text_emb = engine.encoder.encode_texts(texts)
        direct = engine.encoder.encode_pil([Image.open(item.path).convert("RGB") for item in captioned.items])
    t2i, i2t = brute_force(text_emb, image_emb, np.array(owners))
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i[k], abs=1e-12)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t[k], abs=1e-12)
        assert report["faiss_check"][f"image_retrieval_recall@{k}"] == metrics[f"image_retrieval_recall@{k}"]
    # What the index stored is what the model makes of the image files (up to float16 storage).
    np.testing.assert_allclose(image_emb, direct, atol=3e-3)


@pytest.mark.slow
def test_second_run_encodes_nothing(shapes_set: Path, tiny_spec, private_cache: Path):
    captioned = test_set(shapes_set)
    both = settings_for(tiny_spec, protocols=(REFERENCE, AS_INDEXED))
    first = evaluate(captioned, both, progress=False)
    second = evaluate(captioned, both, progress=False)

    assert first.index_dir == second.index_dir and first.index_dir.is_relative_to(private_cache)
    for protocol in (REFERENCE, AS_INDEXED):
        assert (first.run(protocol).images_encoded, first.run(protocol).texts_cached) == (30, False)
        assert (second.run(protocol).images_encoded, second.run(protocol).texts_cached) == (0, True)
        assert second.run(protocol).metrics == first.run(protocol).metrics


@pytest.mark.slow
def test_batch_size_and_order_do_not_change_results(shapes_set: Path, tiny_spec, tmp_path: Path):
    """Without exact ties, neither the batching nor the order of the set moves a figure, in either protocol."""
    captioned = test_set(shapes_set)
    reversed_set = type(captioned)(captioned.items[::-1], captioned.source_format)
    both = (REFERENCE, AS_INDEXED)

    one = evaluate(captioned, settings_for(tiny_spec, batch_size=3, index_dir=tmp_path / "a", protocols=both))
    many = evaluate(reversed_set, settings_for(tiny_spec, batch_size=13, index_dir=tmp_path / "b", protocols=both))

    for protocol in both:
        assert one.run(protocol).ties.total == 0
        assert one.run(protocol).metrics.as_dict() == many.run(protocol).metrics.as_dict()
    assert one.run(AS_INDEXED).faiss.agrees and many.run(AS_INDEXED).faiss.agrees


def test_resolution_follows_the_set_size(shapes_set: Path, tiny_spec, tmp_path: Path):
    report = evaluate(test_set(shapes_set, "val"), settings_for(tiny_spec, index_dir=tmp_path / "i"), progress=False)

    assert (report.metrics.n_images, report.metrics.n_captions) == (6, 30)
    for value in report.metrics.t2i.values():
        assert round(value * 30, 9) == int(round(value * 30))
    for value in report.metrics.i2t.values():
        assert round(value * 6, 9) == int(round(value * 6))
    assert report.metrics.t2i[10] == 1.0  # only 6 images: every caption's image is in the top 10


def test_flickr30k_refuses_a_set_that_is_not_the_1k_test_split(shapes_set: Path, tiny_model_dir: Path):
    args = ["eval", "flickr30k", "--images", str(shapes_set.parent / "images"), "--annotations", str(shapes_set)]
    result = runner.invoke(app, [*args, "--model", f"local-dir:{tiny_model_dir}", "--pretrained", ""])

    assert result.exit_code == 2
    assert "not the Flickr30K 1K test split" in result.output
    assert "30 images and 150 captions" in result.output
    assert "Traceback" not in result.output


def test_an_undecodable_image_is_named_or_dropped(shapes_set: Path, tiny_spec, tmp_path: Path):
    images = tmp_path / "images"
    shutil.copytree(shapes_set.parent / "images", images)
    broken = load_captioned_set(shapes_set, images, "val").items[0].path
    broken.write_bytes(b"not a png")
    captioned = load_captioned_set(shapes_set, images, "val")

    for protocol in (REFERENCE, AS_INDEXED):
        settings = settings_for(tiny_spec, index_dir=tmp_path / "i", protocols=(protocol,))
        with pytest.raises(DatasetError, match=rf"1 images could not be decoded, e.g. {broken.name}.*--allow-missing"):
            evaluate(captioned, settings, progress=False)
        report = evaluate(captioned, replace(settings, allow_missing=True), progress=False)
        assert (report.metrics.n_images, report.metrics.n_captions) == (5, 25)
        assert any(broken.name in problem for problem in report.problems)


def test_a_photo_index_is_never_used_for_eval(shapes_set: Path, tiny_spec, settings, photo_folder, tmp_path: Path):
    from indexer.pipeline import index_paths

    photo_index = tmp_path / "photos-index"
    index_paths(photo_index, [photo_folder], settings, progress=False)

    as_indexed = settings_for(tiny_spec, index_dir=photo_index, protocols=(AS_INDEXED,))
    with pytest.raises(UsageError, match="already indexes other folders"):
        evaluate(test_set(shapes_set, "val"), as_indexed, progress=False)


def test_the_index_check_catches_a_search_that_ranks_other_vectors(shapes_set: Path, tiny_spec, tmp_path: Path):
    """The comparison is real: scoring the exact side with other image vectors than the index holds is caught."""
    from clipsearch.lab.evaluate import check_faiss_search

    captioned = test_set(shapes_set)
    as_indexed = settings_for(tiny_spec, index_dir=tmp_path / "i", protocols=(AS_INDEXED,))
    report = evaluate(captioned, as_indexed, progress=False)
    texts, owners = captioned.captions_and_owners()
    staged = [report.index_dir / STAGE_FOLDER / item.path.name for item in captioned.items]
    with SearchEngine(report.index_dir, device="cpu") as engine:
        text_emb = engine.encoder.encode_texts(texts)
        ids = np.array([engine.catalog.row_by_path(str(path)).id for path in staged])
        images = engine.vectors_for_paths(staged)
        honest = check_faiss_search(engine, text_emb, images, np.array(owners), ids)
        swapped = check_faiss_search(engine, text_emb, images[::-1], np.array(owners), ids, texts=texts)

    assert honest.agrees and honest.t2i == report.metrics.t2i
    assert not swapped.agrees and swapped.disagreements > 0
    assert "exact rank" in swapped.examples[0] and "FAISS rank" in swapped.examples[0]


def test_reference_pixels_are_pillows_full_decode_also_in_workers(tiny_spec, tmp_path: Path):
    """A large JPEG (the indexer would draft-decode it) gives exactly preprocess(Image.open(p).convert("RGB")),
    whether decoded in the main process or in DataLoader workers."""
    from torch.utils.data import DataLoader

    from clipsearch.lab.reference import ReferenceImages
    from retrieval.model.encoder import Encoder
    from tests.conftest import write_image

    paths = [write_image(tmp_path / f"{n}.jpg", n, size=(400 + 50 * n, 300)) for n in range(3)]
    preprocess = Encoder.load(tiny_spec, CPU).preprocess
    direct = [preprocess(Image.open(path).convert("RGB")) for path in paths]
    loader = DataLoader(ReferenceImages(paths, preprocess), batch_size=2, num_workers=2, collate_fn=list)

    decoded = [item for batch in loader for item in batch]

    assert [position for position, _, _ in decoded] == [0, 1, 2]
    for (_, pixels, error), expected in zip(decoded, direct):
        assert error is None and pixels.equal(expected)
