"""The `clipsearch` command through typer's runner: the user story, output formats, and one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clipsearch.cli import app

runner = CliRunner()
CPU = ("--device", "cpu")  # the suite runs on the CPU also where CUDA is present


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def cli_index(tmp_path, photo_folder, tiny_model_dir):
    index_dir = tmp_path / "index"
    result = invoke("index", photo_folder, "--index", index_dir, "--model", f"local-dir:{tiny_model_dir}",
                    "--workers", "0", *CPU, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "added 16" in result.output and "failed 0" in result.output
    return index_dir


def test_user_story_index_search_similar_info(cli_index, photo_folder, tiny_model_dir):
    again = invoke("index", "--index", cli_index, "--model", f"local-dir:{tiny_model_dir}", "-q", *CPU)
    assert again.exit_code == 0 and "unchanged 16" in again.output

    table = invoke("search", "a dog on a beach at sunset", "--index", cli_index, "-k", "5", *CPU)
    assert table.exit_code == 0
    lines = table.output.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "match", "path"] and len(lines) == 6

    paths = invoke("similar", photo_folder / "img_1_000.jpg", "--index", cli_index, "-k", "3", "--paths", *CPU)
    assert paths.exit_code == 0
    listed = paths.output.strip().splitlines()
    assert len(listed) == 3 and str(photo_folder / "img_1_000.jpg") not in listed

    info = invoke("info", "--index", cli_index, *CPU)
    assert info.exit_code == 0 and "16 indexed, 0 failed" in info.output and str(photo_folder) in info.output
    # which backend answers text queries, and why (retrieval.model.text_encoder)
    assert "text:    torch text tower (no exported tower: run clipsearch export-text)" in info.output
    as_json = json.loads(invoke("info", "--index", cli_index, "--json", *CPU).output)
    assert as_json["text_queries"] == "torch text tower (no exported tower: run clipsearch export-text)"


def test_json_output_schema(cli_index):
    result = invoke("search", "mountains", "--index", cli_index, "-k", "4", "--json", *CPU)
    assert result.exit_code == 0
    payload = json.loads(result.output)
    assert payload["query"] == {"text": "mountains", "k": 4}
    assert len(payload["results"]) == 4
    for rank, item in enumerate(payload["results"], start=1):
        assert set(item) == {"rank", "score", "matched", "path", "image_id", "width", "height", "taken_at"}
        assert item["rank"] == rank and -1 <= item["score"] <= 1 and isinstance(item["image_id"], int)


def test_index_env_var_is_honoured(cli_index, monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_INDEX", str(cli_index))
    result = invoke("search", "trees", "-k", "2", "--paths", *CPU)
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 2


def test_failed_files_are_listed(tmp_path, tiny_model_dir):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.jpg").write_text("not a jpeg")
    index_dir = tmp_path / "index"
    assert (
        invoke("index", folder, "--index", index_dir, "--model", f"local-dir:{tiny_model_dir}", "-q", *CPU).exit_code
        == 0
    )
    result = invoke("info", "--index", index_dir, "--failed")
    assert "broken.jpg: not an image" in result.output


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (("search", "x", "-k", "0"), "-k must be at least 1", 2),
        (("index", "/definitely/not/here"), "no such folder", 2),
        (("similar", "/no/such/image.jpg"), "no such image file", 2),
    ],
)
def test_user_errors_are_one_line_with_nonzero_exit(cli_index, args, message, code):
    result = invoke(*args, "--index", cli_index)
    assert result.exit_code == code
    assert result.output.strip() == f"clipsearch: {message}" or message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_empty_index_and_model_mismatch_messages(tmp_path, cli_index, photo_folder):
    empty = invoke("search", "x", "--index", tmp_path / "nothing-here")
    assert empty.exit_code == 1 and "no index at" in empty.output and "Traceback" not in empty.output
    from retrieval.testing import make_random_model_dir

    other = make_random_model_dir(tmp_path / "other", seed=5)
    mismatch = invoke("index", photo_folder, "--index", cli_index, "--model", f"local-dir:{other}", "-q")
    assert mismatch.exit_code == 1 and "built with" in mismatch.output


def test_offline_default_model_fails_in_one_line(tmp_path, photo_folder, monkeypatch):
    """No weights cached and no network: one line that says how to pass a local checkpoint."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("retrieval.model.build._host_reachable", lambda host, timeout=3.0: False)
    result = invoke("index", photo_folder, "--index", tmp_path / "index", "-q")
    assert result.exit_code == 1
    assert "cannot be reached" in result.output and "--pretrained" in result.output
    assert "this checkout ships one: --model local-dir:" in result.output  # the way forward that works offline
    assert len(result.output.strip().splitlines()) == 1
