"""Thumbnails of indexed images, made on first request and cached under the index folder.

A cached file is named after the image id, the source file's size and mtime and the thumbnail size, so an edited
photo gets a fresh thumbnail and a stale one is never served. Decoding goes through the indexer's safe decoder:
upright by EXIF orientation, JPEGs decoded at reduced DCT scale, decompression bombs refused.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from retrieval.atomic import atomic_write
from retrieval.images import DecodeError, decode_image, read_file

THUMBNAIL_SIZES = (256, 1024)  # grid tiles and the large view; a fixed set keeps the cache bounded
JPEG_QUALITY = 85


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


class ThumbnailCache:
    """JPEG thumbnails in ``cache_dir/<size>/<id // 1000>/``; safe to use from many threads at once."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def get(self, image_id: int, source: str | Path, size: int = THUMBNAIL_SIZES[0]) -> Path:
        """The cached thumbnail of ``source`` (an indexed file), making it first if needed."""
        if size not in THUMBNAIL_SIZES:
            raise ValueError(f"thumbnail size must be one of {THUMBNAIL_SIZES}")
        try:
            stat = os.stat(source)
        except OSError:
            raise ThumbnailError(f"the file of image {image_id} is no longer on disk") from None
        target = (
            self.cache_dir / str(size) / str(image_id // 1000) / f"{image_id}-{stat.st_size}-{stat.st_mtime_ns}.jpg"
        )
        if target.is_file():
            return target
        with self._lock_for(str(target)):
            if not target.is_file():
                self._make(source, target, size)
        return target

    def _lock_for(self, key: str) -> threading.Lock:
        """One lock per thumbnail: concurrent requests for the same image decode it once."""
        with self._locks_guard:
            if len(self._locks) > 4096:
                self._locks.clear()
            return self._locks.setdefault(key, threading.Lock())

    def _make(self, source: str | Path, target: Path, size: int) -> None:
        try:
            image = decode_image(read_file(source), min_side=size)
        except DecodeError as error:
            raise ThumbnailError(f"cannot make a thumbnail of {source}: {error}") from None
        image.thumbnail((size, size))
        target.parent.mkdir(parents=True, exist_ok=True)
        for old in target.parent.glob(f"{target.name.split('-')[0]}-*.jpg"):  # thumbnails of older versions
            old.unlink(missing_ok=True)
        save = lambda f: image.save(f, format="JPEG", quality=JPEG_QUALITY, optimize=True)  # noqa: E731
        atomic_write(target, save, durable=False)  # a cache: losing it to a power cut costs a remake
