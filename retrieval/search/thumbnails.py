"""Thumbnails of indexed images, made on first request and cached under the index folder.

A cached file is named after the image id, the source file's size and mtime and the thumbnail size, so an edited
photo gets a fresh thumbnail and a stale one is never served. The source is read from the descriptor the file
guard opened and checked (file_guard.py), never by its path again, so a file swapped for a link meanwhile cannot
leak; a cached thumbnail is read whole before it is sent, so a concurrent replacement cannot truncate it.
Decoding spends the server's one decode budget (uploads.py): at most ``max_bytes`` read, pixels checked from the
header, JPEGs decoded at reduced DCT scale, a shared number of decodes at once; a file past those limits gets a
placeholder tile instead. A cache that cannot be written (a full disk) costs a remake, never an error.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image

from retrieval.atomic import atomic_write
from retrieval.images import DecodeError
from retrieval.search.file_guard import OpenedFile, read_opened
from retrieval.search.uploads import DecodeBudget

THUMBNAIL_SIZES = (256, 1024)  # grid tiles and the large view; a fixed set keeps the cache bounded
JPEG_QUALITY = 85
PLACEHOLDER_GREY = (128, 128, 128)


def cache_dir_for(index_root: Path, read_only: bool) -> Path:
    """``<index>/thumbnails``; for an index that cannot be written, a folder under ``$XDG_CACHE_HOME/clipsearch``
    named after the index's path."""
    if not read_only:
        return Path(index_root) / "thumbnails"
    import hashlib

    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(os.fsencode(Path(index_root).resolve())).hexdigest()[:16]
    return cache_home / "clipsearch" / "thumbnails" / digest


class ThumbnailError(Exception):
    """The source file is gone or cannot be decoded; the message says which."""


@dataclass(frozen=True)
class Thumbnail:
    """A JPEG thumbnail's bytes; ``placeholder`` when the source was over the decode budget."""

    data: bytes
    placeholder: bool = False


class ThumbnailCache:
    """JPEG thumbnails in ``cache_dir/<size>/<id // 1000>/``; safe to use from many threads at once."""

    def __init__(self, cache_dir: Path, budget: DecodeBudget, max_bytes: int):
        self.cache_dir = Path(cache_dir)
        self.budget = budget
        self.max_bytes = max_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def get(self, image_id: int, source: OpenedFile, mtime_ns: int, size: int = THUMBNAIL_SIZES[0]) -> Thumbnail:
        """The thumbnail of ``source`` (an indexed file the guard opened, with the catalog's ``mtime_ns``), made
        first if needed."""
        if size not in THUMBNAIL_SIZES:
            raise ValueError(f"thumbnail size must be one of {THUMBNAIL_SIZES}")
        target = self.cache_dir / str(size) / str(image_id // 1000) / f"{image_id}-{source.size}-{mtime_ns}.jpg"
        cached = _read_whole(target)
        if cached is not None:
            return Thumbnail(cached)
        with self._lock_for(str(target)):
            cached = _read_whole(target)
            if cached is not None:
                return Thumbnail(cached)
            return self._make(image_id, source, target, size)

    def _lock_for(self, key: str) -> threading.Lock:
        """One lock per thumbnail: concurrent requests for the same image decode it once."""
        with self._locks_guard:
            if len(self._locks) > 4096:
                self._locks.clear()
            return self._locks.setdefault(key, threading.Lock())

    def _make(self, image_id: int, source: OpenedFile, target: Path, size: int) -> Thumbnail:
        if source.size > self.max_bytes:
            return Thumbnail(placeholder(size), placeholder=True)
        try:
            image = self.budget.thumbnail_source(lambda: read_opened(source, self.max_bytes), min_side=size)
        except DecodeError as error:
            raise ThumbnailError(f"cannot make a thumbnail of image {image_id}: {error}") from None
        if image is None:
            return Thumbnail(placeholder(size), placeholder=True)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        data = buffer.getvalue()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            for old in target.parent.glob(f"{target.name.split('-')[0]}-*.jpg"):  # thumbnails of older versions
                old.unlink(missing_ok=True)
            atomic_write(target, lambda f: f.write(data), durable=False)  # a cache: a power cut costs a remake
        except OSError:
            pass  # a full or read-only disk: served, not cached
        return Thumbnail(data)


def _read_whole(path: Path) -> bytes | None:
    """A cached thumbnail's bytes, read at once through one descriptor; None when there is none."""
    try:
        with open(path, "rb") as file:
            return file.read() or None
    except OSError:
        return None


@cache
def placeholder(size: int) -> bytes:
    """A plain grey tile, shown for a file too large to decode for a thumbnail."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size * 3 // 4), PLACEHOLDER_GREY).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
