"""Decode uploaded query images within bounds: pixels read from the header before any decoding, a reduced decode,
and a fixed number of decodes at once.

Pillow's own limit (178 megapixels here, so that panoramas index) lets a 521 KB PNG of 13370 x 13370 through:
6.7 s and gigabytes per upload, and three at once took a server to 4.8 GB. A query needs only the model's
224 pixels, so uploads get a much lower cap, JPEGs decode at a reduced DCT scale and other formats are reduced
right after decoding, and past a few decodes at once the server answers 503 with Retry-After instead of queueing.
"""

from __future__ import annotations

import io
import threading
import warnings

from PIL import Image

from retrieval.images import DecodeError, decode_image

RETRY_AFTER_S = 2


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as error:
        raise DecodeError(f"decompression bomb refused ({error})") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        raise DecodeError(f"corrupt or truncated image ({error})") from None


class UploadDecoder:
    """Shared by all requests of one server: the pixel cap, and ``max_concurrent`` decode slots."""

    def __init__(self, max_pixels: int, max_concurrent: int):
        self.max_pixels = max_pixels
        self.slots = threading.BoundedSemaphore(max(1, max_concurrent))

    def decode(self, data: bytes, min_side: int | None) -> Image.Image:
        """An upright RGB image at about ``min_side``, or ``DecodeError`` / ``UploadTooLarge`` / ``UploadBusy``."""
        width, height = header_size(data)
        if width * height > self.max_pixels:
            raise UploadTooLarge(
                f"the image is {width} x {height} pixels ({width * height / 1e6:.1f} MP), over the upload limit "
                f"of {self.max_pixels / 1e6:g} MP: send a smaller copy"
            )
        if not self.slots.acquire(blocking=False):
            raise UploadBusy("the server is decoding other uploads: try again in a moment")
        try:
            return decode_image(data, min_side=min_side, reduce=True)
        finally:
            self.slots.release()
