"""Which backend answers text queries, and why: the ``TextEncoder`` protocol and the one chooser.

Three backends give the same normalised float32 vectors (to a tolerance): the whole torch ``Encoder``, a torch
``Encoder`` with only the text tower (CPU), and the exported tower in ONNX Runtime (``OnnxTextEncoder``, CPU, no
torch). All compute ``retrieval.model.text_features``. ``choose_text_backend`` decides from facts known without
loading anything (so `clipsearch info` can say it); ``open_text_encoder`` follows the decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from retrieval.model.device import Device
from retrieval.model.spec import ModelSpec
from retrieval.model.text_onnx import ExportedTower


@runtime_checkable
class TextEncoder(Protocol):
    """Text to L2-normalised float32 vectors (n, dim)."""

    @property
    def dim(self) -> int: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def describe(self) -> str:
        """What it is, in a few words (`clipsearch info`, logs)."""
        ...


ONNX, LOADED, TEXT_TOWER, TEXT_BF16, WHOLE = "onnx", "loaded", "torch-text", "torch-bf16", "torch"


@dataclass(frozen=True)
class BackendChoice:
    """The backend that encodes (text here; images in ``image_onnx.choose_image_backend``) and the reason, for a
    person."""

    backend: str
    reason: str
    label: str

    def line(self) -> str:
        return f"{self.label} ({self.reason})"


def choose_text_backend(
    device: Device, tower: ExportedTower, bf16: bool = False, model_loaded: bool = False
) -> BackendChoice:
    """The one rule. The whole model once loaded (image queries loaded it); on CUDA the whole model; on the CPU
    a bfloat16 text tower when asked for, else the exported ONNX tower when current, else the torch text tower."""
    if model_loaded and not bf16:
        return BackendChoice(LOADED, "loaded already for image queries", f"torch model on {device}")
    if device.is_cuda:
        return BackendChoice(WHOLE, "CUDA: the exported ONNX tower runs on the CPU only", f"torch model on {device}")
    if bf16:
        return BackendChoice(TEXT_BF16, "--bf16-text", "torch bfloat16 text tower")
    if tower.current:
        precision = tower.record.precision if tower.record else "?"
        return BackendChoice(ONNX, "exported, current", f"ONNX {precision} text tower")
    return BackendChoice(TEXT_TOWER, tower.problem or "no exported tower", "torch text tower")


def open_text_encoder(
    spec: ModelSpec,
    device: Device,
    tower: ExportedTower,
    bf16: bool = False,
    model_loaded: bool = False,
    before_torch: Callable[[], None] | None = None,
) -> tuple[TextEncoder, BackendChoice]:
    """The encoder the chooser picks, loaded (or the shared one), and the choice. A tower that is current but
    does not open (no onnxruntime, an unreadable graph) is passed over for the torch text tower, with that reason.
    ``before_torch``: called before a torch backend loads (the engine checks the index's model there)."""
    from retrieval.model.encoder import Encoder

    choice = choose_text_backend(device, tower, bf16, model_loaded)
    if choice.backend == ONNX:
        try:
            return tower.open(), choice
        except Exception as error:  # noqa: BLE001  (the torch path still answers)
            unusable = ExportedTower(tower.folder, tower.record, f"the exported tower does not open: {error}")
            choice = choose_text_backend(device, unusable, bf16, model_loaded)
    if before_torch is not None:
        before_torch()
    if choice.backend in (TEXT_TOWER, TEXT_BF16):
        return Encoder.load_text_only(spec, bf16=choice.backend == TEXT_BF16), choice
    return Encoder.shared(spec, device) or Encoder.load(spec, device), choice
