"""`clipsearch check [--repair]`: verify that the catalog and the FAISS file agree, and repair them."""

from __future__ import annotations

from typing import Annotated

import typer

from clipsearch.cli.app import app, user_errors
from clipsearch.cli.options import IndexOption, NoWaitOption, output_options
from clipsearch.cli.output import FOR_REPORTS, Output, Report, emit, line
from retrieval.store.layout import resolve_index_dir


@app.command()
@user_errors
@output_options(FOR_REPORTS)
def check(
    index_dir: IndexOption = None,
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed (takes the write lock).")] = False,
    no_wait: NoWaitOption = False,
    output: Output = Output(),  # output_options: --format and its aliases
) -> None:
    """Verify an index (catalog rows, stored embeddings, FAISS ids); exit code 1 when problems remain."""
    from indexer.check import check_index

    report = check_index(
        resolve_index_dir(index_dir),
        repair=repair,
        wait=not no_wait,
        on_wait=lambda message: typer.echo(f"clipsearch: {message}", err=True),
    )
    emit(check_report(report, repair), output)
    if not report.healthy:
        raise typer.Exit(1)


def check_report(report, repair: bool) -> Report:
    vectors = "missing or unreadable" if report.vectors_in_file is None else f"{report.vectors_in_file} vectors"
    table = [
        line("index:    {} (schema {})", str(report.index_dir), report.schema_version),
        line("images:   {} indexed, {} failed; FAISS file: {}", report.images, report.failed, vectors),
    ]
    table += [line("problem:  {}", text) for text in report.problems]
    table += [line("notice:   {}", text) for text in report.notices]
    table += [line("repaired: {}", text) for text in report.repairs]
    if report.healthy:
        table.append(line("{}", "ok" if not report.problems else "ok after repair"))
    else:
        table.append(line("{} problem(s) remain{}", len(report.remaining), "" if repair else " (try --repair)"))
    return Report(document=report.to_dict(), table=table)
