"""Captions in the index (index --captions): what the caption pass costs per image, and whether caption-aware search
finds a scene by a relation query at least as often as CLIP alone.

For one generated scenes set (scripts/make_scenes_dataset.py; its held-out test split, one caption per image that
no other image of the split makes true), the test images are indexed with the CLIP model, then the caption pass
runs on its own (timed: wall and CPU seconds per image, the decoder and CLIP model load reported apart). Every test
caption is then searched the way ``clipsearch search`` does (``Query.of`` -> ``SearchEngine.search``), with the
captions' text matching on (the default fusion) and off (``--no-text-match``: CLIP alone); R@1 and R@5 of both.

    python scripts/bench_captions.py --set /tmp/scenes --clip data/models/scenes-clip \
        --captioner data/models/scenes-clip-cap [--limit 300]

Run it niced on a shared machine; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.pipeline import IndexSettings, index_paths  # noqa: E402
from retrieval.model.spec import ModelSpec  # noqa: E402
from retrieval.search.engine import SearchEngine  # noqa: E402
from retrieval.search.query import Query  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="a scenes set folder (images/, dataset.json)")
    parser.add_argument("--clip", type=Path, default=ROOT / "data" / "models" / "scenes-clip")
    parser.add_argument("--captioner", type=Path, default=None, help="default: CLIP-cap beside --clip")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    args = parser.parse_args(argv)
    images = [i for i in json.loads((args.set / "dataset.json").read_text())["images"] if i["split"] == args.split]
    images = images[: args.limit] if args.limit else images
    spec = ModelSpec(f"local-dir:{args.clip}")
    with tempfile.TemporaryDirectory() as work:
        photos, index = Path(work) / "photos", Path(work) / "index"
        photos.mkdir()
        for image in images:
            os.symlink(args.set / "images" / image["filename"], photos / image["filename"])
        settings = IndexSettings(model=spec, workers=0, device="cpu", export_text=False)
        index_paths(index, [photos], settings, progress=False)
        began, cpu = time.perf_counter(), _cpu()
        captioning = IndexSettings(
            model=spec, workers=0, device="cpu", captions=True, captioner=args.captioner, export_text=False
        )
        summary = index_paths(index, [], captioning, progress=False)
        wall, cpu = time.perf_counter() - began, _cpu() - cpu
        print(f"{len(images)} images of {args.set} ({args.split}); load average {os.getloadavg()}")
        print(f"caption pass: {summary.caption_note}")
        print(f"  the whole run (decoder + CLIP load, pass): {wall:.1f} s wall, {cpu:.1f} s CPU")
        hits = {True: [0, 0], False: [0, 0]}
        with SearchEngine(index, device="cpu") as engine:
            for image in images:
                caption = image["sentences"][0]["raw"]
                for text_match in (True, False):
                    found = engine.search(Query.of(caption, text_match=text_match), k=5)
                    names = [Path(r.path).name for r in found]
                    hits[text_match][0] += names[:1] == [image["filename"]]
                    hits[text_match][1] += image["filename"] in names
        n = len(images)
        for text_match, label in ((False, "CLIP alone (--no-text-match)"), (True, "CLIP + captions (fusion)")):
            r1, r5 = hits[text_match]
            print(f"{label:<30} R@1 {100 * r1 / n:5.1f}   R@5 {100 * r5 / n:5.1f}")


if __name__ == "__main__":
    main()
