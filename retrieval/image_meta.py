"""File facts for filtering and date order, read from an image's header only (no pixels decoded).

The indexer records them for every indexed file, and the v2 -> v3 catalog migration fills them for files indexed
before, so they never need the encoder. Dates are wall-clock text, ``YYYY-MM-DD HH:MM:SS``: EXIF dates carry no
time zone, so the file's mtime is written in the local time of the indexing machine to compare like with like.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image

import retrieval.images  # noqa: F401  (registers the HEIF opener and sets the decompression-bomb limit)

DATE_FROM_EXIF = "exif"
DATE_FROM_MTIME = "mtime"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

# Pillow's format name -> the short type users filter by (--type jpg,png).
FILE_TYPES = {
    "JPEG": "jpg",
    "MPO": "jpg",  # phones' multi-picture JPEGs
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "HEIF": "heic",
    "AVIF": "avif",
}
TYPE_ALIASES = {"jpeg": "jpg", "jpe": "jpg", "tif": "tiff", "heif": "heic", "hif": "heic"}

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATE_TIME_ORIGINAL, _DATE_TIME_DIGITIZED, _DATE_TIME = 0x9003, 0x9004, 0x0132
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112


@dataclass(frozen=True)
class ImageMeta:
    """What the catalog stores next to an image's size and embedding (schema v3)."""

    taken_at: str | None = None  # wall-clock "YYYY-MM-DD HH:MM:SS"
    date_source: str | None = None  # DATE_FROM_EXIF or DATE_FROM_MTIME: which one taken_at is
    camera_make: str | None = None
    camera_model: str | None = None
    orientation: int | None = None  # EXIF orientation 1..8 as written (pixels are indexed upright)
    width: int | None = None  # upright pixel size
    height: int | None = None
    has_gps: bool | None = None
    file_type: str | None = None  # jpg, png, webp, gif, bmp, tiff, heic (FILE_TYPES), else the file's suffix


def normalise_type(name: str) -> str:
    """``JPEG``, ``.jpeg`` and ``jpg`` are one type: ``jpg``."""
    name = name.strip().lower().lstrip(".")
    return TYPE_ALIASES.get(name, name)


def mtime_text(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9).strftime(DATE_FORMAT)


def read_image_meta(path: str | Path, mtime_ns: int | None = None) -> ImageMeta:
    """The header facts of one file. Never raises: an unreadable header leaves the EXIF fields empty, and the date
    falls back to ``mtime_ns`` (the file's own mtime when not given); a missing file gives an empty ImageMeta."""
    try:
        with _open_regular(path) as file:
            if mtime_ns is None:
                mtime_ns = os.fstat(file.fileno()).st_mtime_ns
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(file) as image:
                    return _meta_of(image, mtime_ns)
    except (FileNotFoundError, _NotRegular):
        return ImageMeta()
    except Exception:  # a header Pillow cannot read: the type from the suffix, the date from the mtime
        if mtime_ns is None:
            return ImageMeta()
        suffix = normalise_type(Path(path).suffix) or None
        return ImageMeta(taken_at=mtime_text(mtime_ns), date_source=DATE_FROM_MTIME, file_type=suffix)


class _NotRegular(Exception):
    pass


def _open_regular(path: str | Path):
    """Open without blocking (a FIFO swapped in after indexing must not hang the indexer) and only a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _NotRegular(path)
    return os.fdopen(fd, "rb")


def _meta_of(image: Image.Image, mtime_ns: int) -> ImageMeta:
    exif = image.getexif()
    details = exif.get_ifd(_EXIF_IFD) if exif else {}
    taken = _exif_date(details.get(_DATE_TIME_ORIGINAL)) or _exif_date(details.get(_DATE_TIME_DIGITIZED))
    taken = taken or _exif_date(exif.get(_DATE_TIME))
    orientation = exif.get(_ORIENTATION)
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None
    width, height = image.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return ImageMeta(
        taken_at=taken or mtime_text(mtime_ns),
        date_source=DATE_FROM_EXIF if taken else DATE_FROM_MTIME,
        camera_make=_text(exif.get(_MAKE)),
        camera_model=_text(exif.get(_MODEL)),
        orientation=orientation,
        width=width,
        height=height,
        has_gps=bool(exif.get_ifd(_GPS_IFD)) if exif else False,
        file_type=FILE_TYPES.get(image.format or "", normalise_type(image.format or "") or None),
    )


def _exif_date(value) -> str | None:
    """EXIF's ``YYYY:MM:DD HH:MM:SS`` as ``YYYY-MM-DD HH:MM:SS``; None for blanks and zeros cameras write."""
    text = _text(value)
    if not text:
        return None
    try:
        return datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").strftime(DATE_FORMAT)
    except ValueError:
        return None


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None
