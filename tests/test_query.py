"""Combined queries, filters, date order and file-name keywords: through the engine, the CLI, the HTTP API and the
client, on real indexes (the tiny seeded model, and the bundled shapes model where colours must mean something)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from clipsearch.cli import app as cli_app
from indexer.pipeline import IndexSettings, index_paths
from retrieval.errors import UsageError
from retrieval.model.spec import ModelSpec
from retrieval.search.client import ServerClient
from retrieval.search.engine import SearchEngine
from retrieval.search.query import Filters, Query, Term, parse_term
from retrieval.search.server import ServerSettings, create_app
from retrieval.store.filters import parse_date
from retrieval.testing import running_server
from retrieval.unit import unit_rows
from tests.conftest import write_image

REPO = Path(__file__).resolve().parents[1]
SHAPES_MODEL = REPO / "data" / "models" / "shapes-clip"
SAMPLES = REPO / "data" / "samples"


def exif_photo(path: Path, seed: int, date: str | None, camera: tuple[str, str] | None, size=(96, 72)) -> Path:
    write_image(path, seed, size=size, fmt="JPEG")
    tags = Image.Exif()
    if camera:
        tags[0x010F], tags[0x0110] = camera
    if date:
        tags.get_ifd(0x8769)[0x9003] = date
    Image.open(path).save(path, format="JPEG", exif=tags)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_spec) -> tuple[Path, Path]:
    """(index, photos): 6 Canon photos of July 2019 (90x60), 6 iPhone photos of March 2021, 4 PNGs dated by mtime
    (January 2015), and files named like a camera's and a trip's."""
    root = tmp_path_factory.mktemp("library")
    photos = (root / "photos").resolve()
    for i in range(6):
        exif_photo(photos / "canon" / f"c{i}.jpg", 10 + i, f"2019:07:0{i + 1} 12:00:00", ("Canon", "Canon EOS 80D"),
                   size=(90, 60))  # fmt: skip
        exif_photo(photos / "phone" / f"p{i}.jpg", 20 + i, f"2021:03:0{i + 1} 09:30:00", ("Apple", "iPhone 12"))
    for i in range(4):
        path = write_image(photos / "scans" / f"s{i}.png", 30 + i)
        stamp = int(1_420_113_600 + i * 86_400) * 10**9  # 2015-01-01 12:00 UTC onwards
        os.utime(path, ns=(stamp, stamp))
    for i, name in enumerate(["IMG_0412.jpg", "IMG_0413.jpg", "paris-2019/day1.jpg", "paris-2019/day2.jpg"]):
        write_image(photos / "names" / name, 40 + i, fmt="JPEG")
    settings = IndexSettings(model=tiny_spec, batch_size=16, workers=0, chunk_size=64)
    index_paths(root / "index", [photos], settings, progress=False)
    return root / "index", photos


@pytest.fixture(scope="module")
def engine(library):
    with SearchEngine(library[0], device="cpu") as opened:
        yield opened


def names(results) -> list[str]:
    return [Path(r.path).name for r in results]


def folders(results) -> set[str]:
    return {Path(r.path).parent.name for r in results}


# --- combined queries -------------------------------------------------------------------------------------------


def test_the_query_vector_is_the_renormalised_weighted_sum_of_unit_vectors(engine, library):
    photo = library[1] / "canon" / "c0.jpg"
    query = Query(
        positive=(Term(text="a beach", weight=2.0), Term(path=str(photo), weight=0.5)),
        negative=(Term(text="snow"),),
    )
    results = engine.search(query, k=5)

    texts = unit_rows(engine.text_encoder.encode_texts(["a beach", "snow"]))
    image = engine.vectors_for_paths([photo])[0]
    expected = unit_rows((2.0 * texts[0] + 0.5 * image - texts[1])[None, :])
    reference = [r for r in engine.search_vectors(expected, k=6)[0] if r.path != str(photo)][:5]
    assert [r.path for r in results] == [r.path for r in reference]
    assert [r.score for r in results] == pytest.approx([r.score for r in reference], abs=1e-4)
    assert str(photo) not in {r.path for r in results}  # an indexed query image is left out

    alone = engine.search(Query((Term(text="a beach"),)), k=5)
    assert [r.path for r in alone] != [r.path for r in results]


def test_terms_parse_weights_texts_and_files(tmp_path):
    photo = write_image(tmp_path / "ref.jpg", 1)
    assert parse_term("snow") == Term(text="snow")
    assert parse_term("2:snow") == Term(text="snow", weight=2.0)
    assert parse_term(f"0.5:{photo}") == Term(path=str(photo), weight=0.5)
    assert parse_term(str(photo)).path == str(photo)
    assert parse_term("1:12:30 sunset") == Term(text="12:30 sunset")
    for bad in [lambda: parse_term("0:snow"), lambda: Term(text="  "), lambda: Query(())]:
        with pytest.raises(UsageError):
            bad()


def test_a_mistyped_image_path_is_an_error_not_a_text(tmp_path):
    """`--add /nonexistent.jpg` used to search for the words "nonexistent jpg"; a path must name a file."""
    for typo in ("/nonexistent.jpg", "0.5:./missing/ref.png", "~/no-such-folder/x", "IMG_0412.JPG"):
        with pytest.raises(UsageError, match="no such image file"):
            parse_term(typo)
    for text in ("AC/DC at night", "snow", "2:a dog", "1:12:30", "the 2.5 mm jack"):
        assert parse_term(text).text is not None
    result = CliRunner().invoke(
        cli_app, ["search", "cat", "--add", "/nonexistent.jpg", "--index", str(tmp_path / "none")]
    )
    assert result.exit_code != 0 and "no such image file: /nonexistent.jpg" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_terms_that_cancel_out_are_refused(engine):
    with pytest.raises(UsageError, match="cancel"):
        engine.search(Query.of("a red car", sub=["a red car"]), k=3)


@pytest.fixture(scope="module")
def shapes_index(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The bundled shapes model over every circle of data/samples and as many other shapes."""
    images = json.loads((SAMPLES / "dataset.json").read_text())["images"]
    attributes = {item["filename"]: item["attributes"] for item in images}
    circles = [name for name, a in attributes.items() if a["shape"] == "circle"]
    others = [name for name, a in attributes.items() if a["shape"] != "circle"][: len(circles)]
    root = tmp_path_factory.mktemp("shapes")
    for name in circles + others:
        (root / "photos").mkdir(exist_ok=True)
        shutil.copy(SAMPLES / "images" / name, root / "photos" / name)
    settings = IndexSettings(ModelSpec(f"local-dir:{SHAPES_MODEL}", None), batch_size=64, workers=0, chunk_size=256)
    index_paths(root / "index", [root / "photos"], settings, progress=False)
    return root / "index", attributes


@pytest.mark.slow
def test_circle_minus_red_puts_no_red_circle_in_the_top_results(shapes_index):
    index_dir, attributes = shapes_index

    def kinds(results) -> list[tuple[str, str]]:
        return [(attributes[n]["shape"], attributes[n]["colour"]) for n in names(results)]

    with SearchEngine(index_dir, device="cpu") as shapes:
        plain = kinds(shapes.search(Query.of("circle"), k=10))
        minus_red = kinds(shapes.search(Query.of("circle", sub=["red"]), k=10))
        red = kinds(shapes.search(Query.of("circle", add=["2:red"]), k=10))
    assert ("circle", "red") in plain, plain  # the subtraction has something to remove
    assert ("circle", "red") not in minus_red, minus_red
    assert sum(shape == "circle" for shape, _ in minus_red) >= 3, minus_red  # still about circles
    assert sum(colour == "red" for _, colour in red) > sum(colour == "red" for _, colour in plain)


# --- filters and date order -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (Filters(after="2019-07-03", before="2019-07"), {"c2.jpg", "c3.jpg", "c4.jpg", "c5.jpg"}),
        (Filters(before="2015"), {"s0.png", "s1.png", "s2.png", "s3.png"}),
        (Filters(camera="iphone"), {f"p{i}.jpg" for i in range(6)}),
        (Filters(camera="canon", after="2019-07-06"), {"c5.jpg"}),
        (Filters(types=("png",)), {"s0.png", "s1.png", "s2.png", "s3.png"}),
        (
            Filters(types="PNG,jpeg", min_width=91),
            {f"p{i}.jpg" for i in range(6)}
            | {f"s{i}.png" for i in range(4)}
            | {"IMG_0412.jpg", "IMG_0413.jpg", "day1.jpg", "day2.jpg"},
        ),  # fmt: skip
        (Filters(min_height=73), set()),
    ],
)
def test_filters_give_exactly_the_matching_images(engine, filters, expected):
    found = engine.search(Query((Term(text="a photo"),), filters=filters, keywords=False), k=50)
    assert set(names(found)) == expected


def test_a_filter_narrows_the_search_itself_so_k_results_come_back_when_k_match(engine, library):
    everything = engine.search(Query.of("a photo", keywords=False), k=20)
    assert len(everything) == 20
    for k in (1, 3, 6):
        found = engine.search(Query.of("a photo", filters=Filters(camera="canon")), k=k)
        assert len(found) == k and folders(found) == {"canon"}
    under = engine.search(Query.of("a photo", filters=Filters(under=str(library[1] / "phone"))), k=4)
    assert len(under) == 4 and folders(under) == {"phone"}


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_a_wide_filter_over_fetches_yet_returns_exactly_the_best_matching_images(engine, k):
    everything = engine.search(Query.of("a photo", keywords=False), k=24)
    best_iphones = [r.path for r in everything if Path(r.path).parent.name == "phone"][:k]
    found = engine.search(Query.of("a photo", filters=Filters(camera="iphone")), k=k)
    assert [r.path for r in found] == best_iphones


def test_date_order_is_newest_first_over_the_same_results_and_keeps_the_min_score_cut(engine):
    by_relevance = engine.search(Query.of("a red flower"), k=8)
    by_date = engine.search(Query.of("a red flower", sort="date"), k=8)
    assert {r.path for r in by_date} == {r.path for r in by_relevance}
    dates = [r.taken_at for r in by_date]
    assert dates == sorted(dates, reverse=True) and all(dates)
    assert [r.rank for r in by_date] == list(range(1, 9))

    cut = by_relevance[3].score
    above = engine.search(Query.of("a red flower", sort="date"), k=8, min_score=cut)
    assert {r.path for r in above} == {r.path for r in by_relevance[:4]}
    assert all(r.score >= cut for r in above)


def test_dates_parse_inclusively_at_both_ends():
    assert parse_date("2019", end=False) == "2019-01-01 00:00:00"
    assert parse_date("2019", end=True) == "2019-12-31 23:59:59"
    assert parse_date("2020-02", end=True) == "2020-02-29 23:59:59"
    assert parse_date("2019-07-04 10:30", end=True) == "2019-07-04 10:30:59"
    for bad in ["yesterday", "2019-13", "2019-02-30", "2019-01-01 25:00"]:
        with pytest.raises(UsageError):
            parse_date(bad, end=False)
    with pytest.raises(UsageError, match="later than"):
        Filters(after="2020", before="2019")


# --- keywords ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "first"),
    [("IMG_0412", ["IMG_0412.jpg"]), ("paris-2019", ["day1.jpg", "day2.jpg"]), ("img_041", ["IMG_0412.jpg"])],
)
def test_a_query_that_names_a_file_finds_it_first(engine, text, first):
    found = engine.search(Query.of(text), k=10)
    assert len(found) == 10
    assert sorted(names(found)[: len(first)]) == first


def test_keywords_are_on_by_rule_or_by_choice_and_respect_filters(engine):
    assert Query.of("IMG_0412").keyword_text == "IMG_0412"
    assert Query.of("IMG_0412", keywords=False).keyword_text is None
    assert Query.of("canon photos").keyword_text is None
    assert Query.of("canon", keywords=True).keyword_text == "canon"
    found = engine.search(Query.of("canon", keywords=True), k=6)
    assert folders(found) == {"canon"}  # the folder's name matched
    hidden = engine.search(Query.of("IMG_0412", filters=Filters(types=("png",))), k=3)
    assert "IMG_0412.jpg" not in names(hidden)
    scored = engine.search(Query.of("IMG_0412"), k=3, min_score=0.999)
    assert names(scored) == ["IMG_0412.jpg"]  # a name match stays above any --min-score


# --- the CLI, the HTTP API and the client share the model -------------------------------------------------------


def invoke(*args) -> object:
    return CliRunner().invoke(cli_app, [str(a) for a in args])


def test_cli_search_and_similar_take_terms_filters_and_sort(library, engine):
    index_dir, photos = library
    minus = photos / "canon" / "c1.jpg"
    result = invoke("search", "a beach", "--index", index_dir, "--add", "2:sunset", "--sub", minus,
                    "--after", "2019", "--camera", "canon", "--sort", "date", "-k", "3", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["query"]["add"] == [{"weight": 2.0, "text": "sunset"}]
    assert payload["query"]["filters"] == {"after": "2019-01-01 00:00:00", "camera": "canon"}
    assert [Path(r["path"]).parent.name for r in payload["results"]] == ["canon"] * 3
    dates = [r["taken_at"] for r in payload["results"]]
    assert dates == sorted(dates, reverse=True)

    result = invoke("similar", photos / "phone" / "p0.jpg", "--index", index_dir, "--add", "0.5:a dog",
                    "--type", "jpg", "--min-width", "91", "--paths")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.split()
    assert str(photos / "phone" / "p0.jpg") not in lines and all(line.endswith(".jpg") for line in lines)
    assert not {Path(line).parent.name for line in lines} & {"canon", "scans"}

    result = invoke("search", "IMG_0412", "--index", index_dir, "--paths", "-k", "1")
    assert result.output.strip() == str(photos / "names" / "IMG_0412.jpg")

    result = invoke("search", "x", "--index", index_dir, "--after", "last week")
    assert result.exit_code != 0 and "cannot read the date" in result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def api(library):
    app = create_app(library[0], ServerSettings(device="cpu"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def test_the_http_api_answers_a_query_object_like_the_engine(api, engine, library):
    photo_id = engine.catalog.row_by_path(str(library[1] / "canon" / "c0.jpg")).id
    body = {
        "query": {
            "positive": [{"text": "a beach", "weight": 2}, {"image_id": photo_id, "weight": 0.5}],
            "negative": [{"text": "snow"}],
        },
        "filters": {"after": "2019", "types": ["jpg"]},
        "sort": "date",
        "k": 5,
    }
    response = api.post("/api/query", json=body)
    assert response.status_code == 200, response.text
    page = response.json()
    query = Query(
        positive=(Term(text="a beach", weight=2), Term(image_id=photo_id, weight=0.5)),
        negative=(Term(text="snow"),),
        filters=Filters(after="2019", types=("jpg",)),
        sort="date",
    )
    expected = engine.search(query, k=1000)[:5]  # date order pages through the best max_results matches
    assert [r["path"] for r in page["results"]] == [r.path for r in expected]
    assert all(r["taken_at"] for r in page["results"]) and page["query"]["sort"] == "date"

    data = base64.b64encode((library[1] / "phone" / "p2.jpg").read_bytes()).decode()
    uploaded = api.post("/api/query", json={"query": {"positive": [{"image_data": data}]}, "k": 3}).json()
    assert Path(uploaded["results"][0]["path"]).name == "p2.jpg" and uploaded["results"][0]["score"] > 0.99

    for bad in [
        {"query": {"positive": []}},
        {"query": {"positive": [{"path": "/etc/passwd"}]}},
        {"query": {"positive": [{"text": "x"}]}, "filters": {"after": "soon"}},
        {"query": {"positive": [{"text": "x"}]}, "filters": {"under": "/etc"}},
        {"query": {"positive": [{"image_data": "not base64!"}]}},
        {"query": {"positive": [{"text": "x"}]}, "sort": "size"},
    ]:
        assert api.post("/api/query", json=bad).status_code in (400, 422), bad


def test_an_unknown_key_in_a_query_body_is_refused_with_400_naming_it(api):
    """A typo in a filter must not widen a search: pydantic would drop the key, the server names it instead."""
    body = {"query": {"positive": [{"text": "x"}]}, "filters": {"camera": "canon", "has_faces": True}, "colour": 1}
    refused = api.post("/api/query", json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["detail"] == "unknown field(s) in the request: filters.has_faces, colour"
    wrong_value = api.post("/api/query", json={"query": {"positive": [{"text": "x"}]}, "filters": {"min_width": 0}})
    assert wrong_value.status_code == 422  # a known key with a bad value keeps FastAPI's detailed answer


def test_search_and_similar_take_one_option_per_filter_field():
    from dataclasses import fields

    from retrieval.store.filters import filter_spec

    for command in ("search", "similar"):
        text = invoke(command, "--help").output
        assert all(f" {filter_spec(each).flag} " in text for each in fields(Filters)), command


def test_the_page_filter_table_agrees_with_the_filters_dataclass():
    """Filters (retrieval/store/filters.py) is the one declaration: the API and the CLI are built from it; the page's
    FILTERS table in query.js and the controls in index.html must name the same fields, or this test fails."""
    from dataclasses import fields
    from typing import get_type_hints

    static = REPO / "retrieval" / "search" / "static"
    script, page = (static / "query.js").read_text(), (static / "index.html").read_text()
    table_text = re.search(r"const FILTERS = \{(.*?)\n  \};", script, re.S).group(1)
    entry = r'(\w+): \{ param: "([\w-]+)", id: "([\w-]+)", kind: "(\w+)" \}'
    table = {name: (param, id_, kind) for name, param, id_, kind in re.findall(entry, table_text)}
    assert len(table) == table_text.count("param:"), "every FILTERS entry reads as name: { param, id, kind }"
    hints = get_type_hints(Filters)
    kinds = {str | None: "text", int | None: "number", tuple[str, ...]: "list", bool | None: "flag"}
    assert {name: kinds[hints[name]] for name in (f.name for f in fields(Filters))} == {
        name: kind for name, (_, _, kind) in table.items()
    }
    controls = dict(re.findall(r'(\w+): "(f-[\w-]+)"', re.search(r"const CONTROLS = \{(.*?)\};", script).group(1)))
    form = re.search(r'<form id="filters".*?</form>', page, re.S).group(0)
    on_page = set(re.findall(r'id="(f-[\w-]+)"', form)) - set(controls.values()) - {"f-rerank"}
    assert on_page == {id_ for _, id_, _ in table.values()}, "a filter control on the page is missing from FILTERS"
    params = [param for param, _, _ in table.values()] + list(controls)
    assert len(set(params)) == len(params)


def test_the_client_sends_the_same_query_through_a_server(library, engine):
    index_dir, photos = library
    outside = write_image(index_dir.parent / "outside.jpg", 99, fmt="JPEG")  # not indexed: sent as bytes
    query = Query.of("a beach", add=[f"0.5:{outside}", str(photos / "canon" / "c2.jpg")], sub=["snow"],
                     filters=Filters(under=str(photos), camera="canon"))  # fmt: skip
    with running_server(create_app(index_dir, ServerSettings(device="cpu"))) as url:
        remote = ServerClient(url).search(query, k=4)
    assert remote == engine.search(query, k=4)
    assert np.all([r.taken_at.startswith("2019-07") for r in remote])
