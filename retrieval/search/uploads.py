"""Every decode the server does (uploaded query images and thumbnails of indexed files) within one budget: pixels
read from the header before any decoding, a reduced decode, and a fixed number of decodes at once.

Pillow's own limit (178 megapixels here, so that panoramas index) lets a 521 KB PNG of 13370 x 13370 through:
6.7 s and gigabytes per upload, and three at once took a server to 4.8 GB. A query needs only the model's
224 pixels, so uploads get a much lower cap, JPEGs decode at a reduced DCT scale and other formats are reduced
right after decoding, and past a few decodes at once the server answers 503 with Retry-After instead of queueing.
Thumbnails share the slots (they wait a while for one, since a page asks for dozens at once) and the pixel cap:
a larger JPEG is decoded at a reduced DCT scale, anything else larger gets a placeholder (thumbnails.py).
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from PIL import Image

from retrieval.images import DecodeError, decode_image

RETRY_AFTER_S = 2
THUMBNAIL_WAIT_S = 30.0  # how long a thumbnail waits for a decode slot before answering 503
JPEG_DRAFT_SCALE = 8  # the largest DCT reduction: a JPEG decodes with 1/64 of its pixels at best


class UploadTooLarge(Exception):
    """More pixels than the upload cap (413)."""


class UploadBusy(Exception):
    """Every decode slot is taken (503 with Retry-After)."""


def too_large(max_bytes: int) -> str:
    """Why an upload (or a request body) over ``max_bytes`` is refused (413)."""
    limit = f"{max_bytes / 2**20:.1f} MiB" if max_bytes >= 2**20 else f"{max_bytes / 1024:.0f} KiB"
    return f"the upload is larger than the limit of {limit}"


def header_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header alone (nothing is decoded)."""
    return header_facts(data)[:2]


def header_facts(data: bytes) -> tuple[int, int, str]:
    """Width, height and format from the image header alone (nothing is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return (*image.size, image.format or "")
    except Image.DecompressionBombError as error:
        raise DecodeError(f"decompression bomb refused ({error})") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        raise DecodeError(f"corrupt or truncated image ({error})") from None


def draft_scale(width: int, height: int, kind: str, min_side: int) -> int:
    """The DCT reduction (1, 2, 4 or 8 per side) a JPEG decodes at for a short side of at least ``min_side``
    (what ``decode_image`` asks of ``draft``); 1 for other formats."""
    scale = 1
    while kind == "JPEG" and scale < JPEG_DRAFT_SCALE and min(width, height) // (scale * 2) >= min_side:
        scale *= 2
    return scale


class DecodeBudget:
    """Shared by all requests of one server: the pixel cap, and ``max_concurrent`` decode slots."""

    def __init__(self, max_pixels: int, max_concurrent: int):
        self.max_pixels = max_pixels
        self.slots = threading.BoundedSemaphore(max(1, max_concurrent))

    def decode(self, data: bytes, min_side: int | None) -> Image.Image:
        """An uploaded image, upright RGB at about ``min_side``, or ``DecodeError`` / ``UploadTooLarge`` /
        ``UploadBusy`` (no waiting: an upload is one request the client can retry)."""
        width, height = header_size(data)
        if width * height > self.max_pixels:
            raise UploadTooLarge(
                f"the image is {width} x {height} pixels ({width * height / 1e6:.1f} MP), over the upload limit "
                f"of {self.max_pixels / 1e6:g} MP: send a smaller copy"
            )
        with self.slot(wait_s=None):
            return decode_image(data, min_side=min_side, reduce=True)

    def thumbnail_source(self, read: Callable[[], bytes], min_side: int) -> Image.Image | None:
        """An indexed file's pixels (its bytes from ``read``), upright RGB at about ``min_side``, for a thumbnail;
        None when it has more pixels than the cap even at the JPEG reduction it decodes at (the caller shows a
        placeholder). Reading and decoding hold a slot, waited for up to ``THUMBNAIL_WAIT_S`` (``UploadBusy``)."""
        with self.slot(wait_s=THUMBNAIL_WAIT_S):
            data = read()
            width, height, kind = header_facts(data)
            if width * height / draft_scale(width, height, kind, min_side) ** 2 > self.max_pixels:
                return None
            return decode_image(data, min_side=min_side, reduce=True)

    @contextmanager
    def slot(self, wait_s: float | None) -> Iterator[None]:
        """One decode slot while the block runs; ``UploadBusy`` when none frees within ``wait_s`` (None: at once)."""
        if not self.slots.acquire(blocking=wait_s is not None, timeout=wait_s):
            raise UploadBusy("the server is decoding other images: try again in a moment")
        try:
            yield
        finally:
            self.slots.release()
