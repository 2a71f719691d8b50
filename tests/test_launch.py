"""`clipsearch.launch` reads a plain `clipsearch index` command line before typer is imported: it must read it as
typer does, and step aside for anything else (issue 27)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipsearch.launch import IndexRequest, plain_index_request

PLAIN = [
    ["index", "photos"],
    ["index", "photos", "more photos", "-q"],
    ["index", "photos", "--index", "idx", "--model", "local-dir:model", "--pretrained", "tag", "--int8"],
    ["index", "--index=idx", "--model=local-dir:m", "photos", "--quiet"],
    ["index", "a", "--index", "first", "b", "--index", "second"],  # the last one given wins
]


def _as_typer_reads(argv: list[str], environ: dict[str, str]) -> IndexRequest:
    """The `index` command's parameters as the command line itself parses ``argv``."""
    from typer.main import get_command

    from clipsearch.cli import app

    group = get_command(app)
    root = group.make_context("clipsearch", [], resilient_parsing=True)
    command = group.get_command(root, argv[0])
    params = command.make_context(argv[0], list(argv[1:]), parent=root, default_map=None).params
    index_dir = params["index_dir"] or (Path(environ["CLIPSEARCH_INDEX"]) if "CLIPSEARCH_INDEX" in environ else None)
    assert params["device"] == "auto" and not params["watch"] and params["ray"] is None
    return IndexRequest(tuple(params["paths"]), index_dir, params["model"], params["pretrained"], params["int8"])


@pytest.mark.parametrize("argv", PLAIN)
@pytest.mark.parametrize("environ", [{}, {"CLIPSEARCH_INDEX": "from-env"}])
def test_a_plain_index_command_line_is_read_as_typer_reads_it(argv, environ, monkeypatch):
    monkeypatch.delenv("CLIPSEARCH_INDEX", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert plain_index_request(argv, environ) == _as_typer_reads(argv, environ)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["search", "a dog"],
        ["index"],  # a refresh: it may have nothing to encode
        ["index", "photos", "--watch"],
        ["index", "photos", "--device", "cuda"],
        ["index", "photos", "--ray", "auto"],
        ["index", "photos", "--workers", "1"],
        ["index", "photos", "--index"],  # a missing value: typer says so
        ["index", "--", "-photos"],
        ["index", "-qv", "photos"],
    ],
)
def test_anything_else_is_left_to_the_command(argv):
    assert plain_index_request(argv, {}) is None
