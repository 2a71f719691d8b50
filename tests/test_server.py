"""The HTTP API of `clipsearch serve`, with the tiny model and a real index: what a browser or script would see."""

from __future__ import annotations

import io
import shutil
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from clipsearch.cli import app as cli_app
from indexer.pipeline import IndexSettings, index_paths
from retrieval.errors import ClipsearchError, UsageError
from retrieval.search.client import ServerClient
from retrieval.search.engine import SearchEngine
from retrieval.search.server import MULTIPART_SLACK, ServerSettings, create_app
from retrieval.store.catalog import Catalog
from retrieval.testing import running_server
from tests.conftest import make_images, write_image

UPLOAD_LIMIT = 40_000


def write_rotated_jpeg(path: Path, seed: int) -> Path:
    """A landscape 120x60 JPEG whose EXIF orientation (6: rotate 90°) makes it portrait when shown upright."""
    write_image(path, seed, size=(120, 60), fmt="JPEG")
    image = Image.open(path)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif.tobytes())
    return path


def forged_png(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose header claims ``width`` x ``height`` (a decompression bomb that costs nothing)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    return data[:16] + header + zlib.crc32(b"IHDR" + header).to_bytes(4, "big") + data[33:]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_spec) -> tuple[Path, Path]:
    """(index folder, photo folder): 20 photos, 6 more in a sub-folder, one EXIF-rotated, one large, one corrupt."""
    root = tmp_path_factory.mktemp("served")
    photos = (root / "photos").resolve()
    make_images(photos, 20, seed=3)
    make_images(photos / "trips", 6, seed=4, suffix=".png")
    write_rotated_jpeg(photos / "rotated.jpg", seed=77)
    write_image(photos / "big" / "large.jpg", seed=5, size=(1600, 1200), fmt="JPEG")
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
    index_dir = root / "index"
    settings = IndexSettings(model=tiny_spec, batch_size=8, workers=0, chunk_size=8, device="cpu")
    index_paths(index_dir, [photos], settings, progress=False)
    return index_dir, photos


@pytest.fixture(scope="module")
def client(indexed) -> TestClient:
    app = create_app(indexed[0], ServerSettings(device="cpu", max_upload_bytes=UPLOAD_LIMIT))
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client


def ids(page: dict) -> list[int]:
    return [result["image_id"] for result in page["results"]]


def test_text_search_matches_the_engine_and_pages_through_every_result(client, indexed):
    with SearchEngine(indexed[0], device="cpu") as engine:
        expected = [r.image_id for r in engine.search_text("a red bicycle", k=28)]
    pages, offset = [], 0
    while True:
        page = client.get("/api/search", params={"q": "a red bicycle", "k": 10, "offset": offset}).json()
        pages.append(page)
        offset += len(page["results"])
        if not page["has_more"]:
            break
    assert [len(p["results"]) for p in pages] == [10, 10, 8]
    assert [i for p in pages for i in ids(p)] == expected
    ranks = [r["rank"] for p in pages for r in p["results"]]
    scores = [r["score"] for p in pages for r in p["results"]]
    assert ranks == list(range(1, 29)) and scores == sorted(scores, reverse=True)


def test_more_like_this_by_id_leaves_the_image_out_and_matches_similar(client, indexed):
    query = indexed[1] / "img_3_004.jpg"
    with SearchEngine(indexed[0], device="cpu") as engine:
        image_id = engine.catalog.row_by_path(str(query)).id
        expected = [r.image_id for r in engine.search_image(query, k=8)]
    page = client.get(f"/api/similar/{image_id}", params={"k": 8}).json()
    assert ids(page) == expected and image_id not in ids(page)
    assert client.get("/api/similar/999999").status_code == 404


def test_an_uploaded_copy_of_an_indexed_photo_finds_that_photo_first(client, indexed):
    data = (indexed[1] / "img_3_007.jpg").read_bytes()
    response = client.post("/api/search/image", files={"image": ("query.jpg", data, "image/jpeg")}, params={"k": 3})
    assert response.status_code == 200
    best = response.json()["results"][0]
    assert best["path"] == str(indexed[1] / "img_3_007.jpg") and best["score"] > 0.99


def test_under_and_min_score_filter_and_under_must_lie_inside_the_index(client, indexed):
    trips = indexed[1] / "trips"
    page = client.get("/api/search", params={"q": "beach", "k": 20, "under": str(trips)}).json()
    assert len(page["results"]) == 6 and all(r["path"].startswith(f"{trips}/") for r in page["results"])
    everything = client.get("/api/search", params={"q": "beach", "k": 30}).json()["results"]
    cut = everything[4]["score"]
    kept = client.get("/api/search", params={"q": "beach", "k": 30, "min_score": cut}).json()["results"]
    assert all(r["score"] >= cut for r in kept) and len(kept) < len(everything)
    for outside in ["/etc", f"{indexed[1]}/../..", "photos/trips", str(indexed[0])]:
        response = client.get("/api/search", params={"q": "beach", "under": outside})
        assert response.status_code == 400, outside
        assert "under must" in response.json()["detail"]


def test_bad_queries_get_a_readable_400(client):
    assert client.get("/api/search", params={"q": "   "}).json()["detail"] == "the query text is empty"
    assert client.get("/api/search", params={"q": "x", "k": 0}).status_code == 422
    for empty in ({"q": ""}, {}):  # used to be FastAPI's raw list of errors
        answer = client.get("/api/search", params=empty)
        assert answer.status_code == 400 and isinstance(answer.json()["detail"], str), answer.text
        assert answer.json()["detail"].startswith("q: ") and "\n" not in answer.json()["detail"]
    assert isinstance(client.get("/api/search", params={"q": "x", "k": 0}).json()["detail"], str)
    too_deep = client.get("/api/search", params={"q": "x", "k": 100, "offset": 950})
    assert too_deep.status_code == 400 and "at most 1000" in too_deep.json()["detail"]


def test_stats_report_what_is_indexed(client, indexed):
    stats = client.get("/api/stats").json()
    assert stats["images"] == 28 and stats["failed"] == 1
    assert stats["roots"] == [str(indexed[1])] and stats["embed_dim"] == 32
    assert stats["index_type"] == "flat" and stats["failures"] == []
    failures = client.get("/api/stats", params={"failed": "true"}).json()["failures"]
    assert len(failures) == 1 and failures[0][1]  # (path, reason)


def test_thumbnails_are_upright_small_jpegs_made_once_and_cached(client, indexed):
    with SearchEngine(indexed[0], device="cpu") as engine:
        rotated = engine.catalog.row_by_path(str(indexed[1] / "rotated.jpg"))
    assert (rotated.width, rotated.height) == (60, 120)  # the catalog records the upright size
    response = client.get(f"/api/images/{rotated.id}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (60, 120)  # portrait: EXIF orientation applied
    cached = list((indexed[0] / "thumbnails").rglob(f"{rotated.id}-*.jpg"))
    assert len(cached) == 1
    made_at = cached[0].stat().st_mtime_ns
    assert client.get(f"/api/images/{rotated.id}/thumbnail").content == response.content
    assert cached[0].stat().st_mtime_ns == made_at
    assert client.get(f"/api/images/{rotated.id}/thumbnail", params={"size": 300}).status_code == 400


def test_large_photos_get_thumbnails_no_larger_than_asked(client, indexed):
    image = client.get("/api/images", params={"path": str(indexed[1] / "big" / "large.jpg")}).json()
    for url, size in ((image["thumbnail_url"], 256), (image["preview_url"], 1024)):
        thumb = Image.open(io.BytesIO(client.get(url).content))
        assert thumb.size == (size, size * 3 // 4)


def test_the_original_file_is_served_byte_for_byte(client, indexed):
    path = indexed[1] / "trips" / "img_4_002.png"
    image = client.get("/api/images", params={"path": str(path)}).json()
    response = client.get(image["file_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == path.read_bytes()


def test_no_request_reaches_a_file_outside_the_index(client, indexed):
    secret = indexed[1].parent / "secret.txt"
    secret.write_text("root:x:0:0 secret")
    attempts = [
        "/api/images/../../secret.txt",
        "/api/images/%2e%2e%2f%2e%2e%2fsecret.txt/file",
        "/api/images/..%2fsecret.txt/thumbnail",
        "/static/../index/catalog.sqlite",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2fserver.py",
        "/api/images/-1/file",
        "/api/images/999999/file",
        f"/api/images?path={secret}",
        f"/api/images?path={indexed[1]}/../secret.txt",
    ]
    for attempt in attempts:
        response = client.get(attempt)
        assert response.status_code in (400, 404, 422), attempt
        assert b"secret" not in response.content and b"SQLite" not in response.content, attempt


def test_failed_and_vanished_files_are_not_served(client, indexed):
    with SearchEngine(indexed[0], device="cpu") as engine:
        broken = engine.catalog.row_by_path(str(indexed[1] / "broken.jpg"))
        gone = engine.catalog.row_by_path(str(indexed[1] / "img_3_019.jpg"))
    assert broken.status == "failed"
    assert client.get(f"/api/images/{broken.id}/file").status_code == 404
    moved_away = indexed[1].parent / "moved.jpg"
    shutil.move(indexed[1] / "img_3_019.jpg", moved_away)
    try:
        response = client.get(f"/api/images/{gone.id}/file")
        assert response.status_code == 404 and "no longer on disk" in response.json()["detail"]
        assert client.get(f"/api/images/{gone.id}/thumbnail", params={"size": 1024}).status_code == 404
    finally:
        shutil.move(moved_away, indexed[1] / "img_3_019.jpg")


def test_oversized_uploads_are_refused_before_they_are_decoded(client):
    just_over = b"\xff" * (UPLOAD_LIMIT + 1)
    response = client.post("/api/search/image", files={"image": ("big.jpg", just_over, "image/jpeg")})
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    far_over = b"\xff" * (UPLOAD_LIMIT + MULTIPART_SLACK + 1)
    response = client.post("/api/search/image", files={"image": ("big.jpg", far_over, "image/jpeg")})
    assert response.status_code == 413  # refused on its Content-Length, before reading the body

    def chunked():  # no Content-Length at all: counted while streaming
        for _ in range(40):
            yield b"\xff" * 4096

    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    assert client.post("/api/search/image", content=chunked(), headers=headers).status_code == 413


def test_uploads_are_decoded_with_the_indexing_protections(client):
    bomb = client.post("/api/search/image", files={"image": ("bomb.png", forged_png(30000, 30000), "image/png")})
    assert bomb.status_code == 400 and "decompression bomb" in bomb.json()["detail"]
    junk = client.post("/api/search/image", files={"image": ("notes.txt", b"just text", "text/plain")})
    assert junk.status_code == 400 and "not an image" in junk.json()["detail"]


def test_photos_indexed_while_serving_become_searchable_without_a_restart(tiny_spec, tmp_path):
    photos = tmp_path / "photos"
    make_images(photos, 4, seed=8)
    settings = IndexSettings(model=tiny_spec, workers=0, device="cpu")
    index_paths(tmp_path / "index", [photos], settings, progress=False)
    with TestClient(
        create_app(tmp_path / "index", ServerSettings(device="cpu")), base_url="http://127.0.0.1"
    ) as client:
        assert len(client.get("/api/search", params={"q": "cat", "k": 50}).json()["results"]) == 4
        make_images(photos, 3, seed=9)
        index_paths(tmp_path / "index", [photos], settings, progress=False)
        assert len(client.get("/api/search", params={"q": "cat", "k": 50}).json()["results"]) == 7
        assert client.get("/api/stats").json()["images"] == 7


def test_an_index_with_no_images_answers_409_with_the_reason(tmp_path):
    Catalog(tmp_path / "index" / "catalog.sqlite", create=True).close()
    with TestClient(
        create_app(tmp_path / "index", ServerSettings(device="cpu")), base_url="http://127.0.0.1"
    ) as client:
        response = client.get("/api/search", params={"q": "anything"})
        assert response.status_code == 409 and "empty" in response.json()["detail"]
        assert client.get("/api/stats").json()["images"] == 0


def test_the_page_and_the_api_schema_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="grid"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/similar/{image_id}", "/api/stats"} <= set(paths)
    assert {"/api/images/{image_id}/thumbnail", "/api/images/{image_id}/file"} <= set(paths)


def test_the_cli_searches_through_a_running_server(indexed):
    app = create_app(indexed[0], ServerSettings(device="cpu"))
    runner = CliRunner()
    query = indexed[1] / "img_3_001.jpg"
    with running_server(app) as url, SearchEngine(indexed[0], device="cpu") as engine:
        client = ServerClient(url)
        assert client.search_text("a red bicycle", k=5) == engine.search_text("a red bicycle", k=5)
        assert client.search_image(query, k=5) == engine.search_image(query, k=5)  # by id: itself left out
        outside = write_image(indexed[1].parent / "outside.png", seed=123, fmt="PNG")
        uploaded = [r.image_id for r in client.search_image(outside, k=5)]
        assert uploaded == [r.image_id for r in engine.search_image(outside, k=5)]
        result = runner.invoke(cli_app, ["search", "a red bicycle", "--server", url, "--paths", "-k", "3"])
        assert result.exit_code == 0
        assert result.stdout.split() == [r.path for r in engine.search_text("a red bicycle", k=3)]
        with pytest.raises(UsageError, match="under must"):
            client.search_text("x", under="/etc")
    with pytest.raises(ClipsearchError, match="cannot reach a clipsearch server"):
        ServerClient(url).search_text("x")


def test_serve_on_a_missing_index_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path / "none"), "--port", "0"])
    assert result.exit_code == 1
    assert "no index at" in result.stderr and "Traceback" not in result.output


def test_serve_on_a_taken_port_fails_in_one_line_before_loading_the_model(indexed):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", "--index", str(indexed[0]), "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.output
