"""How results and file names reach the terminal: one ``--format`` choice, one renderer per format.

A command builds one ``Report`` (its table lines, its JSON document, and for lists of images their CSV records and
paths) and ``emit`` prints it in the chosen format. A file name is data an attacker can choose:
``\\x1b]0;title\\x07`` or ``\\x1b[2J`` in a name would retitle the window or clear the screen when printed raw. The
table renderer escapes control characters in every value it shows, as ``ls`` does, so no command can forget to;
``paths`` prints names exactly (for piping), with ``--null`` ending each with NUL so that even a newline in a name
survives ``xargs -0``; ``json`` escapes them itself; ``csv`` quotes them (the stdlib csv module).

Adding a format: a ``Format`` member, its renderer in ``RENDERERS``, and the kinds of output it suits
(``FOR_LISTS``, ``FOR_REPORTS``).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import typer

from retrieval.errors import UsageError

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(text: str) -> str:
    """``text`` with control characters (C0, DEL, C1) and undecodable bytes shown as escapes: safe to print."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        code = ord(char)
        if char in _SHORT:
            out.append(_SHORT[char])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or 0x7F <= code <= 0x9F:
            out.append(f"\\x{code:02x}")
        elif not char.isprintable() and code > 0x9F and char not in (" ", "\u3000"):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


class Format(str, Enum):
    TABLE = "table"  # for people: aligned, control characters escaped
    JSON = "json"
    PATHS = "paths"  # one path per line (NUL-terminated with --null), names exact
    CSV = "csv"


FOR_LISTS = (Format.TABLE, Format.JSON, Format.PATHS, Format.CSV)  # lists of images: search, similar, duplicates
FOR_REPORTS = (Format.TABLE, Format.JSON)  # one report: info, check


@dataclass(frozen=True)
class Output:
    """The chosen format; ``null``: paths end in NUL instead of a newline."""

    format: Format = Format.TABLE
    null: bool = False


def choose_output(chosen: Format | None, as_json: bool = False, as_paths: bool = False, null: bool = False) -> Output:
    """``--format`` and its aliases (``--json``, ``--paths``, ``-0/--null``, which implies paths) as one choice;
    flags that ask for different formats are refused before any work is done."""
    asked = [(f"--format {chosen.value}", chosen)] if chosen else []
    asked += [(flag, kind) for flag, kind, on in (("--json", Format.JSON, as_json), ("--paths", Format.PATHS, as_paths),
                                                   ("--null", Format.PATHS, null)) if on]  # fmt: skip
    if len({kind for _, kind in asked}) > 1:
        raise UsageError(f"{' and '.join(flag for flag, _ in asked)} print different things: choose one")
    return Output(asked[0][1] if asked else Format.TABLE, null)


Line = tuple[str, tuple]  # a str.format template written in code, and the values it shows


def line(template: str, *values: Any) -> Line:
    return template, values


@dataclass(frozen=True)
class Report:
    """What a command prints, in every form it has."""

    document: Any  # the JSON document
    table: Sequence[Line]  # for people; every str value is escaped when shown
    empty: str | None = None  # said on stderr instead of an empty table
    columns: Sequence[str] = ()  # CSV header
    records: Sequence[dict] = field(default_factory=list)  # CSV rows (keys beyond ``columns`` are left out)
    paths: Sequence[str] = ()  # exact file names, for piping


def _table(report: Report, output: Output) -> None:
    if not report.table and report.empty:
        typer.echo(report.empty, err=True)
    for template, values in report.table:
        typer.echo(template.format(*(printable(v) if isinstance(v, str) else v for v in values)))


def _json(report: Report, output: Output) -> None:
    typer.echo(json.dumps(report.document, indent=2))


def _paths(report: Report, output: Output) -> None:
    end = "\0" if output.null else "\n"
    for path in report.paths:  # not typer.echo: it strips escape sequences (part of a name) when piped
        sys.stdout.write(path + end)
    sys.stdout.flush()


def _csv(report: Report, output: Output) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=list(report.columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(report.records)
    sys.stdout.flush()


RENDERERS: dict[Format, Callable[[Report, Output], None]] = {
    Format.TABLE: _table,
    Format.JSON: _json,
    Format.PATHS: _paths,
    Format.CSV: _csv,
}


def emit(report: Report, output: Output) -> None:
    RENDERERS[output.format](report, output)


RESULT_COLUMNS = ("rank", "score", "clip_score", "matched", "path", "image_id", "width", "height", "taken_at")


def results_report(results, query: dict) -> Report:
    """Search results: ranked, with their score (and the cosine, when re-ranked)."""
    if results and results[0].stage == "itm":  # re-ranked: the re-ranker's match probability, then the cosine
        table = [line("{:>4}  {:>6}  {:>6}  {}", "rank", "itm", "clip", "path")]
        table += [line("{:>4}  {:6.3f}  {:6.3f}  {}", r.rank, r.score, r.clip_score, r.path) for r in results]
    else:  # why each is here (a name match may have a low cosine), and the date when that is the order
        dated = query.get("sort") == "date"
        head = "{:>4}  {:>6}  {:<5}" + ("  {:<19}" if dated else "") + "  {}"
        table = [line(head, "rank", "score", "match", *(["taken"] if dated else []), "path")]
        row = "{:>4}  {:6.3f}  {:<5}" + ("  {:<19}" if dated else "") + "  {}"
        table += [
            line(row, r.rank, r.score, r.matched, *([r.taken_at or "-"] if dated else []), r.path) for r in results
        ]
    records = [r.to_dict() for r in results]
    columns = [c for c in RESULT_COLUMNS if c != "clip_score" or any("clip_score" in r for r in records)]
    return Report(
        document={"query": query, "results": records},
        table=table if results else [],
        empty="no results",
        columns=columns,
        records=records,
        paths=[r.path for r in results],
    )
