"""The typer application and the one place where library errors become one-line messages and exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, TypeVar

import typer
from typer.core import TyperGroup

from clipsearch.cli.help_format import use_plain_types
from clipsearch.cli.plain_values import use_plain_values
from retrieval.errors import ClipsearchError, Interrupted

if TYPE_CHECKING:
    from typer._click import Context

# The order a newcomer needs them in: the daily commands first, maintenance next, the lab last.
COMMAND_ORDER = (
    "index", "search", "similar", "info", "text", "caption", "ask", "duplicates", "serve",
    "check", "forget", "reindex", "export-text",
    "eval", "train", "train-itm", "train-captioner",
)  # fmt: skip


class CommandsInOrder(TyperGroup):
    """`clipsearch --help` lists commands in ``COMMAND_ORDER`` (any not named there after them), not in the order
    their modules happen to be imported."""

    def list_commands(self, ctx: Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: rank.get(name, len(rank)))


app = typer.Typer(
    name="clipsearch",
    cls=CommandsInOrder,
    help="Search your photos by text or by example with CLIP.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: `--model TEXT`, flags without `<bool>`, and [brackets] kept as text
)

use_plain_types()
use_plain_values()  # no pydantic adapters for plain values: a cold search starts ~90 ms sooner


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"clipsearch {version('clipsearch')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("clipsearch (not installed)")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Search your photos by text or by example with CLIP."""
    if ctx.invoked_subcommand is None:  # bare `clipsearch`: the help, and success (it is not a mistake)
        typer.echo(ctx.get_help())
        raise typer.Exit()


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


def quiet_libraries() -> None:
    """open_clip and huggingface log at INFO/WARNING for things a user need not see."""
    import logging

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="clipsearch: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
