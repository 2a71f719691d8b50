"""`clipsearch forget`: remove folders and their images from the index (the files on disk stay)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipsearch.cli.app import app, user_errors
from clipsearch.cli.options import IndexOption, NoWaitOption
from retrieval.store.layout import resolve_index_dir


@app.command()
@user_errors
def forget(
    folders: Annotated[list[Path], typer.Argument(help="Indexed folders to forget (they need not exist any more).")],
    index_dir: IndexOption = None,
    no_wait: NoWaitOption = False,
) -> None:
    """Remove folders and every image under them from the index; the photos on disk are not touched."""
    from indexer.pipeline import forget_folders

    typer.echo(forget_folders(resolve_index_dir(index_dir), folders, wait_for_lock=not no_wait).line())
