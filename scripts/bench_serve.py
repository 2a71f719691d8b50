"""Warm HTTP latency of text queries against a real `clipsearch serve` on an existing index.

    python scripts/bench_serve.py INDEX_DIR [PORT]

Starts the server, waits until it answers, times 60 distinct text queries (k=48) after one warm-up, prints the
median and p90 over HTTP and the server's own median, then stops the server.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from retrieval.search.credential import find_token

WORDS = ["dog", "cat", "beach", "sunset", "mountain", "river", "car", "bicycle", "city", "night", "snow", "forest"]


def wait_until_up(base: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/api/health", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not come up")


def main() -> None:
    index = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8791
    clipsearch = str(Path(sys.executable).parent / "clipsearch")
    server = subprocess.Popen([clipsearch, "serve", "--index", index, "--port", str(port)])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base)
        token = find_token(base)  # the server's token file
        queries = [f"a {a} near a {b}" for a in WORDS for b in WORDS][:61]
        http_ms, server_ms = [], []
        for number, query in enumerate(queries):
            started = time.perf_counter()
            url = f"{base}/api/search?" + urllib.parse.urlencode({"q": query, "k": 48})
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            body = json.load(urllib.request.urlopen(request))
            if number:  # the first query warms up
                http_ms.append((time.perf_counter() - started) * 1000)
                server_ms.append(body["took_ms"])
        http_ms.sort()
        print(
            f"HTTP p50 {statistics.median(http_ms):.1f} ms, p90 {http_ms[int(0.9 * len(http_ms))]:.1f} ms, "
            f"server p50 {statistics.median(server_ms):.1f} ms over {len(http_ms)} queries"
        )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
