"""`clipsearch eval` end to end on the synthetic shapes set with a tiny model: through the index, cached, exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.errors import UsageError
from retrieval.lab.datasets import DatasetError, load_captioned_set
from retrieval.lab.evaluate import STAGE_FOLDER, EvalSettings, evaluate
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
def test_cli_end_to_end_equals_an_independent_computation(shapes_set: Path, tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "recall.json"
    index_dir = tmp_path / "eval-index"
    args = ["eval", "captions", "--images", str(shapes_set.parent / "images"), "--annotations", str(shapes_set)]
    args += ["--split", "test", "--model", f"local-dir:{tiny_model_dir}", "--pretrained", ""]
    args += ["--index", str(index_dir), "--workers", "0", "--device", "cpu", "--json", str(out), "-q"]

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    assert "30 images, 150 captions" in result.output
    assert "text→image" in result.output and "image→text" in result.output
    assert "FAISS text→image recall equals the exact matrix" in result.output
    report = json.loads(out.read_text())
    metrics = report["metrics"]
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
    first = evaluate(captioned, settings_for(tiny_spec), progress=False)
    second = evaluate(captioned, settings_for(tiny_spec), progress=False)

    assert first.index_dir == second.index_dir and first.index_dir.is_relative_to(private_cache)
    assert (first.images_encoded, first.texts_cached) == (30, False)
    assert (second.images_encoded, second.texts_cached) == (0, True)
    assert second.metrics == first.metrics


@pytest.mark.slow
def test_batch_size_and_order_do_not_change_results(shapes_set: Path, tiny_spec, tmp_path: Path):
    captioned = test_set(shapes_set)
    reversed_set = type(captioned)(captioned.items[::-1], captioned.source_format)

    one = evaluate(captioned, settings_for(tiny_spec, batch_size=1, index_dir=tmp_path / "a"), progress=False)
    many = evaluate(reversed_set, settings_for(tiny_spec, batch_size=13, index_dir=tmp_path / "b"), progress=False)

    assert one.metrics.as_dict() == many.metrics.as_dict()
    assert one.faiss.agrees and many.faiss.agrees


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

    with pytest.raises(DatasetError, match=rf"1 images could not be decoded, e.g. {broken.name}.*--allow-missing"):
        evaluate(captioned, settings_for(tiny_spec, index_dir=tmp_path / "i"), progress=False)
    report = evaluate(captioned, settings_for(tiny_spec, index_dir=tmp_path / "i", allow_missing=True), progress=False)
    assert (report.metrics.n_images, report.metrics.n_captions) == (5, 25)
    assert any(broken.name in problem for problem in report.problems)


def test_a_photo_index_is_never_used_for_eval(shapes_set: Path, tiny_spec, settings, photo_folder, tmp_path: Path):
    from indexer.pipeline import index_paths

    photo_index = tmp_path / "photos-index"
    index_paths(photo_index, [photo_folder], settings, progress=False)

    with pytest.raises(UsageError, match="already indexes other folders"):
        evaluate(test_set(shapes_set, "val"), settings_for(tiny_spec, index_dir=photo_index), progress=False)


def test_the_index_check_catches_a_search_that_ranks_other_vectors(shapes_set: Path, tiny_spec, tmp_path: Path):
    """The comparison is real: scoring the exact side with other image vectors than the index holds is caught."""
    from retrieval.lab.evaluate import check_faiss_search

    captioned = test_set(shapes_set)
    report = evaluate(captioned, settings_for(tiny_spec, index_dir=tmp_path / "i"), progress=False)
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
