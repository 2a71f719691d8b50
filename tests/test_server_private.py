"""Issue 23: the server is private to its user and bounded under hostile load. Each test is one attack that
worked before: no credential, a symlink race on the file routes, pixel bombs and huge files as thumbnails, a full
disk under the thumbnail cache, cross-site embedding, and a client fed a hostile answer."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.pipeline import IndexSettings, index_paths
from retrieval.errors import ClipsearchError
from retrieval.search.client import ServerClient
from retrieval.search.credential import cookie_name, find_token, published_token, token_file
from retrieval.search.server import ServerSettings, create_app
from retrieval.store.layout import CATALOG_FILE
from retrieval.testing import race_against_a_link, running_server
from tests.test_server_guard import BOMB_SIDE, png_of_zeros

TOKEN = "test-token-0123456789"
RED, BLUE = (220, 20, 20), (20, 20, 220)
RACE_SECONDS = 3.0


def solid(path: Path, colour, size=(80, 60), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_spec):
    """Red photos in an indexed folder, a blue secret outside it, and a catalog row made into a pixel bomb."""
    root = tmp_path_factory.mktemp("private").resolve()
    photos = root / "photos"
    for i in range(4):
        solid(photos / f"red_{i}.png", RED)
    solid(photos / "bomb.png", (1, 2, 3))
    solid(photos / "big.png", (4, 5, 6), size=(1200, 900))
    solid(photos / "big.jpg", (7, 8, 9), size=(1200, 900), fmt="JPEG")
    secret = solid(root / "secret" / "secret.png", BLUE)
    index_paths(root / "index", [photos], IndexSettings(model=tiny_spec, workers=0), progress=False)
    # The indexer would decode a 13370 x 13370 PNG for seconds and gigabytes: write it in place of an indexed file
    # and record its size and mtime the way indexing it would have.
    bomb = photos / "bomb.png"
    bomb.write_bytes(png_of_zeros(BOMB_SIDE, BOMB_SIDE))
    facts = bomb.stat()
    with sqlite3.connect(root / "index" / CATALOG_FILE) as connection:
        connection.execute(
            "UPDATE images SET size = ?, mtime_ns = ?, width = ?, height = ? WHERE path = ?",
            (facts.st_size, facts.st_mtime_ns, BOMB_SIDE, BOMB_SIDE, str(bomb)),
        )
    return root / "index", photos, secret


def make_client(index_dir: Path, **settings) -> TestClient:
    app = create_app(index_dir, ServerSettings(device="cpu", token=TOKEN, **settings))
    return TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture(scope="module")
def client(indexed):
    with make_client(indexed[0]) as test_client:
        yield test_client


def image_id(client, path: Path) -> int:
    answer = client.get("/api/images", params={"path": str(path)}).json()
    return answer["image_id"] if "image_id" in answer else pytest.fail(str(answer))


def colour_of(jpeg: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.convert("RGB").resize((1, 1)).getpixel((0, 0))


# --- 1. a credential ----------------------------------------------------------------------------------------


def test_every_route_but_health_refuses_a_request_without_the_token(client, indexed):
    red = image_id(client, indexed[1] / "red_0.png")
    paths = ["/", "/duplicates", "/openapi.json", "/api/stats", "/api/search?q=red", f"/api/similar/{red}"]
    paths += [f"/api/images/{red}", f"/api/images/{red}/thumbnail", f"/api/images/{red}/file", "/api/duplicates"]
    for path in paths:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert "token" in response.json()["detail"]
            assert b"\x89PNG" not in response.content
        assert client.get(path).status_code in (200, 404), path  # with the token (404: no duplicates page data)
    query = {"query": {"positive": [{"text": "red"}]}}
    assert client.post("/api/query", json=query, headers={"Authorization": ""}).status_code == 401
    assert client.post("/api/query", json=query).status_code == 200
    assert client.get("/api/health", headers={"Authorization": ""}).json() == {"status": "ok"}


def test_the_page_trades_the_token_for_a_strict_http_only_cookie(indexed):
    with make_client(indexed[0]) as browser:
        browser.headers.pop("Authorization")
        assert browser.get("/?q=cat").status_code == 401
        traded = browser.get(f"/?q=cat&token={TOKEN}", follow_redirects=False)
        assert traded.status_code == 303 and traded.headers["location"] == "/?q=cat"  # the token leaves the URL
        cookie = traded.headers["set-cookie"]
        assert cookie.startswith(f"{cookie_name(8000)}={TOKEN}")
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert browser.get("/?q=cat").status_code == 200  # the cookie now
        assert browser.get("/api/stats").status_code == 200
        assert browser.get(f"/api/stats?token={TOKEN}", cookies={}).status_code == 200  # the cookie, not the query
        browser.cookies.clear()
        assert browser.get(f"/api/stats?token={TOKEN}").status_code == 401  # the API takes no token in the URL


def test_the_token_file_is_only_its_users_and_the_client_finds_it(indexed, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("CLIPSEARCH_TOKEN", raising=False)
    app = create_app(indexed[0], ServerSettings(device="cpu", token=TOKEN))
    with running_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ClipsearchError, match="refused the token"):
            ServerClient(url).search_text("red", k=2)
        with published_token(TOKEN, port) as path:
            assert path == token_file(port) and path.parent == tmp_path / "clipsearch"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            assert find_token(url) == TOKEN
            assert len(ServerClient(url).search_text("red", k=2)) == 2
        assert not path.exists()  # removed when the server stops
        assert len(ServerClient(f"{url}/?token={TOKEN}").search_text("red", k=2)) == 2


def test_serve_prints_the_page_url_with_the_token_and_search_server_finds_it(indexed, tmp_path):
    """The user's path: `clipsearch serve` prints a URL to open; `search --server URL` needs nothing more."""
    port = free_port()
    environment = os.environ | {"XDG_RUNTIME_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    environment.pop("CLIPSEARCH_TOKEN", None)
    command = [sys.executable, "-c", "from clipsearch.cli import main; main()", "serve", "--index", str(indexed[0])]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--device", "cpu"], env=environment, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = []
        while not any("?token=" in line for line in lines):
            line = server.stderr.readline()
            assert line, "serve ended without printing a URL: " + "".join(lines)
            lines.append(line)
        url = next(line.split("open ", 1)[1].strip() for line in lines if "?token=" in line)
        assert url.startswith(f"http://127.0.0.1:{port}/?token=")
        token = url.split("?token=", 1)[1]
        assert (tmp_path / "clipsearch" / f"serve-{port}.token").read_text().strip() == token
        search = [*command[:3], "search", "red", "--server", f"http://127.0.0.1:{port}", "-k", "2"]
        for _ in range(600):  # until the server listens
            result = subprocess.run(search, env=environment, capture_output=True, text=True)
            if "cannot reach" not in result.stderr:
                break
            time.sleep(0.1)
        assert result.returncode == 0, result.stderr
        assert "red_" in result.stdout
    finally:
        server.terminate()
        server.wait(30)
    assert not (tmp_path / "clipsearch" / f"serve-{port}.token").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_token_answers_everyone(indexed):
    with TestClient(create_app(indexed[0], ServerSettings(device="cpu")), base_url="http://127.0.0.1") as open_:
        assert open_.get("/api/stats").status_code == 200


# --- 2. one file-serving path: a symlink race leaks nothing ---------------------------------------------------


def test_a_symlink_race_never_leaks_the_secret_nor_answers_500(indexed, tmp_path):
    index_dir, photos, secret = indexed
    with make_client(index_dir) as client:
        victim = photos / "red_1.png"
        target = image_id(client, victim)
        seen, lock = [], threading.Lock()

        def ask(stop: threading.Event, size: int):
            cache = client.app.state.service.thumbnails.cache_dir
            while not stop.is_set():
                for route in (f"/api/images/{target}/thumbnail?size={size}", f"/api/images/{target}/file"):
                    response = client.get(route)
                    with lock:
                        seen.append((response.status_code, response.content))
                for old in cache.glob(f"{size}/*/{target}-*.jpg"):  # force fresh thumbnails
                    old.unlink(missing_ok=True)

        race_against_a_link(victim, secret, RACE_SECONDS, ask)
    secret_bytes = secret.read_bytes()
    statuses = {status for status, _ in seen}
    assert statuses <= {200, 404, 409}, statuses
    answered = [body for status, body in seen if status == 200]
    assert answered, "the race answered nothing at all"
    leaked = [
        body for body in answered if body == secret_bytes or (body[:2] == b"\xff\xd8" and colour_of(body)[2] > 150)
    ]
    assert not leaked, f"{len(leaked)} of {len(seen)} answers were the secret"
    assert all(body[:2] == b"\xff\xd8" or body == victim.read_bytes() for body in answered)  # never truncated


# --- 3. one decode budget for thumbnails ---------------------------------------------------------------------


def test_a_pixel_bomb_gets_a_placeholder_not_a_decode(client, indexed):
    bomb = image_id(client, indexed[1] / "bomb.png")
    answers = []
    threads = [
        threading.Thread(target=lambda: answers.append(client.get(f"/api/images/{bomb}/thumbnail"))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for response in answers:
        assert response.status_code == 200 and response.headers["x-clipsearch-placeholder"] == "too-large"
        assert colour_of(response.content) == pytest.approx((128, 128, 128), abs=3)


def test_large_jpegs_decode_reduced_other_formats_and_huge_files_get_a_placeholder(indexed):
    with make_client(indexed[0], max_upload_pixels=500_000) as small_budget:  # 1200 x 900 is 1.08 MP
        big_png, big_jpeg = (
            image_id(small_budget, indexed[1] / "big.png"),
            image_id(small_budget, indexed[1] / "big.jpg"),
        )
        jpeg = small_budget.get(f"/api/images/{big_jpeg}/thumbnail")
        assert jpeg.status_code == 200 and "x-clipsearch-placeholder" not in jpeg.headers  # DCT 1/2: 0.27 MP
        assert colour_of(jpeg.content) == pytest.approx((7, 8, 9), abs=4)
        png = small_budget.get(f"/api/images/{big_png}/thumbnail")
        assert png.headers["x-clipsearch-placeholder"] == "too-large"
    with make_client(indexed[0], max_thumbnail_bytes=1000) as few_bytes:
        red = image_id(few_bytes, indexed[1] / "red_2.png")
        assert few_bytes.get(f"/api/images/{red}/thumbnail").headers.get("x-clipsearch-placeholder") is None  # small
        big = image_id(few_bytes, indexed[1] / "big.jpg")
        assert (
            few_bytes.get(f"/api/images/{big}/thumbnail?size=1024").headers["x-clipsearch-placeholder"] == "too-large"
        )


def test_thumbnails_wait_for_the_decode_slots_uploads_use(indexed):
    with make_client(indexed[0], max_upload_decodes=1) as client:
        red = image_id(client, indexed[1] / "red_3.png")
        slots = client.app.state.service.decodes.slots
        slots.acquire()  # an upload decoding
        answers = []
        asking = threading.Thread(target=lambda: answers.append(client.get(f"/api/images/{red}/thumbnail?size=1024")))
        asking.start()
        asking.join(0.5)
        assert asking.is_alive() and not answers  # waiting for the slot
        slots.release()
        asking.join()
        assert answers[0].status_code == 200


def test_a_thumbnail_cache_that_cannot_be_written_still_answers(indexed):
    with make_client(indexed[0]) as client:
        client.app.state.service.thumbnails.cache_dir = Path("/dev/full/thumbnails")  # every write fails
        red = image_id(client, indexed[1] / "red_0.png")
        response = client.get(f"/api/images/{red}/thumbnail?size=1024")
        assert response.status_code == 200 and colour_of(response.content)[0] > 150


# --- 4. duplicates within a cost bound ----------------------------------------------------------------------


def test_duplicates_refuse_a_threshold_that_links_everything_and_keep_each_result(indexed):
    with make_client(indexed[0]) as client:
        for threshold in (0.0002, 0.5, 0.79):
            response = client.get("/api/duplicates", params={"threshold": threshold})
            assert response.status_code == 400 and "clipsearch duplicates" in response.json()["detail"], threshold
        jobs = client.app.state.service.duplicates
        first = client.get("/api/duplicates", params={"threshold": 0.9}).json()
        assert first["total_groups"] >= 1  # the red photos
        again = client.get("/api/duplicates", params={"threshold": 0.95}).json()
        back = client.get("/api/duplicates", params={"threshold": 0.9}).json()
        assert back["took_ms"] == first["took_ms"] and back["groups"] == first["groups"]  # kept, not recomputed
        assert again["took_ms"] != first["took_ms"] or again["groups"] != first["groups"]
        assert len(jobs._kept) == 2


def test_a_duplicates_pass_never_holds_searches_nor_runs_twice_at_once(indexed):
    with make_client(indexed[0]) as client:
        service = client.app.state.service
        started, release = threading.Event(), threading.Event()
        slow = service.duplicates._compute

        def held(threshold):
            started.set()
            release.wait(30)
            return slow(threshold)

        service.duplicates._compute = held
        answers = []
        first = threading.Thread(target=lambda: answers.append(client.get("/api/duplicates?threshold=0.9")))
        first.start()
        assert started.wait(10)
        busy = client.get("/api/duplicates", params={"threshold": 0.95})
        assert busy.status_code == 503 and busy.headers["retry-after"]
        assert client.get("/api/search", params={"q": "red"}).status_code == 200  # not behind the pass
        release.set()
        first.join()
        assert answers[0].status_code == 200


# --- 6., 7. cheap checks first; values that are not values are 400, never 500 --------------------------------


def png_data(side: int) -> str:
    import base64

    return base64.b64encode(png_of_zeros(side, side)).decode()


def test_a_query_that_cancels_out_or_has_too_many_pixels_is_refused_before_any_decode(indexed):
    with make_client(indexed[0], max_upload_decodes=1) as client:
        slots = client.app.state.service.decodes.slots
        slots.acquire()  # every decode would now answer 503: a refusal first means nothing was decoded
        try:
            same = [{"image_data": png_data(4000), "weight": 2.0}] * 16
            cancelled = {"query": {"positive": same, "negative": same}}
            response = client.post("/api/query", json=cancelled)
            assert response.status_code == 400 and "cancel each other out" in response.json()["detail"]
            many = [{"image_data": png_data(3000 + i)} for i in range(10)]  # 9 MP each: each under the 40 MP cap
            response = client.post("/api/query", json={"query": {"positive": many}})
            assert response.status_code == 413 and "together" in response.json()["detail"]
        finally:
            slots.release()


@pytest.mark.parametrize(
    "body",
    [
        '{"query": {"positive": [{"image_id": 9223372036854775808}]}}',
        '{"query": {"positive": [{"image_id": -9223372036854775809}]}}',
        '{"query": {"positive": [{"text": "red"}]}, "filters": {"min_width": 9223372036854775808}}',
        '{"query": {"positive": [{"text": "red", "weight": NaN}]}}',
        '{"query": {"positive": [{"text": "red", "weight": Infinity}]}}',
        '{"query": {"positive": [{"text": "red", "weight": 1e400}]}}',
        '{"query": {"positive": [{"text": "red"}]}, "k": 1e400}',
        '{"query": {"positive": [{"text": "red"}]}, "min_score": NaN}',
        '{"query": {"positive": [{"text": "red \\ud800"}]}}',
        '{"query": {"positive": [{"text": "red"}]}, "filters": {"camera": "\\udc80"}}',
    ],
)
def test_values_that_are_not_values_are_a_400_in_one_line(client, body):
    response = client.post("/api/query", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.text)
    assert isinstance(response.json()["detail"], str)


def test_the_cli_refuses_a_min_width_past_64_bits_in_one_line(indexed):
    from typer.testing import CliRunner

    from clipsearch.cli import app as cli_app

    result = CliRunner().invoke(
        cli_app, ["search", "red", "--index", str(indexed[0]), "--min-width", "99999999999999999999999"]
    )
    assert result.exit_code != 0 and "--min-width must be at most" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_rerank_without_a_reranker_is_a_400_not_a_503(client):
    response = client.get("/api/search", params={"q": "red", "rerank": 5})
    assert response.status_code == 400 and "no re-ranker" in response.json()["detail"]


# --- 10. paths round-trip ---------------------------------------------------------------------------------------


def test_a_path_the_api_gives_out_is_accepted_back(tmp_path, tiny_spec):
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/photos/\xe9t\xe9"))
    solid(folder / "one.png", RED)
    solid(Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")), BLUE)
    index_paths(tmp_path / "index", [tmp_path / "photos"], IndexSettings(model=tiny_spec, workers=0), progress=False)
    with make_client(tmp_path / "index") as client:
        results = client.get("/api/search", params={"q": "photo"}).json()["results"]
        assert {r["path"].rsplit("/", 1)[1] for r in results} == {"one.png", "caf\\xe9.png"}
        for result in results:
            found = client.get("/api/images", params={"path": result["path"]})
            assert found.status_code == 200 and found.json()["image_id"] == result["image_id"]
        shown_folder = results[0]["path"].rsplit("/", 1)[0]
        under = client.get("/api/search", params={"q": "photo", "under": shown_folder})
        assert under.status_code == 200 and len(under.json()["results"]) == 2


# --- 5. nothing answers cross-site ----------------------------------------------------------------------------


def test_every_answer_forbids_cross_origin_embedding(client, indexed):
    red = image_id(client, indexed[1] / "red_0.png")
    for path in (f"/api/images/{red}/file", f"/api/images/{red}/thumbnail", "/api/stats", "/api/health", "/"):
        assert client.get(path).headers["cross-origin-resource-policy"] == "same-origin", path


# --- 8. the client checks what it reads -----------------------------------------------------------------------


class Hostile(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (the standard library's name)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        with contextlib.suppress(OSError):  # the client stopped reading: what it should do
            self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>not json</html>", "not JSON"),
        (b"[1, 2]", "not a clipsearch answer"),
        (b'{"results": 3}', "no list of results"),
        (b'{"results": []}' + b" " * (40 * 2**20), "over 32 MiB"),
    ],
)
def test_the_client_says_in_one_line_what_is_wrong_with_an_answer(body, message):
    handler = type("Answer", (Hostile,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ClipsearchError, match=message) as caught:
            ServerClient(f"http://127.0.0.1:{server.server_port}", token="x").search_text("red", k=2)
        assert "\n" not in str(caught.value)
    finally:
        server.shutdown()


def test_the_server_answers_before_the_model_has_loaded_and_queries_say_why_it_did_not(tmp_path):
    """`serve` used to load the model before opening its port (13-14 s for ViT-B-32): now the page answers at
    once and a query waits for the model; when loading fails, every query says why (never a hang or a 500)."""
    from indexer.pipeline import IndexSettings, index_paths
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec
    from retrieval.testing import make_random_model_dir

    model = make_random_model_dir(tmp_path / "model", seed=1234)  # weights no other test's process holds
    photos = tmp_path / "photos"
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        solid(photos / f"p{i}.png", colour)
    spec = ModelSpec(f"local-dir:{model}", None)
    index_paths(tmp_path / "index", [photos], IndexSettings(model=spec, workers=0, export_text=False), progress=False)
    (model / "open_clip_config.json").write_text("{")  # the model cannot load any more
    Encoder.unload_all()  # (the indexing above left it loaded in this process)
    app = create_app(tmp_path / "index", ServerSettings(device="cpu", token=TOKEN), warm_in_background=True)
    with TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        assert client.get("/").status_code == 200 and client.get("/api/stats").status_code == 200
        answer = client.get("/api/search", params={"q": "red"})
        assert answer.status_code in (409, 503) and "model" in answer.json()["detail"], answer.text
