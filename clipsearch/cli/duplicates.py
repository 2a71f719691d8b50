"""`clipsearch duplicates`: groups of near-identical photos, the one to keep first."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from clipsearch.cli.app import app, resolve_index_dir, user_errors
from clipsearch.cli.options import IndexOption, JsonOption

ThresholdOption = Annotated[
    float,
    typer.Option(
        "--threshold",
        help="Cosine similarity at which two photos count as near-duplicates (higher: stricter).",
    ),
]


@app.command()
@user_errors
def duplicates(index_dir: IndexOption = None, threshold: ThresholdOption = 0.95, as_json: JsonOption = False) -> None:
    """Find near-duplicate photos (re-encoded, resized, slightly cropped, rotated copies); best file first."""
    from retrieval.search.duplicates import duplicates_in_index

    groups = duplicates_in_index(resolve_index_dir(index_dir), threshold)
    if as_json:
        payload = {"threshold": threshold, "groups": [group.to_dict() for group in groups]}
        typer.echo(json.dumps(payload, indent=2))
        return
    if not groups:
        typer.echo(f"no near-duplicates at threshold {threshold}", err=True)
        return
    for number, group in enumerate(groups, 1):
        typer.echo(f"group {number} ({len(group.members)} images)")
        for position, member in enumerate(group.members):
            size = f"{member.width}x{member.height}" if member.width and member.height else "?"
            mark = "keep" if position == 0 else "    "
            typer.echo(
                f"  {mark}  {member.score:.3f}  {size:>11}  {_bytes(member.size):>8}  {member.to_dict()['path']}"
            )
    extra = sum(len(group.members) - 1 for group in groups)
    typer.echo(f"{len(groups)} groups; {extra} images besides the best of each")


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
