"""`clipsearch export-text`: write the index's text tower as ONNX so text queries need no torch."""

from __future__ import annotations

from typing import Annotated

import typer

from clipsearch.cli.app import app, quiet_libraries, user_errors
from clipsearch.cli.options import IndexOption, NoWaitOption
from retrieval.store.layout import resolve_index_dir


@app.command("export-text")
@user_errors
def export_text(
    index_dir: IndexOption = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (int8 when its top-10 agrees with float32 on the probe captions), int8 or float32.",
        ),
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Export again even when the export is current.")] = False,
    no_wait: NoWaitOption = False,
) -> None:
    """Export the text tower to ONNX next to the index (checked against torch) for fast, torch-free text queries."""
    quiet_libraries()
    from indexer.text_export import export_text_tower

    report = export_text_tower(
        resolve_index_dir(index_dir),
        precision=precision,
        force=force,
        wait=not no_wait,
        on_wait=lambda message: typer.echo(f"clipsearch: {message}", err=True),
    )
    typer.echo(report.line())
