"""The server under hostile load (issue 23): what three pixel-bomb thumbnails cost, what a symlink race leaks,
what near-duplicate thresholds cost at 10,000 images, and the latency of ordinary mixed requests meanwhile.

    python scripts/bench_hostile.py                        # this checkout
    PYTHONPATH=/path/to/old/checkout python scripts/bench_hostile.py   # the same attacks on another version

Builds a small index (the tiny random model, ``--images`` generated photos, one catalog row made into a
13370 x 13370 PNG, a secret image outside the indexed folder) and serves it from a child process, so its memory
is the server's alone. Then, in order:

1. peak RSS (VmHWM) of the server idle and after three concurrent thumbnails of the bomb;
2. ``--race-seconds`` of 4 threads asking a photo's thumbnail and file while another thread swaps the photo back
   and forth with a symbolic link to the secret: answers that were the secret, 500s, truncated answers;
3. ``--mixed`` mixed requests (text searches, combined queries, similar, details, thumbnails, stats) from
   ``--threads`` threads: p50, p99 and max latency;
4. near-duplicate groups at 5 distinct thresholds over a catalog of ``--dup-images`` CLIP-like 512-d vectors, as
   the endpoint computes them (each threshold, then each again).

Works against older versions (no token, no duplicate jobs) too, for before/after figures. The machine's load
(``uptime``) and CPU time are printed beside wall time: figures taken on a shared machine are "loaded".
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path and "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(ROOT))

from indexer.pipeline import IndexSettings, index_paths  # noqa: E402
from retrieval.model.spec import ModelSpec  # noqa: E402
from retrieval.testing import EmbeddingSpace, make_random_model_dir, race_against_a_link  # noqa: E402

BOMB_SIDE = 13370
TOKEN = "bench-token"
TRUNCATED = -1  # the status recorded for an answer cut short
THRESHOLDS = (0.9, 0.92, 0.94, 0.96, 0.98)
WORDS = ["dog", "cat", "beach", "sunset", "mountain", "river", "car", "bicycle", "city", "night", "snow", "forest"]
SERVER = """
import sys, uvicorn
from retrieval.search.server import ServerSettings, create_app
options = {"device": "cpu"}
if "token" in ServerSettings.__dataclass_fields__:
    options["token"] = sys.argv[3]
app = create_app(sys.argv[1], ServerSettings(**options))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


def png_of_zeros(side: int) -> bytes:
    import zlib

    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def build_index(root: Path, images: int) -> tuple[Path, Path, Path]:
    photos = root / "photos"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"photo_{i:04d}.jpg", quality=80)
    Image.new("RGB", (320, 240), (220, 20, 20)).save(photos / "victim.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(photos / "bomb.png")
    (root / "secret").mkdir()
    secret = root / "secret" / "secret.png"
    Image.new("RGB", (320, 240), (20, 20, 220)).save(secret)
    model = make_random_model_dir(root / "model", seed=0)
    settings = IndexSettings(model=ModelSpec(f"local-dir:{model}", None), workers=0, device="cpu")
    index_paths(root / "index", [photos], settings, progress=False)
    bomb = photos / "bomb.png"
    bomb.write_bytes(png_of_zeros(BOMB_SIDE))
    facts = bomb.stat()
    with sqlite3.connect(root / "index" / "catalog.sqlite") as connection:
        connection.execute(
            "UPDATE images SET size = ?, mtime_ns = ?, width = ?, height = ? WHERE path = ?",
            (facts.st_size, facts.st_mtime_ns, BOMB_SIDE, BOMB_SIDE, str(bomb)),
        )
    return root / "index", photos, secret


class Server:
    def __init__(self, index: Path, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(index), str(port), TOKEN])
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 300
        while self.get("/api/stats")[0] != 200:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("the server did not come up")
            time.sleep(0.2)

    def get(self, route: str, body: bytes | None = None) -> tuple[int, bytes, float]:
        request = urllib.request.Request(self.base + route, data=body, headers={"Authorization": f"Bearer {TOKEN}"})
        if body is not None:
            request.add_header("Content-Type", "application/json")
        started = time.perf_counter()
        try:
            with self.opener.open(request, timeout=300) as response:
                return response.status, response.read(), time.perf_counter() - started
        except urllib.error.HTTPError as error:
            return error.code, error.read(), time.perf_counter() - started
        except http.client.HTTPException:  # an answer cut short
            return TRUNCATED, b"", time.perf_counter() - started
        except OSError:
            return 0, b"", time.perf_counter() - started

    def memory(self, field: str) -> int:
        """VmHWM (peak) or VmRSS of the server process, in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
        return -1

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def image_ids(server: Server, photos: Path) -> dict[str, int]:
    ids = {}
    for name in ("victim.png", "bomb.png", *(f"photo_{i:04d}.jpg" for i in range(8))):
        status, body, _ = server.get("/api/images?" + urllib.parse.urlencode({"path": str(photos / name)}))
        if status == 200:
            ids[name] = json.loads(body)["image_id"]
    return ids


def bomb_thumbnails(server: Server, bomb_id: int) -> dict:
    idle_rss, idle_peak = server.memory("VmRSS"), server.memory("VmHWM")
    started = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: server.get(f"/api/images/{bomb_id}/thumbnail"), range(3)))
    return {
        "idle_rss_mib": idle_rss,
        "peak_before_mib": idle_peak,
        "peak_after_mib": server.memory("VmHWM"),
        "wall_s": round(time.perf_counter() - started, 2),
        "statuses": [status for status, _, _ in answers],
    }


def race(server: Server, index: Path, victim: Path, secret: Path, victim_id: int, seconds: float) -> dict:
    counts = {"requests": 0, "leaks": 0, "http_500": 0, "truncated": 0, "other_errors": 0}
    lock = threading.Lock()
    secret_bytes, victim_bytes = secret.read_bytes(), victim.read_bytes()

    def ask(stop: threading.Event, size: int):
        while not stop.is_set():
            for route in (f"/api/images/{victim_id}/thumbnail?size={size}", f"/api/images/{victim_id}/file"):
                status, body, _ = server.get(route)
                verdict = judge(status, body, route, secret_bytes, victim_bytes)
                with lock:
                    counts["requests"] += 1
                    if verdict:
                        counts[verdict] += 1
            with contextlib.suppress(OSError):  # another thread removed it first
                for old in (index / "thumbnails").glob(f"{size}/*/{victim_id}-*.jpg"):
                    old.unlink(missing_ok=True)

    race_against_a_link(victim, secret, seconds, ask)
    return counts


def judge(status: int, body: bytes, route: str, secret_bytes: bytes, victim_bytes: bytes) -> str | None:
    if status == TRUNCATED:
        return "truncated"
    if status >= 500 or status == 0:
        return "http_500" if status == 500 else "other_errors"
    if status != 200:
        return None
    if route.endswith("/file"):
        if body == secret_bytes:
            return "leaks"
        return None if body == victim_bytes else "truncated"
    try:
        with Image.open(io.BytesIO(body)) as image:
            red, _, blue = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
    except OSError:
        return "truncated"
    return "leaks" if blue > red else None


def mixed_requests(server: Server, ids: dict[str, int], count: int, threads: int) -> dict:
    rng = random.Random(0)
    photo_ids = [ids[name] for name in ids if name.startswith("photo_")]
    requests = []
    for number in range(count):
        kind = number % 6
        if kind == 0:
            requests.append((f"/api/search?q={rng.choice(WORDS)}+{rng.choice(WORDS)}&k=48", None))
        elif kind == 1:
            text = f"a {rng.choice(WORDS)}"
            body = {"query": {"positive": [{"text": text}], "negative": [{"text": rng.choice(WORDS)}]}, "k": 24}
            requests.append(("/api/query", json.dumps(body).encode()))
        elif kind == 2:
            requests.append((f"/api/similar/{rng.choice(photo_ids)}?k=24", None))
        elif kind == 3:
            requests.append((f"/api/images/{rng.choice(photo_ids)}", None))
        elif kind == 4:
            requests.append((f"/api/images/{rng.choice(photo_ids)}/thumbnail?size={rng.choice((256, 1024))}", None))
        else:
            requests.append(("/api/stats", None))
    started, cpu = time.perf_counter(), server.cpu_s()
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(lambda request: server.get(*request), requests))
    latencies = sorted(seconds * 1000 for _, _, seconds in answers)
    by_kind: dict[str, list[float]] = {}
    for (route, _), (_, _, seconds) in zip(requests, answers):
        kind = route.split("?")[0].rstrip("0123456789/").replace("/api/images/", "/api/images/ID/")
        by_kind.setdefault(kind, []).append(seconds * 1000)
    return {
        "requests": count,
        "threads": threads,
        "statuses": dict(sorted({s: sum(1 for a in answers if a[0] == s) for s, _, _ in answers}.items())),
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1),
        "max_ms": round(latencies[-1], 1),
        "max_ms_by_route": {kind: round(max(values), 1) for kind, values in sorted(by_kind.items())},
        "wall_s": round(time.perf_counter() - started, 2),
        "server_cpu_s": round(server.cpu_s() - cpu, 2),
    }


def duplicate_thresholds(folder: Path, images: int) -> dict:
    """The endpoint's computation over ``images`` CLIP-like vectors: ``SearchService.duplicate_groups`` as this
    version has it (its cache and bounds), without a model to load."""
    from retrieval.search.duplicates import find_duplicates
    from retrieval.store.catalog import STATUS_OK, Catalog, ImageRow, encode_embedding

    folder.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(folder / "catalog.sqlite", create=True)
    vectors = EmbeddingSpace.make(512).all_images(images - images // 10)
    rng = np.random.default_rng(3)  # a tenth are near copies (re-encodes, crops): cosines from about 0.90 to 0.998
    copies = vectors[: images // 10] + rng.uniform(0.003, 0.02, (images // 10, 1)) * rng.standard_normal(
        (images // 10, vectors.shape[1])
    ).astype(np.float32)
    vectors = np.concatenate([vectors, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    with catalog.session() as session, session.begin():
        session.add_all(
            ImageRow(
                path=f"/photos/{i:06d}.jpg", size=1000 + i, mtime_ns=i, width=640, height=480, status=STATUS_OK,
                embedding=encode_embedding(vector), indexed_at=0.0,
            )
            for i, vector in enumerate(vectors)
        )  # fmt: skip
    try:
        from retrieval.search.duplicate_jobs import DuplicateJobs

        try:  # the pairs searched once at the lowest threshold asked, filtered for higher ones
            from retrieval.search.duplicates import PairsAtLowest

            pairs = PairsAtLowest()
            jobs = DuplicateJobs(lambda threshold: pairs.groups(catalog, threshold))
            version = "duplicate jobs (pairs at the lowest threshold, filtered)"
        except ImportError:
            jobs = DuplicateJobs(lambda threshold: find_duplicates(catalog, threshold))
            version = "duplicate jobs (kept per threshold)"
        groups = lambda threshold: jobs.groups(0, threshold)[0]  # noqa: E731
    except ImportError:  # before issue 23: one result kept, each other threshold recomputed
        kept: dict[float, list] = {}

        def groups(threshold: float) -> list:
            if threshold not in kept:
                kept.clear()
                kept[threshold] = find_duplicates(catalog, threshold)
            return kept[threshold]

        version = "one threshold kept"
    timings = {}
    for label, order in (("first", THRESHOLDS), ("again", THRESHOLDS)):
        started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
        found = [len(groups(threshold)) for threshold in order]
        timings[label] = {
            "wall_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu, 2),
            "groups": found,
        }
    catalog.close()
    return {"images": images, "thresholds": THRESHOLDS, "cache": version, **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--race-seconds", type=float, default=20.0)
    parser.add_argument("--mixed", type=int, default=300)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--dup-images", type=int, default=10_000)
    parser.add_argument("--port", type=int, default=8793)
    parser.add_argument("--skip", nargs="*", default=[], choices=["bomb", "race", "mixed", "duplicates"])
    args = parser.parse_args()
    report: dict = {"code": str(Path(sys.modules["retrieval"].__file__).parents[1]), "load": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as scratch:
        root = Path(scratch)
        index, photos, secret = build_index(root, args.images)
        server = Server(index, args.port)
        try:
            ids = image_ids(server, photos)
            for name in [name for name in ids if name.startswith("photo_")][:4]:  # warm: a search, a few thumbnails
                server.get(f"/api/images/{ids[name]}/thumbnail")
            server.get("/api/search?q=warm")
            if "mixed" not in args.skip:
                report["mixed"] = mixed_requests(server, ids, args.mixed, args.threads)
            if "bomb" not in args.skip:
                report["bomb"] = bomb_thumbnails(server, ids["bomb.png"])
            if "race" not in args.skip:
                report["race"] = race(
                    server, index, photos / "victim.png", secret, ids["victim.png"], args.race_seconds
                )
        finally:
            server.stop()
        if "duplicates" not in args.skip:
            report["duplicates"] = duplicate_thresholds(root / "duplicates", args.dup_images)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
