"""A new index's image encoder opened while the indexer is still being imported.

`clipsearch index FOLDER` into a new index spends its first ~0.3 s importing the catalog (SQLAlchemy) and FAISS on
one core, and only then starts building the ONNX Runtime session (0.33 s of CPU for ViT-B-32-256), which the first
encode waits for. A new index always encodes, and which session it encodes with is known before any of that is
imported: so the CLI starts building it on a thread first (ONNX Runtime releases the GIL while it builds), and
the run's own ``indexing_encoder`` call then finds it open, or waits for it (``shared_image_encoder`` opens one
per process). A refresh is left alone: it may have nothing to encode. Measured, with and without it (10
alternated fresh processes each, median): a 2-photo new index 0.893 -> 0.726 s, 32 photos 2.418 -> 2.352 s.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from retrieval.model.device import Device
from retrieval.model.image_onnx import (
    ONNX,
    ExportedImageTower,
    cached_image_tower,
    choose_image_backend,
    indexing_encoder,
)
from retrieval.model.spec import ModelSpec, spec_key
from retrieval.store.layout import IndexLayout


def open_encoder_early(index_dir: Path, model: ModelSpec, device: Device, int8: bool = False) -> bool:
    """Start opening the session a first run into ``index_dir`` will encode with; returns whether it started (a
    new index, encoded on this CPU with the cached ONNX tower)."""
    if device.is_cuda or IndexLayout(Path(index_dir).expanduser()).catalog.exists():
        return False
    try:
        tower = cached_image_tower(spec_key(model, check=False))
    except Exception:  # noqa: BLE001  (a spec that cannot be keyed: the run says why, in its own words)
        return False
    if choose_image_backend(device, tower, int8).backend != ONNX:
        return False
    threading.Thread(target=_open_quietly, args=(tower, int8), name="clipsearch-early-encoder").start()
    return True


def _open_quietly(tower: ExportedImageTower, int8: bool) -> None:
    """Not a daemon: the process waits for it rather than tearing a half-built session down. A failure is left to
    the run, which opens the session again and says what went wrong (or encodes with torch)."""
    with contextlib.suppress(Exception):
        indexing_encoder(tower, int8)
