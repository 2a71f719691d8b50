"""Searching an index by text, by image and by vector, through the real engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import IndexSettings, index_paths
from retrieval.errors import EmptyIndexError, UsageError
from retrieval.model.spec import ModelSpec
from retrieval.search.engine import SearchEngine
from retrieval.store.catalog import Catalog
from retrieval.store.layout import IndexLayout
from tests.conftest import make_images, write_image
from tests.test_index import catalog_and_faiss_agree


@pytest.fixture
def indexed(tmp_path, photo_folder, settings) -> Path:
    index_dir = tmp_path / "index"
    index_paths(index_dir, [photo_folder], settings, progress=False)
    return index_dir


def test_text_search_returns_k_sorted_scores_in_range(indexed):
    with SearchEngine(indexed, device="cpu") as engine:
        results = engine.search_text("a dog on a beach at sunset", k=7)
    assert len(results) == 7
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert [r.rank for r in results] == list(range(1, 8))
    assert len({r.path for r in results}) == 7
    assert all(Path(r.path).is_file() and r.width and r.height for r in results)


def test_text_scores_equal_cosine_similarity_of_the_embeddings(indexed):
    with SearchEngine(indexed, device="cpu") as engine:
        results = engine.search_text("red", k=16)
        query = engine.encoder.encode_texts(["red"])[0]
        stored = engine.vectors_for_paths([r.path for r in results])
    np.testing.assert_allclose([r.score for r in results], stored @ query, atol=1e-5)


def test_an_images_nearest_neighbour_is_itself_when_searched_by_pixels(indexed, photo_folder):
    """An unindexed copy of an indexed photo finds the original first, with a score of ~1."""
    from PIL import Image

    target = photo_folder / "2023" / "summer" / "img_2_003.png"
    with SearchEngine(indexed, device="cpu") as engine:
        results = engine.search_image(Image.open(target).convert("RGB"), k=3)
    assert results[0].path == str(target)
    assert results[0].score == pytest.approx(1.0, abs=2e-3)


def test_similar_leaves_the_query_image_out(indexed, photo_folder):
    target = photo_folder / "img_1_004.jpg"
    with SearchEngine(indexed, device="cpu") as engine:
        results = engine.search_image(target, k=5)
    assert len(results) == 5
    assert str(target) not in [r.path for r in results]


def test_under_restricts_to_a_folder_and_min_score_cuts(indexed, photo_folder):
    summer = photo_folder / "2023" / "summer"
    with SearchEngine(indexed, device="cpu") as engine:
        inside = engine.search_text("summer", k=50, under=summer)
        everything = engine.search_text("summer", k=50)
        cut = engine.search_text("summer", k=50, min_score=everything[3].score)
    assert len(inside) == 6 and all(r.path.startswith(str(summer) + os.sep) for r in inside)
    assert len(everything) == 16
    assert [r.path for r in cut] == [r.path for r in everything[:4]]


def test_bad_queries_are_clear_errors(indexed, tmp_path):
    with SearchEngine(indexed, device="cpu") as engine:
        with pytest.raises(UsageError, match="-k"):
            engine.search_text("x", k=0)
        with pytest.raises(UsageError, match="no such image"):
            engine.search_image(tmp_path / "missing.jpg")
        (tmp_path / "fake.jpg").write_text("text")
        with pytest.raises(UsageError, match="not an image"):
            engine.search_image(tmp_path / "fake.jpg")
        with pytest.raises(UsageError, match="no such folder"):
            engine.search_text("x", under=tmp_path / "nowhere")


def test_empty_index_is_a_clear_error(tmp_path, settings):
    with pytest.raises(EmptyIndexError, match="no index"):
        SearchEngine(tmp_path / "none", device="cpu")
    folder = tmp_path / "only_bad"
    folder.mkdir()
    (folder / "a.jpg").write_text("nope")
    index_paths(tmp_path / "index", [folder], settings, progress=False)
    with SearchEngine(tmp_path / "index", device="cpu") as engine, pytest.raises(EmptyIndexError):
        engine.search_text("anything")


@pytest.mark.slow
def test_killed_run_keeps_its_commits_and_the_next_run_completes(tmp_path, tiny_model_dir):
    """SIGKILL mid-run: the index still opens and searches; the next run adds only what is missing."""
    folder = tmp_path / "many"
    for i in range(160):
        write_image(folder / f"p{i:03d}.jpg", seed=i, size=(640, 480))
    index_dir = tmp_path / "index"
    script = (
        "import sys; from pathlib import Path; from indexer.pipeline import IndexSettings, index_paths;"
        "from retrieval.model.spec import ModelSpec;"
        f"index_paths(Path({str(index_dir)!r}), [Path({str(folder)!r})],"
        f" IndexSettings(model=ModelSpec('local-dir:{tiny_model_dir}', None), batch_size=4, workers=0, chunk_size=4,"
        " device='cpu'),"
        " progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    committed = _wait_for_rows(index_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < committed < 160, "the run should have been killed part-way"

    with SearchEngine(index_dir, device="cpu") as engine:
        survivors = Catalog(IndexLayout(index_dir).catalog).count()
        assert len(engine.search_text("a photo", k=3)) == 3
    settings = IndexSettings(model=ModelSpec(f"local-dir:{tiny_model_dir}", None), workers=0, device="cpu")
    summary = index_paths(index_dir, [folder], settings, progress=False)
    assert summary.unchanged == survivors and summary.added == 160 - survivors
    assert len(catalog_and_faiss_agree(index_dir)) == 160


def _wait_for_rows(index_dir: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(IndexLayout(index_dir).catalog) as db:
                count = db.execute("select count(*) from images").fetchone()[0]
            if count >= 8:
                return count
        except sqlite3.Error:
            pass
        time.sleep(0.01)
    raise AssertionError("indexer finished or stalled before it could be killed")


def test_vector_search_matches_exact_similarity(tmp_path, settings):
    folder = tmp_path / "set"
    make_images(folder, 12, seed=30)
    index_paths(tmp_path / "index", [folder], settings, progress=False)
    with SearchEngine(tmp_path / "index", device="cpu") as engine:
        paths = sorted(str(p) for p in folder.iterdir())
        vectors = engine.vectors_for_paths(paths)
        queries = engine.encoder.encode_texts(["one", "two", "three"])
        results = engine.search_vectors(queries, k=4)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :4]
    assert [[r.path for r in row] for row in results] == [[paths[i] for i in row] for row in exact]


def test_a_symlinked_file_is_found_by_the_path_it_was_indexed_under(tmp_path, settings):
    folder = tmp_path / "links"
    original = write_image(tmp_path / "elsewhere" / "real.jpg", seed=41)
    make_images(folder, 2, seed=42)
    (folder / "link.jpg").symlink_to(original)
    index_paths(tmp_path / "index", [folder], settings, progress=False)
    with SearchEngine(tmp_path / "index", device="cpu") as engine:
        assert engine.vectors_for_paths([folder / "link.jpg"]).shape == (1, 32)
        assert str(folder / "link.jpg") not in [r.path for r in engine.search_image(folder / "link.jpg", k=2)]


def test_bf16_text_queries_stay_close_to_float32_ones(indexed):
    """The opt-in bfloat16 text tower moves query vectors only slightly, and search through it still works."""
    queries = ["a dog on a beach", "red", "a city street at night"]
    with SearchEngine(indexed, device="cpu") as exact, SearchEngine(indexed, text_bf16=True, device="cpu") as fast:
        reference = exact.text_encoder.encode_texts(queries)
        approximate = fast.text_encoder.encode_texts(queries)
        assert fast.text_encoder is not exact.text_encoder
        results = fast.search_text("a dog on a beach", k=5)
    assert approximate.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(approximate, axis=1), 1.0, atol=1e-5)
    assert (approximate * reference).sum(axis=1).min() > 0.98
    assert len(results) == 5 and [r.score for r in results] == sorted((r.score for r in results), reverse=True)
