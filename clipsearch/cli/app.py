"""The typer application and the one place where library errors become one-line messages and exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TypeVar

import typer

from clipsearch.cli.help_format import use_plain_types
from retrieval.errors import ClipsearchError, Interrupted

app = typer.Typer(
    name="clipsearch",
    help="Search your photos by text or by example with CLIP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: `--model TEXT`, flags without `<bool>`, and [brackets] kept as text
)

use_plain_types()

F = TypeVar("F", bound=Callable[..., object])


def user_errors(func: F) -> F:
    """Turn a ClipsearchError into `clipsearch: message` on stderr and its exit code, never a traceback."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ClipsearchError as error:
            typer.echo(f"clipsearch: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as interrupt:  # Interrupted says what was kept; a bare Ctrl-C claims nothing
            typer.echo(f"clipsearch: {interrupt if isinstance(interrupt, Interrupted) else 'interrupted'}", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def resolve_index_dir(index: Path | None) -> Path:
    from retrieval.store.layout import default_index_dir

    return (index or default_index_dir()).expanduser()


def quiet_libraries() -> None:
    """open_clip and huggingface log at INFO/WARNING for things a user need not see."""
    import logging

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="clipsearch: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
