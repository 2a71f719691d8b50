"""Serve an indexed file only while it is still the regular file that was indexed.

The catalog names the path, but what lies at that path can change after indexing: someone who can write to the
photo folder could swap a photo for a symbolic link to ``~/.ssh/id_rsa``. So before a byte is served, the path
is resolved and must lie inside the indexed folders, the file is opened without following a final link (the
check and the open see the same file), and the open file must be a regular file with the size and mtime the
catalog recorded. The caller then reads from that open descriptor, never from the path again.
"""

from __future__ import annotations

import errno
import os
import stat
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CHUNK_BYTES = 256 * 1024


class FileNotServed(Exception):
    """The file is gone, not a regular file, or outside the indexed folders (404)."""


class FileChanged(Exception):
    """The file changed since it was indexed (409): it is served again after the next `clipsearch index`."""


@dataclass(frozen=True)
class OpenedFile:
    """An indexed file, checked and open; ``close`` it, or hand it to ``stream``."""

    fd: int
    real_path: str
    size: int

    def close(self) -> None:
        os.close(self.fd)


def open_indexed(path: str, size: int, mtime_ns: int, roots: Iterable[str], image_id: int) -> OpenedFile:
    """Open ``path`` for reading if it is still the file the catalog describes; else raise with the reason."""
    roots = tuple(roots)
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):  # a link swapped in while it was being resolved
        raise FileChanged(f"the file of image {image_id} changed since indexing") from None
    if not any(_inside(real, root) for root in roots):
        raise FileNotServed(f"the file of image {image_id} now leads outside the indexed folders")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise FileNotServed(f"the file of image {image_id} is no longer on disk") from None
    except OSError as error:
        if error.errno == errno.ELOOP:  # became a link between the resolve and the open
            raise FileChanged(f"the file of image {image_id} changed since indexing") from None
        raise FileNotServed(f"the file of image {image_id} cannot be read ({error.strerror})") from None
    opened = _opened_path(fd)
    if opened is not None and not any(_inside(opened, root) for root in roots):
        os.close(fd)  # a folder on the way was swapped for a link between the resolve and the open
        raise FileChanged(f"the file of image {image_id} changed since indexing")
    facts = os.fstat(fd)
    if not stat.S_ISREG(facts.st_mode):
        os.close(fd)
        raise FileNotServed(f"the file of image {image_id} is not a regular file any more")
    if facts.st_size != size or facts.st_mtime_ns != mtime_ns:
        os.close(fd)
        raise FileChanged(
            f"the file of image {image_id} changed since indexing: run `clipsearch index` to pick up the change"
        )
    return OpenedFile(fd, real, facts.st_size)


def _opened_path(fd: int) -> str | None:
    """Where an open descriptor really leads (Linux: ``/proc/self/fd``); None where that cannot be known."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def read_opened(opened: OpenedFile, limit: int) -> bytes:
    """Up to ``limit`` bytes of the open file, from its start, read from the descriptor (never the path)."""
    chunks, left, offset = [], min(limit, opened.size), 0
    while left > 0 and (chunk := os.pread(opened.fd, min(left, CHUNK_BYTES * 16), offset)):
        chunks.append(chunk)
        left -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def stream(opened: OpenedFile) -> Iterator[bytes]:
    """The open file's bytes in chunks; the descriptor is closed when the response ends or is dropped."""
    with os.fdopen(opened.fd, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


def content_disposition(name: str, kind: str = "inline") -> str:
    """RFC 6266 / 5987: an ASCII fallback ``filename`` and the exact name as percent-encoded UTF-8 ``filename*``.
    Names that are not valid UTF-8 (surrogate-escaped bytes) are encoded byte for byte, never a 500."""
    raw = os.fsencode(name)
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in raw.decode("ascii", "replace"))
    return f"{kind}; filename=\"{fallback or 'file'}\"; filename*=UTF-8''{urllib.parse.quote(raw, safe='')}"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
