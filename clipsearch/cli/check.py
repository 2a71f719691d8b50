"""`clipsearch check [--repair]`: verify that the catalog and the FAISS file agree, and repair them."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from clipsearch.cli.app import app, resolve_index_dir, user_errors
from clipsearch.cli.options import IndexOption, NoWaitOption


@app.command()
@user_errors
def check(
    index_dir: IndexOption = None,
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed (takes the write lock).")] = False,
    no_wait: NoWaitOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Verify an index (catalog rows, stored embeddings, FAISS ids); exit code 1 when problems remain."""
    from indexer.check import check_index

    report = check_index(
        resolve_index_dir(index_dir),
        repair=repair,
        wait=not no_wait,
        on_wait=lambda message: typer.echo(f"clipsearch: {message}", err=True),
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        vectors = "missing or unreadable" if report.vectors_in_file is None else f"{report.vectors_in_file} vectors"
        typer.echo(f"index:    {report.index_dir} (schema {report.schema_version})")
        typer.echo(f"images:   {report.images} indexed, {report.failed} failed; FAISS file: {vectors}")
        for line in report.problems:
            typer.echo(f"problem:  {line}")
        for line in report.notices:
            typer.echo(f"notice:   {line}")
        for line in report.repairs:
            typer.echo(f"repaired: {line}")
        if report.healthy:
            typer.echo("ok" if not report.problems else "ok after repair")
        else:
            hint = "" if repair else " (try --repair)"
            typer.echo(f"{len(report.remaining)} problem(s) remain{hint}")
    if not report.healthy:
        raise typer.Exit(1)
