"""`clipsearch duplicates`: groups of near-identical photos, the one to keep first."""

from __future__ import annotations

from typing import Annotated

import typer

from clipsearch.cli.app import app, user_errors
from clipsearch.cli.options import IndexOption, output_options
from clipsearch.cli.output import FOR_LISTS, Output, Report, emit, line
from retrieval.search.duplicate_defaults import DEFAULT_PIXEL_THRESHOLD, DEFAULT_THRESHOLD
from retrieval.store.layout import resolve_index_dir

ThresholdOption = Annotated[
    float,
    typer.Option(
        "--threshold",
        help="Cosine similarity at which two photos are compared pixel by pixel (lower: more candidates).",
    ),
]
PixelsOption = Annotated[
    float,
    typer.Option(
        "--pixels",
        help="Pixel similarity (32 px prints, after the best small crop) at which a pair counts as copies.",
    ),
]
COLUMNS = ("group", "keep", "score", "pixels", "width", "height", "size", "path", "image_id")


@app.command()
@user_errors
@output_options(FOR_LISTS)
def duplicates(
    index_dir: IndexOption = None,
    threshold: ThresholdOption = DEFAULT_THRESHOLD,
    pixels: PixelsOption = DEFAULT_PIXEL_THRESHOLD,
    output: Output = Output(),  # output_options: --format and its aliases
) -> None:
    """Find near-duplicate photos (re-encoded, resized, slightly cropped, rotated copies); best file first, each
    with its evidence: cosine and pixel similarity to that file. --paths lists every file of every group, the one
    to keep first."""
    from retrieval.search.duplicates import duplicates_in_index

    groups = duplicates_in_index(resolve_index_dir(index_dir), threshold, pixels)
    emit(duplicates_report(groups, threshold, pixels), output)


def duplicates_report(groups, threshold: float, pixels: float = DEFAULT_PIXEL_THRESHOLD) -> Report:
    table, records = [], []
    for number, group in enumerate(groups, 1):
        table.append(line("group {} ({} images)", number, len(group.members)))
        for position, member in enumerate(group.members):
            size = f"{member.width}x{member.height}" if member.width and member.height else "?"
            mark = "keep" if position == 0 else "    "
            table.append(line("  {}  cos {:.3f}  px {:.3f}  {:>11}  {:>8}  {}", mark, member.score, member.pixels,
                              size, _bytes(member.size), member.path))  # fmt: skip
            records.append({"group": number, "keep": position == 0} | member.to_dict())
    if groups:
        extra = sum(len(group.members) - 1 for group in groups)
        table.append(line("{} groups; {} images besides the best of each", len(groups), extra))
    return Report(
        document={"threshold": threshold, "pixels": pixels, "groups": [group.to_dict() for group in groups]},
        table=table,
        empty=f"no near-duplicates at threshold {threshold}",
        columns=COLUMNS,
        records=records,
        paths=[member.path for group in groups for member in group.members],
    )


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
