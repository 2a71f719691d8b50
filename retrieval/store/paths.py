"""File paths in SQLite TEXT without loss, including names that are not valid UTF-8.

Old cameras, zip files from other systems and Latin-1 disks produce such names. Python hands them over with
``surrogateescape`` (byte 0xE9 becomes U+DCE9), which SQLite cannot store. Each surrogate is written as ESC and
four hex digits, and ESC itself (U+10FFFF, a noncharacter no real name uses) as ESC ESC. The mapping works
character by character, so a folder's stored form is a prefix of its files' stored forms and prefix (range)
queries stay exact; valid UTF-8 paths are stored unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ESC = "\U0010ffff"


def to_stored(path: str) -> str:
    """The SQLite-safe form of ``path`` (identical for every valid UTF-8 path)."""
    if ESC not in path and path.isascii():
        return path
    parts = []
    for char in path:
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            parts.append(f"{ESC}{code:04x}")
        elif char == ESC:
            parts.append(ESC + ESC)
        else:
            parts.append(char)
    return "".join(parts)


def from_stored(text: str) -> str:
    """Inverse of ``to_stored``: the path as ``os`` functions take it (surrogate escapes restored)."""
    if ESC not in text:
        return text
    parts, position = [], 0
    while position < len(text):
        char = text[position]
        if char != ESC:
            parts.append(char)
            position += 1
        elif text[position + 1 : position + 2] == ESC:
            parts.append(ESC)
            position += 2
        else:
            parts.append(chr(int(text[position + 1 : position + 5], 16)))
            position += 5
    return "".join(parts)


def display_path(path: str) -> str:
    """A printable form for messages: undecodable bytes shown as ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def from_display(text: str) -> str:
    """Inverse of ``display_path``: each ``\\xNN`` (NN 80 to ff, the bytes UTF-8 cannot start a character with
    alone) back to the undecodable byte it shows, so a path the API gave out is accepted back."""
    if "\\x" not in text:
        return text
    return _SHOWN_BYTE.sub(lambda match: chr(0xDC00 + int(match.group(1), 16)), text)


_SHOWN_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def catalog_path(path: Path | str) -> str:
    """A file's key as the catalog stores it: its folder resolved, its own name kept (a symlinked file is
    indexed under the link's name, as the walk found it)."""
    path = Path(path).expanduser()
    return os.path.join(os.path.realpath(path.parent), path.name)
