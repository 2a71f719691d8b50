"""Write a CLIP text tower as ONNX (float32, then optionally dynamic int8), for torch-free text queries.

The graph takes token ids trimmed to the batch's last end-of-text token (dynamic batch and length) and returns
L2-normalised features: ``retrieval.model.text_features`` traced, the function the torch encoder runs (the tower
is causal and pools at the end-of-text position, the argmax of the ids, so positions after it never matter).
Needs torch and ``onnxscript`` (torch's exporter) and ``onnx`` (int8): export time only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any


class UnsupportedExport(Exception):
    """This model's text tower is not the standard open_clip one; queries keep the torch path."""


def check_exportable(model: Any) -> None:
    """Only open_clip's own CLIP text tower (causal mask, argmax pooling) is exported."""
    import open_clip

    if type(model) is not open_clip.CLIP or getattr(model, "attn_mask", None) is None:
        raise UnsupportedExport(f"{type(model).__name__} has no standard CLIP text tower")
    if getattr(model, "text_pool_type", None) != "argmax":
        raise UnsupportedExport(f"text pooling {getattr(model, 'text_pool_type', None)!r} is not argmax")


def export_onnx(model: Any, path: Path) -> Path:
    """The text tower of an open_clip CLIP as one ONNX file (float32 weights inside)."""
    import torch

    check_exportable(model)
    tower = _text_tower(model).eval()
    context = int(model.attn_mask.shape[0])
    example = torch.zeros((2, min(8, context)), dtype=torch.long)
    example[:, -1] = 1  # an end-of-text position for the argmax
    batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=2, max=context)
    return export_module(tower, example, path, "tokens", {0: batch, 1: length})


def export_module(module: Any, example: Any, path: Path, input_name: str, dynamic: dict) -> Path:
    """One module of one input as one ONNX file with ``features`` as its output: torch's dynamo exporter, quiet,
    weights inside the file; ``dynamic`` maps the input's dynamic axes to ``torch.export.Dim``s."""
    import torch

    with _quiet(), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["features"],
            dynamic_shapes={input_name: dynamic},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return path


def quantize_int8(source: Path, target: Path, per_channel: bool = False) -> Path:
    """Dynamic int8 weights (MatMul and the token embedding), activations quantised per call: a quarter of the
    bytes a query reads; docs/benchmarks.md has the measured cost in recall. ``per_channel``: a scale per output
    channel (the image tower: its vectors move less)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel)
    return target


def _text_tower(model: Any) -> Any:
    """The tower as a module of its own (defined here: this file imports without torch)."""
    import torch

    from retrieval.model.text_features import pooled_features, text_states

    class TextTower(torch.nn.Module):
        def __init__(self, clip: Any):
            super().__init__()
            self.clip = clip

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return pooled_features(self.clip, *text_states(self.clip, tokens))  # tokens arrive cut (text_onnx)

    return TextTower(model)


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and onnxruntime's quantiser logs advice: none of it is for the user."""
    silenced = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(silenced)
