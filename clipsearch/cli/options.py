"""Options shared by several commands, declared once (typer's declarations are data, not logic)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from functools import wraps
from pathlib import Path
from typing import Annotated, TypeVar, get_type_hints

import typer

from retrieval.store.filters import Filters, filter_spec
from retrieval.store.index_types import choices_help

F = TypeVar("F", bound=Callable[..., object])

IndexOption = Annotated[
    Path | None,
    typer.Option(
        "--index", envvar="CLIPSEARCH_INDEX", help="Index folder (default: XDG data dir).", show_default=False
    ),
]

BF16TextOption = Annotated[
    bool,
    typer.Option(
        "--bf16-text", help="CPU: encode text queries with a bfloat16 text tower (about 1.5x faster text queries)."
    ),
]

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="open_clip model name, or local-dir:FOLDER with a saved model (default: the index's own model; "
        "new indexes: ViT-B-32).",
        show_default=False,
    ),
]
PretrainedOption = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="open_clip pretrained tag, or a checkpoint file path (default with --model ViT-B-32: laion2b_s34b_b79k).",
        show_default=False,
    ),
]
KOption = Annotated[int, typer.Option("-k", "--top-k", help="How many results.")]
MinScoreOption = Annotated[float | None, typer.Option("--min-score", help="Drop results below this cosine score.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print results as JSON.")]
PathsOption = Annotated[bool, typer.Option("--paths", help="Print one path per line (for piping).")]
NullOption = Annotated[
    bool, typer.Option("--null", "-0", help="Print paths ending in NUL instead of a newline (for xargs -0).")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda (fp16 on CUDA).")]
IndexTypeOption = Annotated[
    str | None,
    typer.Option(
        "--index-type",
        help=f"Vector index: {choices_help()}. Kept for later runs; default: the index's own (new indexes: auto).",
        show_default=False,
    ),
]
MaxMemoryOption = Annotated[
    str | None,
    typer.Option(
        "--max-memory", help="Memory budget auto plans the vector index with, e.g. 4G (default: half the RAM)."
    ),
]
ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="CLIPSEARCH_SERVER",
        help="Ask a running `clipsearch serve` (e.g. http://127.0.0.1:8000) instead of loading the model.",
        show_default=False,
    ),
]
NoWaitOption = Annotated[bool, typer.Option("--no-wait", help="Fail instead of waiting for a running indexer.")]
BatchOption = Annotated[int, typer.Option("--batch-size", help="Images per encoder batch.")]
IndexBatchOption = Annotated[
    int | None, typer.Option("--batch-size", help="Images per encoder batch (default: 32 on the CPU, 256 on CUDA).")
]
WorkersOption = Annotated[int | None, typer.Option("--workers", help="Decoding processes (default: cores).")]

# --- combined queries and filters (search, similar) ---------------------------------------------------------------
AddOption = Annotated[
    list[str] | None,
    typer.Option(
        "--add",
        help="Also look for this: a text, or an image file (an existing path), weighted as 2:snow or "
        "0.5:./ref.jpg. Repeatable.",
        show_default=False,
    ),
]
SubOption = Annotated[
    list[str] | None,
    typer.Option("--sub", help="Look away from this (same forms as --add). Repeatable.", show_default=False),
]


_POSITIONAL_OR_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _filter_parameters() -> list[inspect.Parameter]:
    """One option per field of ``Filters``, from its ``FilterSpec`` (a list field is one comma-separated text)."""
    hints = get_type_hints(Filters)
    found = []
    for each in fields(Filters):
        spec = filter_spec(each)
        kind = str | None if isinstance(each.default, tuple) else hints[each.name]
        option = typer.Option(spec.flag, help=spec.description, metavar=spec.metavar, show_default=False)
        annotation = Annotated[kind, option]
        found.append(
            inspect.Parameter(each.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=annotation)
        )
    return found


def filter_options(command: F) -> F:
    """The filter option group of search and similar: ``command``'s ``filters`` parameter becomes one option per
    field of ``Filters``, and ``command`` is called with the ``Filters`` they make. A new filter field needs no
    change here."""
    signature = inspect.signature(command)
    hints = get_type_hints(command, include_extras=True)
    names = [each.name for each in fields(Filters)]
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name == "filters":
            parameters += _filter_parameters()
        else:
            parameters.append(parameter.replace(annotation=hints[parameter.name]))

    @wraps(command)
    def with_filters(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in names}
        return command(*args, filters=Filters(**{k: v for k, v in given.items() if v is not None}), **kwargs)

    with_filters.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    with_filters.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_filters  # type: ignore[return-value]


SortOption = Annotated[str, typer.Option("--sort", help="relevance, or date (newest first, among the same results).")]
KeywordsOption = Annotated[
    bool | None,
    typer.Option(
        "--keywords/--no-keywords",
        help="Fuse CLIP's ranking with file and folder names (default: on when the text looks like a file name: "
        "one word with a digit, _, - or .).",
        show_default=False,
    ),
]
