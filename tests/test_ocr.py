"""Text in photos: the OCR pass reads printed words with the real RapidOCR models (no mocks) on generated photos of
printed text, stores them per image, and a text search finds the photo by those words, fused with CLIP."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipsearch.cli import app
from indexer.ocr_pass import read_photo
from indexer.pipeline import IndexSettings, index_paths
from retrieval.model.device import Device
from retrieval.model.ocr import CPU, CUDA, ocr_provider
from retrieval.search.engine import SearchEngine
from retrieval.search.info import index_info, photo_text
from retrieval.search.query import Filters, Query
from retrieval.search.server import ServerSettings, create_app
from retrieval.store.image_text import fold, match_expression
from retrieval.testing import cluttered_background, load_script, printed_text_photo
from tests.crash_harness import KILLED, run_in_child

pytest.importorskip("rapidocr_onnxruntime")

INVOICE = ["INVOICE No. 2023-0412", "Total due: 1,284.50 EUR"]
PLATFORM = ["PLATFORM 7", "Departures"]


@pytest.fixture(scope="module")
def ocr_index(tmp_path_factory, tiny_spec) -> tuple[Path, Path, IndexSettings]:
    """Three ~800 px photos (an invoice, a station sign on a dark panel, one without text), indexed with --ocr."""
    root = tmp_path_factory.mktemp("ocr")
    photos = root / "photos"
    photos.mkdir()
    printed_text_photo(INVOICE, seed=1, font_px=34, angle=3).save(photos / "a.jpg", quality=90)
    printed_text_photo(PLATFORM, seed=2, font_px=44, angle=-5, dark_panel=True).save(photos / "b.jpg", quality=90)
    cluttered_background((800, 600), np.random.default_rng(3)).save(photos / "c.jpg", quality=90)
    settings = IndexSettings(model=tiny_spec, batch_size=8, workers=0, chunk_size=8, device="cpu", ocr=True)
    summary = index_paths(root / "index", [photos], settings, progress=False)
    assert summary.text_note == "text: read 3 photos (2 with text, 0 failed) in " + summary.text_note.split(" in ")[1]
    return root / "index", photos, settings


def search(index_dir: Path, text: str, **query) -> list:
    with SearchEngine(index_dir, device="cpu") as engine:
        return engine.search(Query.of(text, **query), k=3)


@pytest.mark.parametrize(
    ("words", "photo"),
    [
        ("invoice 2023-0412", "a.jpg"),  # a word and a number, the space OCR lost between them ignored
        ("invoice no", "a.jpg"),  # "No." read as "N0." or glued to the word before
        ("1284.50 eur", "a.jpg"),  # punctuation left out
        ("departures", "b.jpg"),  # light text on a dark panel, rotated
        ("Platform 7", "b.jpg"),  # case and a short word
    ],
)
def test_a_text_query_finds_the_photo_by_the_words_printed_in_it(ocr_index, words, photo):
    index_dir, photos, _ = ocr_index
    results = search(index_dir, words)
    assert Path(results[0].path).name == photo and results[0].matched == "text"
    assert [r.matched for r in results[1:]] == ["clip", "clip"]  # the others are here for the picture only


def test_words_from_different_photos_match_neither_and_the_switch_turns_text_off(ocr_index):
    index_dir, _, _ = ocr_index
    assert all(r.matched == "clip" for r in search(index_dir, "invoice departures"))
    assert all(r.matched == "clip" for r in search(index_dir, "invoice", text_match=False))


def test_has_text_narrows_to_photos_with_text_and_works_with_date_order(ocr_index):
    index_dir, _, _ = ocr_index
    with_text = search(index_dir, "a photo", filters=Filters(has_text=True), sort="date")
    without = search(index_dir, "a photo", filters=Filters(has_text=False))
    assert sorted(Path(r.path).name for r in with_text) == ["a.jpg", "b.jpg"]
    assert [Path(r.path).name for r in without] == ["c.jpg"]


def test_the_text_read_is_shown_by_clipsearch_text_and_counted_by_info(ocr_index):
    index_dir, photos, _ = ocr_index
    runner = CliRunner()
    shown = runner.invoke(app, ["text", str(photos / "a.jpg"), "--index", str(index_dir)])
    assert shown.exit_code == 0, shown.output
    assert "1,284.50" in shown.output and "2023-0412" in shown.output
    as_json = runner.invoke(app, ["text", str(photos / "b.jpg"), "--index", str(index_dir), "--json"])
    document = json.loads(as_json.output)
    (x0, y0), _, (x1, y1), _ = document["lines"][0]["box"]
    assert 0 <= x0 < x1 <= 800 and 0 <= y0 < y1 <= 600  # full-size pixels of the upright photo
    blank = runner.invoke(app, ["text", str(photos / "c.jpg"), "--index", str(index_dir)])
    assert blank.exit_code == 0 and "no text found" in blank.output
    info = runner.invoke(app, ["info", "--index", str(index_dir)])
    assert "ocr:     on; 2 photos with text, of 3 read (0 failed)" in info.output


def test_the_api_says_why_a_result_matched_and_shows_the_text_read(ocr_index):
    index_dir, _, _ = ocr_index
    with TestClient(create_app(index_dir, ServerSettings(device="cpu")), base_url="http://127.0.0.1") as client:
        query = {"query": {"positive": [{"text": "departures"}]}, "k": 3}
        first = client.post("/api/query", json=query).json()["results"][0]
        assert first["matched"] == "text" and first["path"].endswith("b.jpg")
        details = client.get(f"/api/images/{first['image_id']}").json()
        assert details["text_status"] == "ok" and "departures" in " ".join(t["text"] for t in details["text"]).lower()
        with_text = client.post("/api/query", json=query | {"filters": {"has_text": True}}).json()["results"]
        assert len(with_text) == 2


def test_a_refresh_keeps_ocr_on_reads_nothing_unchanged_and_a_move_keeps_the_text(ocr_index):
    index_dir, photos, settings = ocr_index
    moved = photos / "sub" / "invoice.jpg"
    moved.parent.mkdir()
    (photos / "a.jpg").rename(moved)
    try:
        summary = index_paths(index_dir, [], replace(settings, ocr=None), progress=False)  # ocr as recorded
        assert (summary.moved, summary.encoded, summary.text_note) == (1, 0, None)
        assert "2023-0412" in " ".join(line["text"] for line in photo_text(index_dir, moved).text.lines)
        assert index_info(index_dir).ocr
    finally:
        moved.rename(photos / "a.jpg")
        index_paths(index_dir, [], replace(settings, ocr=None), progress=False)


def test_a_changed_photo_is_read_again(ocr_index, tmp_path, tiny_spec):
    photos = tmp_path / "photos"
    printed_text_photo(["OPEN DAILY"], seed=4, font_px=40).save(photos.mkdir() or photos / "door.jpg")
    settings = IndexSettings(model=tiny_spec, batch_size=8, workers=0, chunk_size=8, device="cpu", ocr=True)
    index_paths(tmp_path / "index", [photos], settings, progress=False)
    printed_text_photo(["CLOSED MONDAY"], seed=4, font_px=40).save(photos / "door.jpg")
    summary = index_paths(tmp_path / "index", [], replace(settings, ocr=None), progress=False)
    assert summary.updated == 1 and summary.text_note.startswith("text: read 1 photos (1 with text")
    assert search(tmp_path / "index", "monday")[0].matched == "text"
    assert search(tmp_path / "index", "daily")[0].matched == "clip"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["ocr_commit_begin:2", "ocr_commit_end:2"])
def test_a_pass_killed_midway_keeps_what_it_committed_and_the_next_run_resumes(point, tmp_path, tiny_spec):
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed, words in enumerate([["NORTH EXIT"], ["GATE 12"], ["FRESH BREAD"], ["NO PARKING"]]):
        printed_text_photo(words, size=(640, 480), seed=seed, font_px=40).save(photos / f"{seed}.jpg")
    settings = IndexSettings(model=tiny_spec, batch_size=8, workers=0, chunk_size=1, device="cpu", ocr=True)
    run = lambda: index_paths(tmp_path / "index", [photos], settings, progress=False)  # noqa: E731
    assert run_in_child(run, fault=point) == KILLED
    kept = index_info(tmp_path / "index").text_read
    assert kept == (1 if point.startswith("ocr_commit_begin") else 2)  # the batch being written is lost, no more
    summary = run()
    assert summary.encoded == 0 and summary.text_note.startswith(f"text: read {4 - kept} photos (")
    assert index_info(tmp_path / "index").with_text == 4
    assert search(tmp_path / "index", "fresh bread")[0].path.endswith("2.jpg")


def test_a_photo_that_cannot_be_read_gives_a_reason_not_an_exception(tmp_path):
    digest, lines, error = read_photo(str(tmp_path / "gone.jpg"))
    assert (digest, lines) == (None, []) and "vanished" in error


def test_ocr_matching_folds_case_punctuation_spaces_and_look_alikes():
    assert fold("INVO1CE N0. 2023-0412") == fold("invoice no 2023 0412")
    assert match_expression("Invoice No. 2023") == '"lnvolce" AND "no2o23"'  # a short word joins the next
    assert match_expression("a b") is None  # nothing a trigram index can match


def test_ocr_runs_on_cuda_only_where_onnxruntime_has_it():
    cpu, cuda = Device("cpu"), Device("cuda:0")
    assert ocr_provider(cuda, [CUDA, CPU]) == CUDA
    assert ocr_provider(cuda, [CPU]) == CPU  # the CPU onnxruntime wheel: the models run on the CPU
    assert ocr_provider(cpu, [CUDA, CPU]) == CPU


def test_without_the_ocr_extra_index_ocr_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # as if it were not installed
    (tmp_path / "photos").mkdir()
    printed_text_photo(["X"], size=(200, 150)).save(tmp_path / "photos" / "x.jpg")
    result = CliRunner().invoke(app, ["index", str(tmp_path / "photos"), "--index", str(tmp_path / "i"), "--ocr"])
    assert result.exit_code != 0
    assert "pip install 'clipsearch[ocr]'" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_generated_benchmark_set_has_queries_printed_in_exactly_one_photo(tmp_path):
    queries = load_script("make_text_photos").generate_text_photos(tmp_path, 3, 1, seed=0)
    photos = sorted(p.name for p in tmp_path.glob("*.jpg"))
    assert len(photos) == 4 and {q["target"] for q in queries} <= set(photos) and len(queries) == 3
    assert [q["kind"] for q in queries] == ["word", "number", "phrase"]
    assert json.loads((tmp_path / "queries.json").read_text()) == queries
