"""A pixel print: a 32 px upright RGB thumbnail stored with each indexed image, and how alike two prints are.

CLIP's cosine says two pictures show the same kind of thing; it cannot say they are the same picture (the bundled
shapes model puts whole unrelated scenes above 0.99). The print is the second opinion ``duplicates`` asks for:
made once when the image is decoded for indexing (3 KB, in the row, in the embedding's transaction) and compared
only for the pairs the vectors propose.

Two files are copies when, after the best small centred crop of either one (copies are often cut by a few
percent), their prints agree pixel by pixel: ``pixel_similarity`` is 1 minus the 99th percentile of the per-pixel
colour difference (largest channel, in 0-255 levels, /255) at 24 px after a slight blur. On the generated sets
(docs/duplicates.md) re-encoding, resizing and EXIF rotation keep it near 0.99 and crops of 2-3.5% above 0.86,
while a shape recoloured, a background changed or a frame panned by a tenth take it below 0.86. The top 1% of
pixels are let go so that one misplaced edge pixel does not decide, while a changed object of a few pixels still
does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

PRINT_SIDE = 32  # stored: 32 x 32 x 3 bytes
COMPARE_SIDE = 24  # compared: crops of the stored print resampled down, so the alignment is sub-pixel
CROPS = tuple(round(0.005 * step, 4) for step in range(13))  # cut from every edge: 0 to 6% in half-percent steps
BLUR = 0.5  # Gaussian radius at the compared size: softens resampling seams, not a changed object
QUANTILE = 99.0
PRINT_BYTES = PRINT_SIDE * PRINT_SIDE * 3


def pixel_print(image: Image.Image) -> bytes:
    """The print of an upright RGB image (as decoded for indexing: draft-reduced JPEGs give the same print)."""
    return image.convert("RGB").resize((PRINT_SIDE, PRINT_SIDE), Image.Resampling.BOX).tobytes()


def print_views(blob: bytes) -> np.ndarray:
    """The print as compared: one (side, side, 3) float32 view per crop in ``CROPS``, uncropped first."""
    if len(blob) != PRINT_BYTES:
        raise ValueError(f"a pixel print is {PRINT_BYTES} bytes, not {len(blob)}")
    image = Image.frombytes("RGB", (PRINT_SIDE, PRINT_SIDE), blob)
    views = []
    for cut in CROPS:
        box = (cut * PRINT_SIDE, cut * PRINT_SIDE, (1 - cut) * PRINT_SIDE, (1 - cut) * PRINT_SIDE)
        view = image.resize((COMPARE_SIDE, COMPARE_SIDE), Image.Resampling.BILINEAR, box=box)
        views.append(np.asarray(view.filter(ImageFilter.GaussianBlur(BLUR)), dtype=np.float32))
    return np.stack(views)


def pixel_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two prints are (their ``print_views``), 0 to 1: either one cropped by the best of ``CROPS``
    against the other whole, 1 minus the 99th percentile of the per-pixel largest-channel difference / 255."""
    differences = np.concatenate([np.abs(a - b[0]), np.abs(a[0] - b)]).max(axis=-1).reshape(2 * len(a), -1)
    return float(1.0 - np.percentile(differences, QUANTILE, axis=1).min() / 255.0)
