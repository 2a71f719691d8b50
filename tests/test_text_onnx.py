"""Torch-free text queries: the tokenizer gives open_clip's ids, the exported ONNX tower matches torch and is
recorded with its digest, a stale or damaged export falls back to torch, and the query commands never import torch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipsearch.cli import app
from indexer.pipeline import index_paths
from indexer.text_export import MIN_COSINE, tower_current
from retrieval.model.clip_tokenizer import ClipTokenizer, save_tokenizer
from retrieval.model.device import CPU
from retrieval.model.encoder import Encoder
from retrieval.model.text_onnx import TOWER_FILE, OnnxTextEncoder, TextTowerRecord
from retrieval.search.engine import SearchEngine
from retrieval.store.catalog import Catalog, MetaKey
from retrieval.store.layout import IndexLayout
from tests.conftest import make_images

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "a", "dog", "on", "the", "beach", "at", "sunset", "Red", "CAR", "café", "naïve", "Zürich", "straße", "señor",
    "東京", "夜景", "猫", "こんにちは", "서울", "Москва", "кошка", "القاهرة", "שלום", "हिन्दी", "ελληνικά", "🐶", "🌅",
    "👨‍👩‍👧", "don't", "it's", "we'll", "I'M", "they've", "O'Brien", "&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;",
    "Ã©tÃ©", "â€œquotedâ€\x9d", "1999", "3.14", "#hashtag", "@user", "e-mail", "snake_case", "CamelCase", "x" * 40,
    "...", "!?!", "<start_of_text>", "<end_of_text>", "<<end_of_text>>", "<START_OF_TEXT>", "\t", "\n", "  ",
    "\u00a0", "\u200b", "ﬁne", "Ⅻ", "①", "ｆｕｌｌｗｉｄｔｈ", "ǅ", "İstanbul", "ß", "ﬀ", "Å", "e\u0301",
    "ñ", "½", "°C", "€100",
]  # fmt: skip


def varied_strings(count: int = 1000, seed: int = 0) -> list[str]:
    """Short and long (past the context length), mixed scripts, emoji, entities, mojibake, special-token text."""
    rng = random.Random(seed)
    texts = ["", " ", "a", "A dog on the beach at sunset."]
    while len(texts) < count:
        words = rng.choice([1, 2, 3, 5, 8, 13, 40])
        texts.append(rng.choice([" ", " ", "", "  ", "\n", ", "]).join(rng.choice(WORDS) for _ in range(words)))
    return texts


def test_tokenizer_gives_open_clips_ids_without_torch(tmp_path):
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    save_tokenizer(reference, tmp_path, context_length=77)
    texts = varied_strings()
    assert sum(not text.isascii() for text in texts) > 300
    expected, got = reference(texts).numpy(), ClipTokenizer(tmp_path)(texts)
    differing = [texts[i] for i in range(len(texts)) if not np.array_equal(expected[i], got[i])]
    assert not differing, differing[:3]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_spec):
    """A tiny index with its text tower exported through the CLI, as float32 (compared exactly with torch)."""
    from indexer.pipeline import IndexSettings

    root = tmp_path_factory.mktemp("onnx")
    photos = root / "photos"
    make_images(photos, 12)
    index_dir = root / "index"
    settings = IndexSettings(model=tiny_spec, batch_size=8, workers=0, export_text=False)
    index_paths(index_dir, [photos], settings, progress=False)
    result = CliRunner().invoke(app, ["export-text", "--index", str(index_dir), "--precision", "float32"])
    assert result.exit_code == 0, result.output
    assert "exported text-tower-" in result.output and "same top-10 yes" in result.output
    return index_dir, photos


@pytest.mark.slow
def test_export_matches_torch_and_is_recorded_with_its_digest(exported, tiny_spec):
    index_dir, _ = exported
    catalog = Catalog(IndexLayout(index_dir).catalog)
    record = TextTowerRecord.from_json(catalog.get_meta(MetaKey.TEXT_TOWER))
    assert record.model_key == catalog.model_identity().key() and record.precision == "float32"
    assert record.min_cosine >= MIN_COSINE and record.top10_same
    assert tower_current(catalog, IndexLayout(index_dir))
    catalog.close()

    queries = ["a dog on a beach", "東京の夜景", "red car " * 30, "<end_of_text> x"]
    tower = OnnxTextEncoder(index_dir / record.folder, record)
    torch_vectors = Encoder.load_text_only(tiny_spec).encode_texts(queries)
    assert np.min(np.sum(tower.encode_texts(queries) * torch_vectors, axis=1)) >= MIN_COSINE
    with SearchEngine(index_dir, device="cpu") as engine:
        assert isinstance(engine.text_encoder, OnnxTextEncoder) and engine.text_choice.backend == "onnx"
        for query, vector in zip(queries, torch_vectors):
            by_torch = [r.image_id for r in engine.search_vectors(vector[None, :], k=5)[0]]
            assert [r.image_id for r in engine.search_text(query, k=5)] == by_torch

    again = CliRunner().invoke(app, ["export-text", "--index", str(index_dir), "--precision", "float32"])
    assert again.exit_code == 0 and "is current" in again.output


@pytest.mark.slow
def test_the_three_text_backends_agree(exported, tiny_spec):
    """The whole torch model, its text tower alone and the exported ONNX tower: one function, one vector."""
    index_dir, _ = exported
    Encoder.unload_all()
    texts = ["a dog on a beach", "東京の夜景", "red car " * 30, "", "<end_of_text> x"]
    with SearchEngine(index_dir, device="cpu") as engine:
        onnx = engine.text_encoder
        assert isinstance(onnx, OnnxTextEncoder) and onnx.describe() == "ONNX float32 text tower"
        by_onnx = onnx.encode_texts(texts)
    by_text_tower = Encoder.load_text_only(tiny_spec).encode_texts(texts)
    by_model = Encoder.load(tiny_spec, CPU).encode_texts(texts)
    np.testing.assert_allclose(by_text_tower, by_model, atol=1e-6)
    np.testing.assert_allclose(by_onnx, by_model, atol=1e-5)
    Encoder.unload_all()


@pytest.mark.slow
def test_a_changed_or_foreign_export_falls_back_to_torch_until_exported_again(
    exported, tmp_path, tiny_model_dir, monkeypatch
):
    import shutil

    index_dir = tmp_path / "index"
    shutil.copytree(exported[0], index_dir)
    catalog = Catalog(IndexLayout(index_dir).catalog)
    record = TextTowerRecord.from_json(catalog.get_meta(MetaKey.TEXT_TOWER))
    with SearchEngine(index_dir, device="cpu") as engine:
        expected = [r.image_id for r in engine.search_text("a dog", k=5)]

    graph = index_dir / record.folder / TOWER_FILE
    graph.write_bytes(graph.read_bytes() + b"\0")  # another file than the one checked and recorded
    with SearchEngine(index_dir, device="cpu") as engine:
        assert isinstance(engine.text_encoder, Encoder) and "files changed" in engine.text_choice.reason
        assert [r.image_id for r in engine.search_text("a dog", k=5)] == expected

    foreign = json.loads(record.to_json()) | {"model_key": "sha256:another-model"}
    catalog.set_meta(MetaKey.TEXT_TOWER, json.dumps(foreign))
    assert not tower_current(catalog, IndexLayout(index_dir))
    catalog.close()
    with SearchEngine(index_dir, device="cpu") as engine:
        assert isinstance(engine.text_encoder, Encoder)

    # an index run that encodes something exports the stale tower again (auto precision: int8 when it agrees)
    monkeypatch.setenv("CLIPSEARCH_EXPORT_TEXT", "1")
    make_images(tmp_path / "more", 1, seed=7)
    ran = CliRunner().invoke(
        app, ["index", str(tmp_path / "more"), "--index", str(index_dir), "--model", f"local-dir:{tiny_model_dir}",
              "--workers", "0", "-q"],
    )  # fmt: skip
    assert ran.exit_code == 0 and "text tower exported" in ran.output, ran.output
    assert "exporting the text tower" in ran.output  # said before the wait, not only after
    catalog = Catalog(IndexLayout(index_dir).catalog)
    record = TextTowerRecord.from_json(catalog.get_meta(MetaKey.TEXT_TOWER))
    catalog.close()
    assert record.precision == "int8" and record.int8_overlap >= 0.9 and record.top10_same
    assert [p.name for p in index_dir.glob("text-tower-*")] == [record.folder]  # the old one is gone
    with SearchEngine(index_dir, device="cpu") as engine:
        assert isinstance(engine.text_encoder, OnnxTextEncoder) and engine.text_encoder.record.precision == "int8"


QUERY_WITHOUT_TORCH = """
import atexit, os, sys
heavy = ("torch", "open_clip", "sqlalchemy", "pydantic", "ftfy", "tokenizers")
atexit.register(lambda: os.write(2, ("LOADED: " + " ".join(m for m in heavy if m in sys.modules) + "\\n").encode()))
sys.argv = ["clipsearch", *sys.argv[1:]]
from clipsearch.cli import main
main()
"""


@pytest.mark.slow
def test_query_commands_never_import_torch(exported):
    index_dir, photos = exported
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPSEARCH_INDEX": str(index_dir)}
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, clipsearch.cli; assert 'torch' not in sys.modules"], env=env, cwd=ROOT
    )
    assert imported.returncode == 0
    outputs = {}
    for args in (["search", "a dog", "--json"], ["info"], ["similar", str(photos / "img_0_001.jpg"), "--json"]):
        done = subprocess.run(
            [sys.executable, "-c", QUERY_WITHOUT_TORCH, *args], env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        loaded = done.stderr.rsplit("LOADED:", 1)[1].split()
        assert "torch" not in loaded and "open_clip" not in loaded, args
        if args[0] == "search":  # a text query: no ORM (plain sqlite3), no pydantic (typer's adapters), no ftfy
            assert loaded == [], loaded
        outputs[args[0]] = done.stdout
    with SearchEngine(index_dir, device="cpu") as engine:  # in this process: torch's flat scan
        for command, results in (
            ("search", engine.search_text("a dog")),
            ("similar", engine.search_image(photos / "img_0_001.jpg")),
        ):
            printed = json.loads(outputs[command])["results"]
            assert [item["image_id"] for item in printed] == [r.image_id for r in results]
    assert "12 indexed" in outputs["info"]
    assert "text:    ONNX float32 text tower (exported, current)" in outputs["info"]  # what answers, and why


BUNDLED = ROOT / "data" / "models" / "shapes-clip"  # its weights are stored as float16


@pytest.mark.slow
def test_the_python_api_exports_and_export_text_works_from_a_fresh_process_on_the_bundled_model(tmp_path, monkeypatch):
    """The demo's path: index_paths (the Python API) with the bundled fp16 model, then `clipsearch export-text`
    and `clipsearch info` as a user runs them, each in a new process. export-text used to segfault here (the
    float32 graph held fp16 weights), and the API's index answered text queries through torch."""
    from indexer.pipeline import IndexSettings
    from retrieval.model.spec import ModelSpec

    monkeypatch.setenv("CLIPSEARCH_EXPORT_TEXT", "1")  # the suite turns the export after indexing off
    photos = tmp_path / "photos"
    make_images(photos, 6)
    index_dir = tmp_path / "index"
    spec = ModelSpec(f"local-dir:{BUNDLED}", None)
    summary = index_paths(index_dir, [photos], IndexSettings(model=spec, workers=0), progress=False)
    assert summary.text_tower_note and "text tower exported" in summary.text_tower_note
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPSEARCH_INDEX": str(index_dir)}

    def clipsearch(*args):
        command = [sys.executable, "-c", "from clipsearch.cli import main; main()", *args]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    done = clipsearch("export-text", "--force", "--precision", "float32")
    assert done.returncode == 0 and "(float32;" in done.stdout, done.stderr
    info = clipsearch("info")
    assert "ONNX float32 text tower (exported, current)" in info.stdout, info.stdout
    assert not list(index_dir.glob(".text-tower-tmp-*"))


def test_a_graph_onnxruntime_cannot_run_is_refused_before_it_is_used(tmp_path):
    from indexer.text_export import TextExportError, check_in_fresh_process

    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07" + os.urandom(2000))
    with pytest.raises(TextExportError, match="onnxruntime cannot run the exported text tower"):
        check_in_fresh_process(tmp_path, "broken.onnx")


def test_check_reports_and_repair_removes_what_a_killed_export_left(exported):
    index_dir, _ = exported
    leftover = index_dir / ".text-tower-tmp-99999"
    leftover.mkdir()
    (leftover / "text-float32.onnx").write_bytes(b"half written")
    runner = CliRunner()
    found = runner.invoke(app, ["check", "--index", str(index_dir)])
    assert "temporary file(s) left by an interrupted save or export" in found.output, found.output
    repaired = runner.invoke(app, ["check", "--index", str(index_dir), "--repair"])
    assert repaired.exit_code == 0 and not leftover.exists(), repaired.output


def test_an_older_export_with_a_tokenizer_json_gives_the_same_ids(tmp_path):
    """Exports made before bpe-merges.txt hold HF tokenizers' tokenizer.json: its merges are read instead."""
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    save_tokenizer(reference, tmp_path, context_length=77)
    merges = (tmp_path / "bpe-merges.txt").read_text(encoding="utf-8").splitlines()
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer-settings.json").write_bytes((tmp_path / "tokenizer-settings.json").read_bytes())
    (old / "tokenizer.json").write_text(json.dumps({"model": {"merges": [m.split(" ") for m in merges]}}))
    texts = varied_strings(200, seed=3)
    np.testing.assert_array_equal(ClipTokenizer(old)(texts), reference(texts).numpy())


def test_printable_ascii_without_an_entity_is_what_ftfy_leaves_it():
    """Why a plain query skips importing ftfy: on such text ftfy.fix_text changes nothing."""
    import string

    import ftfy

    rng = random.Random(5)
    alphabet = string.printable.replace("&", "").replace("\t", "").replace("\n", "")[:-3]  # no \r \x0b \x0c
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    texts += ["a dog on the beach", "IMG_0412.jpg", "<b>x</b>", "don't 'quote' \"me\"", "a -- b ... c"]
    assert all(text.isascii() and text.isprintable() for text in texts)
    assert [text for text in texts if ftfy.fix_text(text) != text] == []


def _copy_of_export(exported, tmp_path: Path) -> tuple[Path, TextTowerRecord]:
    """A copy of the exported index to damage, and its text tower's record."""
    import shutil

    index_dir = tmp_path / "index"
    shutil.copytree(exported[0], index_dir)
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        return index_dir, TextTowerRecord.from_json(catalog.get_meta(MetaKey.TEXT_TOWER))
    finally:
        catalog.close()


@pytest.mark.slow
def test_the_optimised_graph_is_kept_beside_the_export_and_answers_the_same(exported, tmp_path):
    from retrieval.model.text_onnx import side_file

    index_dir, record = _copy_of_export(exported, tmp_path)
    folder = index_dir / record.folder
    for kept in folder.glob(f"{TOWER_FILE}.ort-*.onnx"):
        kept.unlink()
    texts = ["a dog on a beach", "東京の夜景", "red car " * 30]
    plain = OnnxTextEncoder(folder, record).encode_texts(texts)  # no copy kept unless asked
    assert not list(folder.glob(f"{TOWER_FILE}.ort-*.onnx"))
    first = OnnxTextEncoder(folder, record, keep_optimized=True).encode_texts(texts)
    (kept,) = folder.glob(f"{TOWER_FILE}.ort-*.onnx")
    again = OnnxTextEncoder(folder, record, keep_optimized=True).encode_texts(texts)  # loads the kept copy
    np.testing.assert_allclose(first, plain, atol=1e-5)
    np.testing.assert_allclose(again, plain, atol=1e-5)
    graph = folder / TOWER_FILE
    os.utime(graph, ns=(graph.stat().st_atime_ns, graph.stat().st_mtime_ns + 1000))  # another graph: not reused
    OnnxTextEncoder(folder, record, keep_optimized=True)
    (other,) = folder.glob(f"{TOWER_FILE}.ort-*.onnx")
    assert other.name != kept.name
    side = folder / side_file(TOWER_FILE)
    os.utime(side, ns=(side.stat().st_atime_ns, side.stat().st_mtime_ns + 1000))  # other weights: not reused
    OnnxTextEncoder(folder, record, keep_optimized=True)
    assert [p.name for p in folder.glob(f"{TOWER_FILE}.ort-*.onnx")] not in ([], [other.name])


@pytest.mark.slow
def test_the_text_tower_keeps_its_weights_in_a_recorded_side_file(exported, tmp_path):
    """The graph's weights sit in one side file beside it, recorded with it: without it the export is not used."""
    from retrieval.model.text_onnx import side_file

    index_dir, record = _copy_of_export(exported, tmp_path)
    folder = index_dir / record.folder
    side = folder / side_file(TOWER_FILE)
    assert side.name in record.files and side.stat().st_size > (folder / TOWER_FILE).stat().st_size
    assert not [p.name for p in folder.glob("text-*.onnx*")]  # the float32/int8 work files went with their graphs
    with SearchEngine(index_dir, device="cpu") as engine:
        assert isinstance(engine.text_encoder, OnnxTextEncoder)
    side.unlink()
    with SearchEngine(index_dir, device="cpu") as engine:
        assert isinstance(engine.text_encoder, Encoder) and "files changed" in engine.text_choice.reason
