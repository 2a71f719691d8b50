"""The CLI from a new user's chair: the model comes from the index, arguments are checked before anything slow,
file names cannot drive the terminal, messages say what is wrong, and help reads like a normal command line."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipsearch.cli import app
from retrieval.faults import reset_faults
from retrieval.store.catalog import Catalog
from tests.conftest import make_images, write_image

runner = CliRunner()
EVIL = "evil\x1b]0;pwned\x07\x1b[2J\x9b31m.jpg"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory, tiny_model_dir) -> Path:
    """A model folder of our own, so a test can take it away (any model load then fails loudly)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, model_copy) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cliguard")
    photos = root / "photos"
    make_images(photos, 5, seed=71)
    write_image(photos / EVIL, seed=72, fmt="JPEG")
    write_image(photos / "new\nline.jpg", seed=73, fmt="JPEG")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    args = ("index", photos, "--index", root / "index", "--model", f"local-dir:{model_copy}", "-q", "--workers", "0")
    result = invoke(*args, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root / "index", photos


def test_index_without_model_reuses_the_recorded_one(indexed, tmp_path):
    index_dir = Path(shutil.copytree(indexed[0], tmp_path / "index"))
    again = invoke("index", "--index", index_dir, "-q", "--workers", "0", "--device", "cpu")
    assert again.exit_code == 0 and "unchanged 7" in again.output, again.output
    more = tmp_path / "more"
    make_images(more, 2, seed=74)
    added = invoke("index", more, "--index", index_dir, "-q", "--workers", "0", "--device", "cpu")
    assert added.exit_code == 0 and "added 2" in added.output, added.output
    catalog = Catalog(index_dir / "catalog.sqlite")
    try:
        assert catalog.model_identity().name.startswith("local-dir:")
        assert all(catalog.row_by_path(str(path)).status == "ok" for path in more.iterdir())
    finally:
        catalog.close()


def test_the_summary_counts_failures_as_info_does(indexed):
    index_dir, _ = indexed
    summary = invoke("index", "--index", index_dir, "-q", "--workers", "0", "--device", "cpu")
    info = invoke("info", "--index", index_dir)
    assert "failed 1" in summary.output and "unchanged 7," in summary.output
    assert "7 indexed, 1 failed" in info.output


def test_table_output_escapes_control_characters_and_null_keeps_names_exact(indexed):
    index_dir, photos = indexed
    table = invoke("search", "anything", "--index", index_dir, "-k", "8", "--device", "cpu")
    assert table.exit_code == 0
    assert "\x1b" not in table.output and "\x07" not in table.output and "\x9b" not in table.output
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m.jpg" in table.output and "new\\nline.jpg" in table.output
    nul = invoke("search", "anything", "--index", index_dir, "-k", "8", "--paths", "-0", "--device", "cpu")
    listed = nul.stdout.split("\0")
    assert listed[-1] == "" and str(photos / EVIL) in listed and str(photos / "new\nline.jpg") in listed
    as_json = invoke("search", "anything", "--index", index_dir, "-k", "8", "--json", "--device", "cpu")
    assert "\x1b" not in as_json.output and json.loads(as_json.output)["results"]
    for flags in (("--json", "--paths"), ("--json", "--null")):
        refused = invoke("search", "x", "--index", index_dir, *flags)
        assert refused.exit_code == 2 and "choose one" in refused.output


def test_every_format_of_search_prints_the_same_results(indexed):
    index_dir, photos = indexed
    common = ("search", "anything", "--index", index_dir, "-k", "8", "--device", "cpu")
    as_json = json.loads(invoke(*common, "--format", "json").output)
    expected = [(r["rank"], r["path"]) for r in as_json["results"]]
    assert json.loads(invoke(*common, "--json").output) == as_json
    assert invoke(*common, "--format", "table").output == invoke(*common).output
    rows = list(csv.DictReader(io.StringIO(invoke(*common, "--format", "csv").stdout)))
    assert [(int(row["rank"]), row["path"]) for row in rows] == expected  # quoted: the newline in a name survives
    assert str(photos / "new\nline.jpg") in [row["path"] for row in rows] and float(rows[0]["score"]) <= 1
    listed = invoke(*common, "--format", "paths").stdout.splitlines()
    assert listed == invoke(*common, "--paths").stdout.splitlines() and str(photos / EVIL) in listed
    for flags in (("--format", "csv", "--json"), ("--format", "table", "--paths"), ("--format", "csv", "-0")):
        refused = invoke("search", "x", "--index", index_dir, *flags)
        assert refused.exit_code == 2 and "print different things: choose one" in refused.output, flags
        assert len(refused.output.strip().splitlines()) == 1
    assert invoke("info", "--index", index_dir, "--format", "csv").exit_code == 2  # a report is no list


@pytest.fixture(scope="module")
def copies(tmp_path_factory, model_copy) -> tuple[Path, Path]:
    """Two copies of one photo whose names carry a terminal escape and a newline, and one other photo."""
    root = tmp_path_factory.mktemp("copies")
    photos = root / "photos"
    write_image(photos / EVIL, seed=81, fmt="JPEG")
    shutil.copy(photos / EVIL, photos / "copy\nof it.jpg")
    write_image(photos / "other.png", seed=82)
    args = ("index", photos, "--index", root / "index", "--model", f"local-dir:{model_copy}", "-q", "--workers", "0")
    assert invoke(*args, "--device", "cpu").exit_code == 0
    return root / "index", photos


def test_duplicates_escapes_names_in_its_table_and_prints_every_format(copies):
    index_dir, photos = copies
    common = ("duplicates", "--index", index_dir, "--threshold", "0.99")
    table = invoke(*common)
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.output and "\x07" not in table.output and "\x9b" not in table.output
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m.jpg" in table.output and "copy\\nof it.jpg" in table.output
    assert "1 groups; 1 images besides the best of each" in table.output
    exact = {str(photos / EVIL), str(photos / "copy\nof it.jpg")}
    assert set(invoke(*common, "--paths", "-0").stdout.split("\0")) == exact | {""}
    rows = list(csv.DictReader(io.StringIO(invoke(*common, "--format", "csv").stdout)))
    assert {row["path"] for row in rows} == exact and {row["group"] for row in rows} == {"1"}
    assert sorted(row["keep"] for row in rows) == ["False", "True"]
    document = json.loads(invoke(*common, "--format", "json").output)
    assert [len(group["members"]) for group in document["groups"]] == [2]
    refused = invoke(*common, "--json", "--paths")
    assert refused.exit_code == 2 and "choose one" in refused.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("similar", "{photos}/../notes.txt"), "is not an image"),
        (("similar", "{photos}"), "is a folder, not an image file"),
        (("similar", "/dev/zero"), "is not a regular file"),
        (("search", "x", "--min-score", "2"), "--min-score must be between -1 and 1"),
        (("search", "x", "--min-score", "-1.5"), "--min-score must be between -1 and 1"),
        (("search", "x", "--under", "/no/such/folder"), "no such folder: /no/such/folder"),
        (("similar", "{photos}/img_71_000.jpg", "--under", "/no/such/folder"), "no such folder"),
        (("index", "{photos}/../empty"), "no images found in"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_model_loads(indexed, model_copy, args, message, tmp_path):
    index_dir, photos = indexed
    (photos.parent / "notes.txt").write_text("just text")
    (photos.parent / "empty").mkdir(exist_ok=True)
    hidden = model_copy.with_name("gone")
    model_copy.rename(hidden)  # any model load would now fail with another message
    try:
        result = invoke(*[a.format(photos=photos) for a in args], "--index", index_dir, "--device", "cpu")
    finally:
        hidden.rename(model_copy)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("clipsearch: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_index_path_through_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "hostname"
    blocker.write_text("a file")
    make_images(tmp_path / "p", 1, seed=75)
    result = invoke("index", tmp_path / "p", "--index", blocker / "idx", "-q")
    expected = f"clipsearch: --index {blocker / 'idx'}: {blocker} is a file, not a folder"
    assert result.exit_code == 2 and result.output.strip() == expected


def test_check_says_what_is_wrong_with_a_missing_faiss_file(indexed, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(indexed[0], index_dir)
    (index_dir / "vectors.faiss").unlink()
    result = invoke("check", "--index", index_dir)
    assert "none vectors" not in result.output and "FAISS file: missing or unreadable" in result.output


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("planned:1:sigint", "interrupted before anything was committed: the index is as it was"),
        ("commit_end:1:sigint", "interrupted; the work committed so far is kept"),
    ],
)
def test_ctrl_c_claims_committed_work_only_when_there_was_some(tmp_path, model_copy, monkeypatch, fault, message):
    make_images(tmp_path / "p", 3, seed=76)
    monkeypatch.setenv("CLIPSEARCH_FAULT", fault)
    reset_faults()
    result = invoke("index", tmp_path / "p", "--index", tmp_path / "i", "--model", f"local-dir:{model_copy}", "-q",
                    "--workers", "0", "--device", "cpu", "--batch-size", "1")  # fmt: skip
    reset_faults()
    assert result.exit_code == 130 and result.output.strip() == f"clipsearch: {message}" or message in result.output


def test_symlinked_files_are_indexed_once_and_a_link_query_is_that_image(tmp_path, model_copy):
    photos = tmp_path / "photos"
    make_images(photos, 3, seed=77)
    os.symlink("img_77_000.jpg", photos / "alias.jpg")
    elsewhere = write_image(tmp_path / "elsewhere" / "outside.jpg", seed=78)
    os.symlink(elsewhere, photos / "outside_link.jpg")
    index = invoke("index", photos, "--index", tmp_path / "i", "--model", f"local-dir:{model_copy}", "-q",
                   "--workers", "0", "--device", "cpu")  # fmt: skip
    assert "added 4" in index.output, index.output  # 3 photos + the link to a file outside the folder
    catalog = Catalog(tmp_path / "i" / "catalog.sqlite")
    try:
        assert catalog.row_by_path(str(photos / "alias.jpg")) is None
        assert catalog.row_by_path(str(photos / "outside_link.jpg")) is not None
    finally:
        catalog.close()
    similar = invoke("similar", photos / "alias.jpg", "--index", tmp_path / "i", "--paths", "--device", "cpu")
    assert similar.exit_code == 0 and str(photos / "img_77_000.jpg") not in similar.output


def test_help_reads_like_a_normal_command_line():
    for command in ("index", "search", "similar", "serve"):
        text = invoke(command, "--help").output
        assert "<bool>" not in text and "<str>" not in text and "<list[" not in text, command
    index_help = invoke("index", "--help").output
    assert "--model TEXT" in index_help and "--no-wait " in index_help and "paths... PATH" in index_help
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "1.5x faster" in invoke("search", "--help").output.replace("\n", " ") and "1.5x faster" in readme


def test_serve_without_the_web_extra_names_it_in_one_line(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = invoke("serve", "--index", tmp_path)
    assert result.exit_code == 2 and "pip install 'clipsearch[serve]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "image", "other architecture"])
def test_a_pretrained_file_that_is_no_checkpoint_of_the_model_is_one_line(tmp_path, model_copy, kind):
    """`--pretrained` given a text file, a photo, or another model's weights used to print 80 lines of traceback."""
    photos = tmp_path / "photos"
    make_images(photos, 2, seed=5)
    given = {
        "text": tmp_path / "notes.bin",
        "image": write_image(tmp_path / "photo.pt", seed=1, fmt="JPEG"),
        "other architecture": model_copy / "open_clip_model.safetensors",
    }[kind]
    if kind == "text":
        given.write_text("hello")
    result = invoke("index", photos, "--index", tmp_path / "i", "--model", "ViT-B-32", "--pretrained", given, "-q")
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [result.output.strip()], result.output
    assert f"{given} is not a ViT-B-32 checkpoint" in result.output and "Traceback" not in result.output


def test_bare_command_version_and_the_order_commands_are_listed_in():
    bare = invoke()
    assert bare.exit_code == 0 and "Commands:" in bare.output
    version = invoke("--version")
    assert version.exit_code == 0 and version.output.startswith("clipsearch ")
    listed = [line.split()[0] for line in bare.output.split("Commands:")[1].strip().splitlines()]
    assert listed[:4] == ["index", "search", "similar", "info"]
    assert listed[-4:] == ["eval", "train", "train-itm", "train-captioner"]
    assert "one per core, at most 4" in " ".join(invoke("index", "--help").output.split())
    assert "The model to evaluate" in invoke("eval", "captions", "--help").output


def test_tables_say_why_a_result_matched_and_show_the_date_they_are_sorted_by(indexed):
    index_dir, photos = indexed
    named = invoke("search", "img_71_003", "--index", index_dir, "-k", "3")
    assert named.exit_code == 0, named.output
    header, first = named.output.splitlines()[:2]
    assert header.split()[:3] == ["rank", "score", "match"]
    assert first.split()[2] == "name" and first.endswith("img_71_003.jpg")
    dated = invoke("search", "a photo", "--index", index_dir, "--sort", "date", "-k", "3", "--min-score", "-1")
    assert dated.output.splitlines()[0].split()[:4] == ["rank", "score", "match", "taken"]
    assert all(len(row.split()) >= 6 for row in dated.output.splitlines()[1:])  # the date (day and time) shown
    echoed = json.loads(invoke("search", "a photo", "--index", index_dir, "--min-score", "-1", "--json").output)
    assert echoed["query"]["min_score"] == -1 and echoed["results"][0]["matched"] == "clip"
