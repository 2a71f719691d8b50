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
import os
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
    """The text tower of an open_clip CLIP as an ONNX graph (float32 weights in its side file)."""
    import torch

    check_exportable(model)
    tower = _text_tower(model).eval()
    context = int(model.attn_mask.shape[0])
    example = torch.zeros((2, min(8, context)), dtype=torch.long)
    example[:, -1] = 1  # an end-of-text position for the argmax
    batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=2, max=context)
    return export_module(tower, example, path, "tokens", {0: batch, 1: length})


def export_module(module: Any, example: Any, path: Path, input_name: str, dynamic: dict) -> Path:
    """One module of one input as an ONNX graph with ``features`` as its output: torch's dynamo exporter, quiet,
    saved by ``save_graph``; ``dynamic`` maps the input's dynamic axes to ``torch.export.Dim``s. The exporter
    writes the weights to a side file at once, for every size (torch 2.14 would itself only above 1.5 GB), so no
    step puts graph and weights in one protobuf (2 GB at most; ViT-H-14's image tower is ~2.5 GB); ``save_graph``
    then writes the same bytes as from inline weights."""
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
            external_data=True,
            verbose=False,
        )
    return save_graph(path, path)


def quantize_int8(source: Path, target: Path, per_channel: bool = False) -> Path:
    """Dynamic int8 weights (MatMul and the token embedding), activations quantised per call: a quarter of the
    bytes a query reads; docs/benchmarks.md has the measured cost in recall. ``per_channel``: a scale per output
    channel (the image tower: its vectors move less)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel)
    return save_graph(target, target)


SIDE_FILE_MIN_BYTES = 1024  # smaller tensors stay in the graph (onnx's default; it makes no measurable difference)


def save_graph(source: Path, target: Path) -> Path:
    """The one form every exported graph is written in: the graph at ``target``, all its weights of at least
    ``SIDE_FILE_MIN_BYTES`` in one side file beside it (``text_onnx.side_file``), packed without alignment (ONNX
    Runtime reads them into its own memory either way: 4 or 64 KB alignment built as fast, peaked as high).
    ``source`` (weights inline or in its own side file) may be ``target``."""
    import onnx

    from retrieval.model.text_onnx import side_file

    model = onnx.load(str(source))  # with its side file's weights, if it has one
    for tensor in model.graph.initializer:
        tensor.ClearField("data_location")  # loaded back inline: the default, written as when it was never out
    side = target.with_name(side_file(target.name))
    side.unlink(missing_ok=True)  # onnx appends to a side file that exists
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=side.name,
        size_threshold=SIDE_FILE_MIN_BYTES,
    )
    if side.exists():
        side.chmod(target.stat().st_mode & 0o777)  # onnx creates it private; it is as readable as its graph
    return target


def move_graph(source: Path, target: Path) -> Path:
    """Rename a graph written by ``save_graph`` and its side file, the side file's bytes untouched (only the name
    the graph points at changes): what was checked is what is kept."""
    import onnx

    from retrieval.model.text_onnx import side_file

    model = onnx.load(str(source), load_external_data=False)
    old, new = side_file(source.name), side_file(target.name)
    for tensor in model.graph.initializer:  # save_graph moves initializers only (attributes stay inline)
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    if (source.parent / old).exists():
        os.replace(source.parent / old, target.parent / new)
    onnx.save_model(model, str(target))
    if source != target:
        source.unlink()
    return target


def remove_graph(path: Path) -> None:
    """A graph and its side file gone (a dropped variant, a failed export)."""
    from retrieval.model.text_onnx import side_file

    path.unlink(missing_ok=True)
    path.with_name(side_file(path.name)).unlink(missing_ok=True)


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
