"""Options shared by several commands, declared once; the option groups (filters, output) built from one idea."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

import typer

from clipsearch.cli.output import Format, Output, choose_output
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
EvalModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="The model to evaluate: an open_clip model name, or local-dir:FOLDER with a saved model (default: "
        "ViT-B-32, or the model an --index folder was made with).",
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
    int | None,
    typer.Option(
        "--batch-size",
        help="Images per encoder batch (default: 16 with the ONNX image tower, 32 with torch on the CPU, 256 on CUDA).",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Decoding processes (default: one per core, at most 4; on CUDA up to 16; 0 decodes in this process); "
        "with the ONNX image tower, decoding threads (default: one per core, at most 16).",
        show_default=False,
    ),
]

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


def expand_parameter(command: F, name: str, options: dict[str, Any], collect: Callable[..., object]) -> F:
    """``command`` with its parameter ``name`` replaced, for typer, by ``options`` (parameter name -> its
    ``Annotated[type, typer.Option(...)]``, each defaulting to None); ``collect(**their values)`` makes the value
    ``command`` receives as ``name``. How one idea (the filters, the output format) becomes one option group."""
    signature = inspect.signature(command)
    hints = get_type_hints(command, include_extras=True)
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name == name:
            parameters += [
                inspect.Parameter(key, _POSITIONAL, default=None, annotation=kind) for key, kind in options.items()
            ]
        else:
            parameters.append(parameter.replace(annotation=hints[parameter.name]))

    @wraps(command)
    def expanded(*args, **kwargs):
        given = {key: kwargs.pop(key) for key in options}
        return command(*args, **{name: collect(**given)}, **kwargs)

    expanded.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    expanded.__annotations__ = {p.name: p.annotation for p in parameters}
    return expanded  # type: ignore[return-value]


_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD


def filter_options(command: F) -> F:
    """The filter option group of search and similar: ``command``'s ``filters`` parameter becomes one option per
    field of ``Filters`` (from its ``FilterSpec``; a list field is one comma-separated text), and ``command``
    receives the ``Filters`` they make. A new filter field needs no change here."""
    hints = get_type_hints(Filters)
    options = {}
    for each in fields(Filters):
        spec = filter_spec(each)
        kind = str | None if isinstance(each.default, tuple) else hints[each.name]
        flags = f"{spec.flag}/--no-{spec.flag[2:]}" if hints[each.name] == bool | None else spec.flag  # with/without
        option = typer.Option(flags, help=spec.description, metavar=spec.metavar, show_default=False)
        options[each.name] = Annotated[kind, option]
    return expand_parameter(command, "filters", options, lambda **given: Filters(**_given(given)))


def output_options(formats: tuple[Format, ...]) -> Callable[[F], F]:
    """The output option group: ``command``'s ``output`` parameter becomes ``--format`` (one of ``formats``) and
    its aliases ``--json``, and where paths are a format ``--paths`` and ``-0/--null``; ``command`` receives the one
    ``Output`` they choose (conflicting flags are a one-line usage error, before any work)."""
    choice = Enum("Format", {kind.name: kind.value for kind in formats}, type=str)  # only these in --help
    options: dict[str, Any] = {
        "chosen": Annotated[choice | None, typer.Option("--format", help="How to print the output (default: table).")],
        "as_json": Annotated[bool | None, typer.Option("--json", help="Same as --format json.", show_default=False)],
    }
    if Format.PATHS in formats:
        paths_help = "Same as --format paths: one path per line (for piping)."
        null_help = "Print paths ending in NUL instead of a newline (implies --paths; for xargs -0)."
        options["as_paths"] = Annotated[bool | None, typer.Option("--paths", help=paths_help, show_default=False)]
        options["null"] = Annotated[bool | None, typer.Option("--null", "-0", help=null_help, show_default=False)]

    def collect(chosen=None, **aliases) -> Output:
        return choose_output(Format(chosen.value) if chosen else None, **{k: bool(v) for k, v in aliases.items()})

    return lambda command: expand_parameter(command, "output", options, collect)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


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
TextMatchOption = Annotated[
    bool | None,
    typer.Option(
        "--text-match/--no-text-match",
        help="Fuse CLIP's ranking with the words read in photos (index --ocr; default: on).",
        show_default=False,
    ),
]
