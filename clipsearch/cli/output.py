"""How results and file names reach the terminal.

A file name is data an attacker can choose: ``\\x1b]0;title\\x07`` or ``\\x1b[2J`` in a name would retitle the window
or clear the screen when printed raw. Table output escapes control characters, as ``ls`` does; ``--paths`` prints
names exactly (for piping), with ``--null`` ending each with NUL so that even a newline in a name survives
``xargs -0``; ``--json`` escapes them itself.
"""

from __future__ import annotations

import json
import sys

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


def check_output_mode(as_json: bool, as_paths: bool, null: bool) -> None:
    """Refuse combinations that make no sense, before any work is done."""
    if as_json and (as_paths or null):
        raise UsageError("--json and --paths/--null print different things: choose one")


def print_results(results, as_json: bool, as_paths: bool, query: dict, null: bool = False) -> None:
    """Results as JSON, as bare paths (``null``: NUL-terminated; implies paths), or as an escaped table."""
    if as_json:
        typer.echo(json.dumps({"query": query, "results": [r.to_dict() for r in results]}, indent=2))
    elif as_paths or null:
        end = "\0" if null else "\n"
        for result in results:  # not typer.echo: it strips escape sequences (part of a name) when piped
            sys.stdout.write(result.path + end)
        sys.stdout.flush()
    elif not results:
        typer.echo("no results", err=True)
    elif results[0].stage == "itm":  # re-ranked: the re-ranker's match probability, then the cosine
        typer.echo(f"{'rank':>4}  {'itm':>6}  {'clip':>6}  path")
        for result in results:
            typer.echo(f"{result.rank:>4}  {result.score:6.3f}  {result.clip_score:6.3f}  {printable(result.path)}")
    else:
        typer.echo(f"{'rank':>4}  {'score':>6}  path")
        for result in results:
            typer.echo(f"{result.rank:>4}  {result.score:6.3f}  {printable(result.path)}")
