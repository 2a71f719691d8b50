"""The captioning decoder: training (captions and questions), beam search, `caption` / `ask`, evaluation, and
captions in the index as one more source of per-image text.

Tiny real models: the seeded random CLIP of conftest and a decoder trained here for a few steps; what is asserted
is what a user sees (files written, lines printed, search matches), plus one memorisation check that training and
decoding really fit together. The bundled decoder's quality is measured by docs/captioning.md's commands.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.lab.caption_eval import is_true, scene_statements
from clipsearch.lab.caption_training import CaptionTrainSettings, train_captioner
from indexer.pipeline import IndexSettings, index_paths
from retrieval.model.beam_search import BeamSettings, beam_search
from retrieval.model.captioner import SPECIALS, CaptionConfig, CaptionDecoder, build_vocabulary, load_captioner
from retrieval.search.engine import SearchEngine
from retrieval.search.query import Query
from retrieval.store.catalog import Catalog
from retrieval.store.image_text import CAPTION_SOURCE, read_text
from retrieval.store.layout import IndexLayout
from retrieval.testing import load_script
from tests.crash_harness import KILLED, run_in_child

scenes = load_script("make_scenes_dataset")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The decoder's tensors are small: as training and the caption writer do, run torch on one thread (on a shared
    2-core machine a second thread mostly waits for the first: the beam search test took 6 s at load 7, 0.3 s so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return scenes.generate_scenes_dataset(tmp_path_factory.mktemp("scenes"), 40, 10, 10, seed=5)


@pytest.fixture(scope="module")
def trained(small_set: Path, tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A CLIP folder with a decoder beside it (CLIP-cap), trained by the CLI on captions and questions."""
    clip = tmp_path_factory.mktemp("models") / "clip"
    shutil.copytree(tiny_model_dir, clip)
    result = CliRunner().invoke(
        app,
        [
            "train-captioner", "--images", str(small_set.parent / "images"), "--annotations", str(small_set),
            "--questions", str(small_set.parent / "questions.json"), "--clip", f"local-dir:{clip}",
            "--steps", "6", "--eval-every", "3", "--batch-size", "16", "--width", "32", "--layers", "1", "-q",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {clip}-cap" in result.output
    return clip


def test_train_captioner_writes_a_small_decoder_beside_the_clip_model(trained: Path, small_set: Path):
    folder = trained.with_name("clip-cap")
    report = json.loads((folder / "train_report.json").read_text())
    assert [point["step"] for point in report["curve"]] == [3, 6]
    kinds = {"caption", "colour", "count", "relation", "shape"}
    assert set(report["curve"][0]["val"]["exact"]) == kinds and set(report["curve"][0]["val"]["kind_loss"]) == kinds
    assert report["best_val_loss"] == min(point["val"]["kind_mean_loss"] for point in report["curve"])
    assert report["data"]["train_sequences"]["caption"] == 160 and report["data"]["train_sequences"]["colour"] == 40
    decoder = load_captioner(folder)
    assert decoder.config.vocabulary[: len(SPECIALS)] == SPECIALS and "circle" in decoder.config.vocabulary
    assert "above" in decoder.config.vocabulary and "purple" in decoder.config.vocabulary
    assert (folder / "caption_model.safetensors").stat().st_size < 200_000  # float16, word-level output layer
    again = CliRunner().invoke(
        app,
        ["train-captioner", "--images", "x", "--annotations", "y", "--clip", f"local-dir:{trained}", "--steps", "1"],
    )
    assert again.exit_code != 0 and "already holds a captioning model" in again.output
    data = ["--images", str(small_set.parent / "images"), "--annotations", str(small_set)]
    too_deep = CliRunner().invoke(
        app,
        ["train-captioner", *data, "--clip", f"local-dir:{trained}", "--out", str(folder) + "9", "--image-stage", "9"],
    )
    assert too_deep.exit_code != 0 and "--image-stage 9: this image tower has no such feature map" in too_deep.output


def test_caption_and_ask_print_one_line_per_photo(trained: Path, small_set: Path, tmp_path: Path):
    images = sorted((small_set.parent / "images").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    model = ["--model", f"local-dir:{trained}"]
    shown = CliRunner().invoke(app, ["caption", *map(str, images), str(broken), *model])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{images[0]}\t") and "cannot read" in lines[2]
    listed = json.loads(CliRunner().invoke(app, ["caption", str(images[0]), "--json", *model]).output)
    assert listed[0]["path"] == str(images[0]) and listed[0]["error"] is None and listed[0]["caption"]
    vocabulary = set(load_captioner(trained.with_name("clip-cap")).config.vocabulary)
    assert set(listed[0]["caption"].split()) <= vocabulary
    asked = CliRunner().invoke(app, ["ask", str(images[0]), "what colour is the shape above the zebra?", *model])
    assert asked.exit_code == 0 and "never saw: zebra" in asked.output
    only_broken = CliRunner().invoke(app, ["caption", str(broken), *model])
    assert only_broken.exit_code != 0
    no_model = CliRunner().invoke(app, ["caption", str(images[0]), "--model", f"local-dir:{small_set.parent}"])
    assert no_model.exit_code != 0 and "train-captioner" in no_model.output


@pytest.fixture(scope="module")
def memorized(small_set: Path, tiny_spec, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A decoder that learned 6 photos' captions (one distinct caption each) by heart, and those photos."""
    folder = tmp_path_factory.mktemp("memorized")
    data = json.loads(small_set.read_text())
    chosen = [image for image in data["images"] if image["split"] == "train"][:6]
    for image in chosen:
        image["sentences"] = image["sentences"][:1]
    (folder / "six.json").write_text(json.dumps({"images": chosen}))
    settings = CaptionTrainSettings(
        clip=tiny_spec, steps=120, eval_every=120, batch_size=6, lr=1e-2, width=32, layers=1, label_smoothing=0.0
    )
    train_captioner(small_set.parent / "images", folder / "six.json", folder / "cap", settings, progress=False)
    return folder / "cap", chosen


def test_a_decoder_trained_on_a_few_photos_writes_their_captions_back(memorized, small_set: Path, tiny_spec):
    """Training and beam search fit together."""
    from retrieval.model.caption_writer import describe_files, open_captioner
    from retrieval.model.device import CPU

    folder, chosen = memorized
    captioner = open_captioner(tiny_spec, folder, CPU)
    paths = [small_set.parent / "images" / image["filename"] for image in chosen]
    written = [answer.text for answer in describe_files(captioner, paths)]
    expected = [image["sentences"][0]["raw"] for image in chosen]
    assert sum(w == e for w, e in zip(written, expected)) >= 5, list(zip(written, expected))


def _always(word: str) -> CaptionDecoder:
    """A decoder whose every step prefers ``word`` (then the end token, then the rest): for beam search alone."""
    vocabulary = build_vocabulary(["red blue green"])
    config = CaptionConfig(4, 8, 8, vocabulary, "key", width=16, layers=1, heads=2, max_length=16)
    model = CaptionDecoder(config).eval()
    with torch.no_grad():
        model.token_embedding.weight.copy_(torch.eye(len(vocabulary), 16))
        model.ln_final.weight.zero_()
        model.ln_final.bias.zero_()
        model.ln_final.bias[vocabulary.index(word)] = 10.0
        model.ln_final.bias[vocabulary.index("<eos>")] = 5.0
    return model


def test_beam_search_never_repeats_an_ngram_and_stops_at_max_words():
    model = _always("red")
    memory = model.image_memory(torch.zeros(2, 4, 8), torch.zeros(2, 8))
    words = model.config.vocabulary
    bos = [words.index("<bos>")]
    greedy = beam_search(model, memory, [bos] * 2, BeamSettings(beams=1, no_repeat=0, max_words=5))
    assert [words[i] for i in greedy[0]] == ["red"] * 5  # red always beats the end token: it runs to the limit
    memory = memory[:1]
    shortest = beam_search(model, memory, [bos], BeamSettings(beams=3, no_repeat=0, length_penalty=0))
    assert [words[i] for i in shortest[0]] == ["red"]  # by raw log-probability, ending at once is best
    longest = beam_search(model, memory, [bos], BeamSettings(beams=3, no_repeat=0, max_words=5, length_penalty=4))
    assert [words[i] for i in longest[0]] == ["red"] * 5  # a strong length penalty favours the long text
    fenced = beam_search(model, memory, [bos], BeamSettings(beams=3, no_repeat=2, max_words=8, length_penalty=4))[0]
    bigrams = list(zip(fenced, fenced[1:]))
    assert len(fenced) > 2 and len(bigrams) == len(set(bigrams))


def test_generated_questions_are_answered_by_the_drawn_scene(small_set: Path):
    questions = json.loads((small_set.parent / "questions.json").read_text())["questions"]
    cells = {image["filename"]: image["attributes"]["cells"] for image in json.loads(small_set.read_text())["images"]}
    assert len(questions) == 4 * len(cells)
    numbers = ["zero", "one", "two", "three", "four"]
    for question in questions:
        scene = [cell.split() for cell in cells[question["filename"]]]
        text, answer = question["question"], question["answer"]
        if question["kind"] == "count" and "shapes" in text:
            assert numbers.index(answer) == sum(c == text.split()[2] for c, _ in scene)
        elif question["kind"] == "shape" and text.endswith(" one?"):
            assert [s for c, s in scene if c == text.split()[4]] == [answer]
        elif question["kind"] == "relation":
            assert answer in ("above", "below", "left", "right")
    statements = scene_statements(small_set)
    first = json.loads(small_set.read_text())["images"][0]
    assert is_true(first["sentences"][0]["raw"].upper(), statements[first["filename"]])
    assert not is_true(first["sentences"][0]["negatives"][0]["raw"], statements[first["filename"]])


def test_eval_captioning_reports_bleu_cider_truth_and_vqa(trained: Path, small_set: Path):
    result = CliRunner().invoke(
        app,
        [
            "eval", "captions", "--captioning", "--images", str(small_set.parent / "images"),
            "--annotations", str(small_set), "--split", "test", "--model", f"local-dir:{trained}",
            "--questions", str(small_set.parent / "questions.json"), "--json", "-",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 10 and report["scenes_checked"] == 10
    assert 0 <= report["bleu4"] <= 1 and report["cider"] >= 0 and 0 <= report["true_share"] <= 1
    assert set(report["vqa"]) == {"colour", "count", "relation", "shape"}
    assert all(kind["questions"] == 10 for kind in report["vqa"].values())


def _captions(index: Path) -> dict[str, str]:
    catalog = Catalog(IndexLayout(index).catalog, create=False)
    try:
        with catalog.session() as session:
            rows = {row.id: row.path for row in catalog.rows_by_id(list(range(1, 100))).values()}
            found = {path: read_text(session, image_id, CAPTION_SOURCE) for image_id, path in rows.items()}
    finally:
        catalog.close()
    return {Path(path).name: text.lines[0]["text"] for path, text in found.items() if text.lines}


def _photos(memorized, small_set: Path, folder: Path, count: int) -> Path:
    folder.mkdir()
    for image in memorized[1][:count]:
        shutil.copy(small_set.parent / "images" / image["filename"], folder / image["filename"])
    return folder


def test_index_captions_are_searchable_text_kept_across_runs(memorized, small_set: Path, tiny_spec, tmp_path: Path):
    from fastapi.testclient import TestClient

    from retrieval.search.server import ServerSettings, create_app

    photos = _photos(memorized, small_set, tmp_path / "photos", 5)
    spec = tiny_spec
    settings = IndexSettings(
        model=spec, batch_size=8, workers=0, chunk_size=8, device="cpu", captions=True, captioner=memorized[0]
    )
    summary = index_paths(tmp_path / "index", [photos], settings, progress=False)
    assert summary.caption_note.startswith("captions: wrote 5 (0 failed)")
    captions = _captions(tmp_path / "index")
    assert len(captions) == 5 and all(captions.values())
    name, caption = next(iter(captions.items()))
    with SearchEngine(tmp_path / "index", device="cpu") as engine:
        found = engine.search(Query.of(caption), k=5)
        assert any(r.path.endswith(name) and r.matched == "text" for r in found), (captions, found)
        image_id = next(r.image_id for r in found if r.path.endswith(name))
    again = index_paths(tmp_path / "index", [], IndexSettings(model=spec, device="cpu"), progress=False)
    assert again.caption_note is None and again.encoded == 0  # recorded: kept on, nothing left to caption
    app_ = create_app(tmp_path / "index", ServerSettings(device="cpu"))
    with TestClient(app_, base_url="http://127.0.0.1") as client:
        assert client.get(f"/api/images/{image_id}").json()["caption"] == caption


@pytest.mark.slow
@pytest.mark.parametrize("point", ["caption_commit_begin:2", "caption_commit_end:2"])
def test_a_caption_pass_killed_midway_resumes(point, memorized, small_set: Path, tiny_spec, tmp_path: Path):
    photos = _photos(memorized, small_set, tmp_path / "photos", 4)
    settings = IndexSettings(
        model=tiny_spec, batch_size=8, workers=0, chunk_size=1, device="cpu", captions=True, captioner=memorized[0]
    )
    run = lambda: index_paths(tmp_path / "index", [photos], settings, progress=False)  # noqa: E731
    assert run_in_child(run, fault=point) == KILLED
    kept = len(_captions(tmp_path / "index"))
    assert kept == (1 if point.startswith("caption_commit_begin") else 2)
    summary = run()
    assert summary.encoded == 0 and summary.caption_note.startswith(f"captions: wrote {4 - kept} ")
    assert len(_captions(tmp_path / "index")) == 4


def test_the_bundled_decoder_is_small_float16_and_reads_the_bundled_scenes_clip(small_set: Path):
    from safetensors.torch import load_file

    from retrieval.model.caption_writer import describe_files, open_captioner
    from retrieval.model.device import CPU
    from retrieval.model.spec import ModelSpec, spec_key

    root = Path(__file__).resolve().parents[1] / "data" / "models"
    folder = root / "scenes-clip-cap"
    decoder = load_captioner(folder)
    spec = ModelSpec(f"local-dir:{root / 'scenes-clip'}")
    assert decoder.config.clip_key == spec_key(spec)
    captioner = open_captioner(spec, None, CPU)  # found beside scenes-clip; it reads the feature map it was trained on
    scenes = [image for image in json.loads(small_set.read_text())["images"] if image["split"] == "test"][:4]
    paths = [small_set.parent / "images" / image["filename"] for image in scenes]
    captions = [answer.text for answer in describe_files(captioner, paths)]
    statements = scene_statements(small_set)
    assert sum(is_true(c, statements[p.name]) for c, p in zip(captions, paths)) >= 3, captions
    assert all(t.dtype == torch.float16 for t in load_file(str(folder / "caption_model.safetensors")).values())
    assert (folder / "caption_model.safetensors").stat().st_size < 2_000_000
    assert {"above", "below", "left", "right", "circle", "purple", "three"} <= set(decoder.config.vocabulary)
    assert (folder / "REPRODUCE.md").is_file() and json.loads((folder / "train_report.json").read_text())["curve"]
