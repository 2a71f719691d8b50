"""Write a CLIP image tower as ONNX (float32), for indexing and image queries without torch.

The graph takes preprocessed pixels (dynamic batch, float32, N x 3 x S x S) and returns L2-normalised features:
``encode_image`` as the torch ``Encoder`` runs it. Two forms (``image_onnx.GRAPH_FORMS``): ``LEAN``, open_clip's
ViT rewritten to do less work per image (``retrieval.model.vit_export``), for the towers it fits; ``AS_WRITTEN``,
the tower traced as it is, for the others (and when the lean graph fails its check). Needs torch and
``onnxscript`` (torch's exporter): export time only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval.model.image_onnx import AS_WRITTEN, LEAN
from retrieval.model.text_export import UnsupportedExport, export_module, remove_graph


def check_image_exportable(model: Any) -> None:
    """Only a model with an ``encode_image`` and a ``visual`` tower of square input is exported."""
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(model, "encode_image"):
        raise UnsupportedExport(f"{type(model).__name__} has no image tower")
    size = getattr(visual, "image_size", None)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if not all(isinstance(side, int) for side in size) or size[0] != size[1]:
        raise UnsupportedExport(f"image size {size!r} is not one square side")


def image_side(model: Any) -> int:
    """The side, in pixels, of the square images the tower takes."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def export_image_onnx(model: Any, path: Path, lean: bool = True) -> str:
    """The image tower of an open_clip model as an ONNX graph (float32 weights in its side file); returns its form:
    ``LEAN`` when asked for and the tower fits it, else ``AS_WRITTEN``."""
    import torch

    from retrieval.model.vit_export import UnsupportedLean, lean_image_tower

    check_image_exportable(model)
    side = image_side(model)
    example = torch.rand((2, 3, side, side), dtype=torch.float32)
    dynamic = {0: torch.export.Dim("batch", min=1, max=4096)}
    if lean:
        try:
            export_module(lean_image_tower(model).eval(), example, path, "pixels", dynamic)
            return LEAN
        except UnsupportedLean:
            pass
        except Exception:  # noqa: BLE001  (an exporter that cannot trace the rewrite: the tower as written)
            remove_graph(path)
    export_module(_image_tower(model).eval(), example, path, "pixels", dynamic)
    return AS_WRITTEN


def _image_tower(model: Any) -> Any:
    """The tower as a module of its own (defined here: this file imports without torch)."""
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self, clip: Any):
            super().__init__()
            self.clip = clip

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            features = self.clip.encode_image(pixels, normalize=False).float()
            return torch.nn.functional.normalize(features, dim=-1)

    return ImageTower(model)
