"""Per-query cost of `search --rerank N` against plain search, on an existing index (warm, median of queries).

    python scripts/bench_rerank.py --index DIR --annotations dataset.json [--split test] [--depth 50] [--queries 20]

The re-ranker decodes the N candidates' files, runs the image tower on them and the fusion model on N pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--annotations", type=Path, required=True, help="captions to use as queries (Karpathy)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from retrieval.search.engine import SearchEngine

    torch.set_num_threads(args.threads)
    images = [i for i in json.loads(args.annotations.read_text())["images"] if i["split"] == args.split]
    queries = [i["sentences"][0]["raw"] for i in images[: args.queries]]
    with SearchEngine(args.index, device="cpu") as engine:
        engine.search_text(queries[0], k=10, rerank=args.depth)  # load both models
        for name, depth in (("plain", None), (f"rerank {args.depth}", args.depth)):
            times = []
            for query in queries:
                began = time.perf_counter()
                engine.search_text(query, k=10, rerank=depth)
                times.append(1000 * (time.perf_counter() - began))
            print(f"{name:<10} median {statistics.median(times):7.1f} ms  (min {min(times):.1f}, {len(times)} queries)")


if __name__ == "__main__":
    main()
