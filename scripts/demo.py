"""The demo: index the bundled sample images with the bundled shapes model, search by text and by image, and
evaluate recall@k on the held-out split next to random weights of the same architecture. Offline, CPU, < 2 min.

    python scripts/demo.py [--work DIR] [--fresh]

The bundled model (data/models/shapes-clip) was trained from scratch with `clipsearch train` on generated
images of coloured shapes; data/samples holds 300 other images from the same generator (200 of them the
held-out test split). data/models/shapes-clip/REPRODUCE.md has the commands that rebuild both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLES = ROOT / "data" / "samples"
MODEL_DIR = ROOT / "data" / "models" / "shapes-clip"
SCENES_CLIP = ROOT / "data" / "models" / "scenes-clip"  # its re-ranker: scenes-clip-itm beside it
SCENES_DATA = {"n_train": 6000, "n_val": 300, "n_test": 1000, "seed": 3}  # what both were trained on
SCENES_SHOWN = 200  # held-out scenes indexed for the re-ranking section
KEY = ("shape", "colour", "size", "position")
TEXT_QUERIES = 3


def describe(attributes: dict[str, str]) -> str:
    a = attributes
    return f"{a['size']} {a['colour']} {a['shape']}, {a['position']}, on {a['background']}"


def load_attributes() -> tuple[dict[str, dict[str, str]], list[dict]]:
    """File name -> attributes of every sample image, and the test-split entries of dataset.json."""
    entries = json.loads((SAMPLES / "dataset.json").read_text())["images"]
    return {e["filename"]: e["attributes"] for e in entries}, [e for e in entries if e["split"] == "test"]


def print_results(results, attributes: dict[str, dict[str, str]], wanted: dict[str, str]) -> None:
    """One line per hit; ✓ where the hit's shape, colour, size and position are those asked for."""
    for hit in results:
        found = attributes.get(Path(hit.path).name, {})
        mark = "✓" if all(found.get(k) == wanted.get(k) for k in KEY) else " "
        print(f"   {hit.rank:>2}  {hit.score:6.3f}  {mark} {Path(hit.path).name:<16} {describe(found)}")


def text_searches(engine, attributes, test_entries) -> None:
    print("\n== Text search: captions written for held-out images, top 5 (✓ = right shape, colour, size, place)")
    step = max(1, len(test_entries) // TEXT_QUERIES)
    for entry in test_entries[::step][:TEXT_QUERIES]:
        query = entry["sentences"][0]["raw"]
        print(f'\n   "{query}"')
        ranked = engine.search_text(query, k=len(attributes))
        print_results(ranked[:5], attributes, entry["attributes"])
        rank = next(hit.rank for hit in ranked if Path(hit.path).name == entry["filename"])
        print(f"   the image this caption was written for, {entry['filename']}, is at rank {rank}")


def image_search(engine, attributes, test_entries) -> None:
    entry = test_entries[len(test_entries) // 2]
    query = SAMPLES / "images" / entry["filename"]
    print(f"\n== Image search: images like {entry['filename']} ({describe(entry['attributes'])}), top 5")
    print_results(engine.search_image(query, k=5), attributes, entry["attributes"])


def print_recall(name: str, report) -> None:
    m = report.metrics
    cells = [100 * m.t2i[k] for k in (1, 5, 10)] + [100 * m.i2t[k] for k in (1, 5, 10)]
    print(f"   {name:<22}" + "".join(f"{value:7.1f}" for value in cells))


def evaluate_models(work: Path, test_entries) -> None:
    from clipsearch.lab.evaluate import EvalSettings, evaluate_annotations
    from retrieval.model.spec import ModelSpec
    from retrieval.testing import make_random_model_dir

    config = json.loads((MODEL_DIR / "open_clip_config.json").read_text())
    random_dir = work / "random-weights"
    if not random_dir.exists():
        make_random_model_dir(random_dir, config["model_cfg"], seed=0)
    n_captions = sum(len(e["sentences"]) for e in test_entries)
    print(f"\n== Eval on the held-out split: {len(test_entries)} images x {n_captions} captions, recall@k in %")
    print(f"   {'':<22}{'text→image R@1/5/10':>21}{'image→text R@1/5/10':>21}")
    for name, folder in (("bundled shapes-clip", MODEL_DIR), ("random weights", random_dir)):
        settings = EvalSettings(
            model=ModelSpec(f"local-dir:{folder}", None), index_dir=work / f"eval-{folder.name}", workers=0
        )
        report = evaluate_annotations(SAMPLES / "dataset.json", SAMPLES / "images", settings, "test", progress=False)
        print_recall(name, report)
    print("   Each test image has its own shape-colour-size-position, so every caption has exactly one right image.")


def rerank_section(work: Path) -> None:
    """A caption about two of four shapes: the dual encoder ranks a scene with the right words but the wrong
    binding first; the ITM re-ranker, reading the dual encoder's top 20, puts the described scene first."""
    from indexer.pipeline import IndexSettings, index_paths
    from retrieval.model.spec import ModelSpec
    from retrieval.search.engine import SearchEngine
    from retrieval.testing import load_script

    scenes = load_script("make_scenes_dataset")
    folder = work / "scenes"
    annotations = folder / "dataset.json"
    if not annotations.is_file():
        scenes.generate_scenes_dataset(folder, **SCENES_DATA, only_split="test", limit=SCENES_SHOWN)
    entries = json.loads(annotations.read_text())["images"]
    cells = {e["filename"]: ", ".join(e["attributes"]["cells"]) for e in entries}
    model = ModelSpec(f"local-dir:{SCENES_CLIP}", None)
    print(f"\n== Re-ranking: {SCENES_SHOWN} held-out scenes of four shapes (2x2), indexed with {SCENES_CLIP.name}")
    index_paths(work / "scenes-index", [folder / "images"], IndexSettings(model=model, workers=0), progress=False)
    with SearchEngine(work / "scenes-index", model=model) as engine:
        for entry in entries:
            query, wanted = entry["sentences"][0]["raw"], entry["filename"]
            dual = engine.search_text(query, k=3)
            if Path(dual[0].path).name == wanted:
                continue
            reranked = engine.search_text(query, k=3, rerank=20)
            if Path(reranked[0].path).name != wanted:
                continue
            print(f'   "{query}"  (cells: top left, top right, bottom left, bottom right; ✓ = the described scene)')
            for title, hits in (("dual encoder (cosine)", dual), ("--rerank 20 (ITM match probability)", reranked)):
                print(f"   {title}")
                for hit in hits:
                    name = Path(hit.path).name
                    mark = "✓" if name == wanted else " "
                    print(f"     {hit.rank}  {hit.score:6.3f}  {mark} {name}  {cells[name]}")
            print(f'   Try it: clipsearch search "{query}" --index {work / "scenes-index"} --rerank 20')
            return
    print("   (no caption among these where re-ranking fixed the first result)")


def prepare_work_folder(work: Path, fresh: bool) -> None:
    """Start over when asked, or when the bundled model changed since the last run (an index keeps its model)."""
    from retrieval.model.spec import WEIGHTS_FILE, file_digest

    digest = file_digest(MODEL_DIR / WEIGHTS_FILE)
    marker = work / "model-digest"
    if work.exists() and any(work.iterdir()) and not marker.is_file():
        sys.exit(f"demo: {work} is not empty and not a demo work folder: choose another --work folder")
    if marker.is_file() and (fresh or marker.read_text().strip() != digest):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".demo", help="work folder for the indexes (.demo/)")
    parser.add_argument("--fresh", action="store_true", help="start over: delete the demo's work folder first")
    args = parser.parse_args(argv)

    from clipsearch.cli.app import quiet_libraries

    quiet_libraries()
    from indexer.pipeline import IndexSettings, index_paths
    from retrieval.model.spec import ModelSpec
    from retrieval.search.engine import SearchEngine

    started = time.perf_counter()
    work = args.work.expanduser().resolve()
    prepare_work_folder(work, args.fresh)
    attributes, test_entries = load_attributes()
    spec = ModelSpec(f"local-dir:{MODEL_DIR}", None)
    print(f"== Index {SAMPLES / 'images'} with {MODEL_DIR}")
    summary = index_paths(work / "index", [SAMPLES / "images"], IndexSettings(model=spec, workers=0), progress=False)
    print(f"   {summary.line()}")
    with SearchEngine(work / "index", model=spec) as engine:
        text_searches(engine, attributes, test_entries)
        image_search(engine, attributes, test_entries)
    evaluate_models(work, test_entries)
    rerank_section(work)
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Work folder: {work}")
    index = work / "index"
    print(f"Browse the demo index:  . .venv/bin/activate && clipsearch serve --index {index}")
    print(f'Or from the shell:      clipsearch search "a large green triangle at the top right" --index {index}')


if __name__ == "__main__":
    main()
