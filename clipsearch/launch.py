"""The installed `clipsearch` command (console script, `python -m clipsearch`): what starts before the command line
is imported.

Importing and building the command line (typer, every command module, Pillow) takes the first ~0.19 s of a
process, on one core, while the other idles. A first `clipsearch index FOLDER` then builds its ONNX Runtime session
(``indexer.early_encoder``), ~0.35 s of CPU its first encode waits for. When the arguments are the plain form of
that command (``plain_index_request``), that session starts building here, on the idle core, before the command
line is imported; any other form is left to the `index` command, which starts the same thing later. The reading is
deliberately narrow: a word it does not know makes it step aside, and the command decides again in any case (a
wrong guess costs only the work: the run opens the session it needs).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

INDEX_COMMAND = "index"
VALUE_OPTIONS = {"--index": "index_dir", "--model": "model", "--pretrained": "pretrained"}
QUIET_FLAGS = ("-q", "--quiet")
INT8_FLAG = "--int8"
INDEX_ENV = "CLIPSEARCH_INDEX"  # --index's environment variable (clipsearch.cli.options.IndexOption)


@dataclass(frozen=True)
class IndexRequest:
    """What a plain `clipsearch index` command line asks for; None: not given (the command's default)."""

    paths: tuple[Path, ...]
    index_dir: Path | None = None
    model: str | None = None
    pretrained: str | None = None
    int8: bool = False


def plain_index_request(argv: list[str], environ: dict[str, str] | None = None) -> IndexRequest | None:
    """``argv`` (without the program) read as typer reads `clipsearch index PATH... [--index DIR] [--model M]
    [--pretrained P] [--int8] [-q]` (tests/test_launch.py compares the two); None for any other command line, and
    for a refresh (no PATH): only a new index is sure to encode."""
    if not argv or argv[0] != INDEX_COMMAND:
        return None
    paths: list[Path] = []
    values: dict[str, str] = {}
    int8 = False
    words = iter(argv[1:])
    for word in words:
        name, has_value, value = word.partition("=")
        if name in VALUE_OPTIONS:
            given = value if has_value else next(words, None)
            if given is None:
                return None
            values[VALUE_OPTIONS[name]] = given
        elif word == INT8_FLAG:
            int8 = True
        elif word in QUIET_FLAGS:
            continue
        elif word.startswith("-"):
            return None
        else:
            paths.append(Path(word))
    if not paths:
        return None
    index_dir = values.get("index_dir") or (environ if environ is not None else os.environ).get(INDEX_ENV) or None
    return IndexRequest(
        tuple(paths), Path(index_dir) if index_dir else None, values.get("model"), values.get("pretrained"), int8
    )


def open_encoder_first(request: IndexRequest) -> bool:
    """Start building the session a plain `clipsearch index` into a new index will encode with
    (``indexer.early_encoder``); returns whether it started. Every folder must exist: a typo exits at once."""
    if not all(path.expanduser().is_dir() for path in request.paths):
        return False
    from indexer.early_encoder import open_encoder_early
    from retrieval.model.device import resolve_device
    from retrieval.store.layout import resolve_index_dir
    from retrieval.store.recorded_model import model_for_index

    index_dir = resolve_index_dir(request.index_dir)
    try:
        spec, device = model_for_index(None, request.model, request.pretrained), resolve_device("auto")
    except Exception:  # noqa: BLE001  (whatever is wrong, the command says it in its own words)
        return False
    return open_encoder_early(index_dir, spec, device, request.int8)


def main() -> None:
    request = plain_index_request(sys.argv[1:])
    if request is not None:
        open_encoder_first(request)
    from clipsearch.cli import main as command_line

    command_line()
