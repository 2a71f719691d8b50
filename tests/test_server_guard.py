"""What the server refuses: other Host names (DNS rebinding), files swapped after indexing, pixel bombs and too many
uploads at once, ids past SQLite's integers; and the headers and file names it answers with."""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.pipeline import IndexSettings, index_paths
from retrieval.search.file_guard import content_disposition
from retrieval.search.security import allowed_host_names, normal_host
from retrieval.search.server import ServerSettings, create_app
from retrieval.store.catalog import Catalog
from tests.conftest import make_images, write_image

BOMB_SIDE = 13370  # 178.8 MP: just under Pillow's (doubled) global limit, so only the upload cap stops it


def png_of_zeros(width: int, height: int) -> bytes:
    """A real, decodable greyscale PNG of ``width`` x ``height`` black pixels, built row by row (little memory):
    13370 x 13370 compresses to about 180 KB and would take 179 MB to decode."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def png_bytes(seed: int, size=(96, 72)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 40 + seed).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_spec) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("guarded")
    photos = (root / "photos").resolve()
    make_images(photos, 6, seed=21)
    write_image(Path(os.fsdecode(os.fsencode(photos) + b"/caf\xe9 \xff.jpg")), seed=22, fmt="JPEG")
    index_paths(root / "index", [photos], IndexSettings(model=tiny_spec, workers=0), progress=False)
    return root / "index", photos


@pytest.fixture(scope="module")
def client(indexed):
    settings = ServerSettings(device="cpu", max_upload_decodes=1, allowed_hosts=allowed_host_names("127.0.0.1"))
    with TestClient(create_app(indexed[0], settings), base_url="http://127.0.0.1:8000") as test_client:
        yield test_client


def image_id(client, path: Path) -> int:
    return client.get("/api/images", params={"path": str(path)}).json()["image_id"]


# --- DNS rebinding and headers --------------------------------------------------------------------------------


def test_only_the_names_the_server_was_bound_for_are_answered(client):
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert client.get("/api/stats", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
        response = client.get("/api/stats", headers={"host": host})
        assert response.status_code == 400 and "not allowed" in response.text, host
        assert "images" not in response.text
    names = allowed_host_names("127.0.0.1", ["photos.lan"])
    assert {"localhost", "127.0.0.1", "::1", "photos.lan"} <= set(names)
    assert normal_host("[::1]:8000") == "::1" and normal_host("Photos.LAN:80") == "photos.lan"


def test_an_allowed_host_is_answered_and_others_still_refused(indexed):
    settings = ServerSettings(device="cpu", allowed_hosts=allowed_host_names("127.0.0.1", ["photos.lan"]))
    with TestClient(create_app(indexed[0], settings, warm=False), base_url="http://photos.lan:8000") as lan:
        assert lan.get("/api/stats").status_code == 200
        assert lan.get("/api/stats", headers={"host": "other.lan"}).status_code == 400


def test_every_answer_carries_the_security_headers_and_docs_need_no_cdn(client):
    for route in ("/", "/api/stats", "/api/images/424242", "/static/app.js", "/nope"):
        headers = client.get(route).headers
        assert headers["x-content-type-options"] == "nosniff", route
        assert headers["x-frame-options"] == "DENY", route
        assert "script-src 'self'" in headers["content-security-policy"], route
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert "/api/search" in client.get("/openapi.json").json()["paths"]


# --- files swapped after indexing -----------------------------------------------------------------------------


def test_a_photo_swapped_for_a_link_or_changed_is_not_served(client, indexed):
    photos = indexed[1]
    secret = photos.parent / "secret.txt"
    secret.write_text("root:x:0:0 the secret\n")
    victim, neighbour, edited = (photos / f"img_21_00{i}.jpg" for i in range(3))
    victim_id, neighbour_id, edited_id = (image_id(client, p) for p in (victim, neighbour, edited))
    assert client.get(f"/api/images/{victim_id}/file").content == victim.read_bytes()

    victim.unlink()
    victim.symlink_to(secret)  # the attack: /file would have served the secret as image/jpeg
    for route in (f"/api/images/{victim_id}/file", f"/api/images/{victim_id}/thumbnail"):
        response = client.get(route)
        assert response.status_code == 404 and b"secret" not in response.content, route
        assert "outside the indexed folders" in response.json()["detail"]

    neighbour.unlink()
    neighbour.symlink_to(photos / "img_21_005.jpg")  # a link to another indexed photo: not the indexed file
    assert client.get(f"/api/images/{neighbour_id}/file").status_code == 409

    stat = edited.stat()
    edited.write_bytes(png_bytes(3))  # rewritten in place under the same name
    response = client.get(f"/api/images/{edited_id}/file")
    assert response.status_code == 409 and "changed since indexing" in response.json()["detail"]
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, other size: still refused
    assert client.get(f"/api/images/{edited_id}/thumbnail").status_code == 409


def test_a_non_utf8_name_is_served_with_an_rfc5987_disposition(client, indexed):
    path = Path(os.fsdecode(os.fsencode(indexed[1]) + b"/caf\xe9 \xff.jpg"))
    catalog = Catalog(indexed[0] / "catalog.sqlite")
    row_id = catalog.row_by_path(str(path)).id
    catalog.close()
    response = client.get(f"/api/images/{row_id}/file")
    assert response.status_code == 200 and response.content == path.read_bytes()
    disposition = response.headers["content-disposition"]
    assert disposition == "inline; filename=\"caf_ _.jpg\"; filename*=UTF-8''caf%E9%20%FF.jpg"
    assert content_disposition('a"b\n.jpg') == "inline; filename=\"a_b_.jpg\"; filename*=UTF-8''a%22b%0A.jpg"


def test_ids_past_sqlite_integers_are_404_not_500(client):
    for huge in ("99999999999999999999999", str(2**63), "-1"):
        for route in (f"/api/images/{huge}", f"/api/images/{huge}/thumbnail", f"/api/images/{huge}/file"):
            assert client.get(route).status_code == 404, route
        assert client.get(f"/api/similar/{huge}").status_code == 404


# --- uploads: pixels, concurrency, memory ---------------------------------------------------------------------


def test_a_pixel_bomb_under_pillows_limit_is_refused_from_its_header(client):
    bomb = png_of_zeros(BOMB_SIDE, BOMB_SIDE)
    assert Image.open(io.BytesIO(bomb)).size == (BOMB_SIDE, BOMB_SIDE) and len(bomb) < 600_000
    results = []

    def upload():
        results.append(client.post("/api/search/image", files={"image": ("bomb.png", bomb, "image/png")}))

    threads = [threading.Thread(target=upload) for _ in range(3)]  # three at once: none decodes
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [413] * 3
    assert "178.8 MP" in results[0].json()["detail"] and "40 MP" in results[0].json()["detail"]


def test_uploads_past_the_decode_slots_get_503_with_retry_after(client):
    small = png_bytes(1, size=(640, 480))
    slots = client.app.state.service.decodes.slots  # max_upload_decodes=1: hold the one slot
    assert slots.acquire(blocking=False)
    try:
        busy = client.post("/api/search/image", files={"image": ("a.png", small, "image/png")})
    finally:
        slots.release()
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
    assert client.post("/api/search/image", files={"image": ("a.png", small, "image/png")}).status_code == 200


PEAK_RSS_SCRIPT = """
import threading, zlib
from retrieval.search.uploads import DecodeBudget, UploadTooLarge
bomb = png_of_zeros(13370, 13370)
decoder = DecodeBudget(max_pixels=40_000_000, max_concurrent=2)
refused = []
def upload():
    try:
        decoder.decode(bomb, 64)
    except UploadTooLarge:
        refused.append(1)
threads = [threading.Thread(target=upload) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(len(refused), peak_kb // 1024)  # VmHWM, not ru_maxrss: that one keeps the forking parent's peak
"""


def test_three_pixel_bombs_at_once_leave_the_peak_memory_flat():
    """Peak RSS of a fresh process that takes three 13370 x 13370 uploads at once (decoding one fully costs
    179 MB in greyscale and 536 MB as RGB; 4.8 GB were seen for three before the cap)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", inspect.getsource(png_of_zeros) + PEAK_RSS_SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    refused, peak_mb = int(out[0]), int(out[1])
    assert refused == 3
    assert peak_mb < 150, f"peak RSS {peak_mb} MB"


def test_large_uploads_are_reduced_to_about_the_model_size():
    from retrieval.images import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (1200, 900), (200, 30, 90)).save(buffer, format="PNG")
    reduced = decode_image(buffer.getvalue(), min_side=224, reduce=True)
    assert reduced.mode == "RGB" and reduced.size == (300, 225)  # reduced by 4, before the RGB conversions
    assert decode_image(buffer.getvalue(), min_side=224).size == (1200, 900)  # the indexer's decode keeps every pixel
