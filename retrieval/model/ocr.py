"""Reading the text printed in a photo: PaddleOCR's PP-OCRv4 detection, angle and recognition models as ONNX files,
run on onnxruntime by RapidOCR (the optional extra ``clipsearch[ocr]``; the models ship inside its wheel, nothing
is downloaded at run time).

One ``TextReader`` per process, with bounded threads: the OCR pass (``indexer.ocr_pass``) gives each worker one.
Photos without text cost little: detection first runs on a small copy (``PROBE_SIDE``), and only when it finds
something does RapidOCR's own full call (detection at full size, then angle and recognition of the found boxes)
run. Pixels come in decoded and upright (``retrieval.images``), at a bounded size (``MAX_SIDE``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from retrieval.errors import UsageError
from retrieval.model.device import Device

if TYPE_CHECKING:
    from PIL import Image

INSTALL_HINT = "pip install 'clipsearch[ocr]'"
MAX_SIDE = 2000  # RapidOCR's own cap on the longer side (its max_side_len): pixels beyond it are never used
DECODE_MIN_SIDE = 1500  # JPEGs decode at a reduced DCT scale that keeps the shorter side at least this
PROBE_SIDE = 800  # the cheap first detection: 20 px text on a 1600 px photo is still 10 px here
FULL_DETECTION_SIDE = 736  # RapidOCR's default: detection upscales the shorter side to at least this
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@dataclass(frozen=True)
class ReadLine:
    """One line of text found in a photo: what it says, how sure the recogniser is (0..1), and where it is (four
    corners in upright full-size pixels, clockwise from the top left)."""

    text: str
    confidence: float
    box: list[list[int]]


def ocr_available() -> bool:
    """Whether RapidOCR is installed (found, not imported: importing it costs OpenCV's start-up)."""
    try:
        return importlib.util.find_spec("rapidocr_onnxruntime") is not None
    except ValueError:  # in sys.modules as None: an import of it fails
        return False


def require_ocr() -> None:
    """Say in one line how to install OCR when it is missing (before any work)."""
    if not ocr_available():
        raise UsageError(f"reading text in photos (--ocr) needs the OCR extra: {INSTALL_HINT}")


def ocr_provider(device: Device, available: Sequence[str]) -> str:
    """Where the OCR models run: CUDA when the run's device is CUDA and onnxruntime has its CUDA provider (the
    onnxruntime-gpu wheel), else the CPU. Decided from facts, so the choice is tested without a GPU."""
    return CUDA if device.is_cuda and CUDA in available else CPU


class TextReader:
    """RapidOCR with bounded threads on the chosen provider, and a cheap probe before the full read."""

    def __init__(self, device: Device, threads: int = 1):
        import onnxruntime
        from rapidocr_onnxruntime import RapidOCR

        self.provider = ocr_provider(device, onnxruntime.get_available_providers())
        cuda = self.provider == CUDA
        threads = max(1, threads)
        self.engine = RapidOCR(
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
            det_use_cuda=cuda,
            cls_use_cuda=cuda,
            rec_use_cuda=cuda,
        )

    def read(self, image: Image.Image, full_size: tuple[int, int]) -> list[ReadLine]:
        """The lines found in an upright RGB ``image`` whose full-resolution size is ``full_size``; boxes come back in
        full-size pixels."""
        import numpy as np

        image = _bounded(image)
        if not self._probe(image):
            return []
        found, _ = self.engine(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))  # RapidOCR takes BGR
        scale_x, scale_y = full_size[0] / image.width, full_size[1] / image.height
        return [
            ReadLine(str(text), float(score), [[round(x * scale_x), round(y * scale_y)] for x, y in box])
            for box, text, score in found or []
            if str(text).strip()
        ]

    def _probe(self, image: Image.Image) -> bool:
        """Whether detection finds anything on a copy whose longer side is ``PROBE_SIDE`` (about a fifth of the
        full detection's cost on a 1400 px photo); the detector's upscaling is off for it."""
        import numpy as np

        small = image.copy()
        small.thumbnail((PROBE_SIDE, PROBE_SIDE))
        detector = self.engine.text_det
        detector.limit_side_len = 32  # no upscaling of the probe
        try:
            boxes, _ = detector(np.ascontiguousarray(np.asarray(small)[:, :, ::-1]))
        finally:
            detector.limit_side_len = FULL_DETECTION_SIDE
        return boxes is not None and len(boxes) > 0


def _bounded(image: Image.Image) -> Image.Image:
    if max(image.size) <= MAX_SIDE:
        return image
    image = image.copy()
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image
