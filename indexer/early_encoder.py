"""A new index's image encoder opened while the command line and the indexer are still being imported.

`clipsearch index FOLDER` into a new index spends its first ~0.45 s importing on one core (the command line, then
the catalog's SQLAlchemy and FAISS), and only then would start building the ONNX Runtime session (0.33 s of CPU for
ViT-B-32-256), which the first encode waits for. A new index always encodes, and which session it encodes with is
known before any of that is imported: so it is built on a thread first (ONNX Runtime releases the GIL while it
builds), and the run's own ``indexing_encoder`` call then finds it open, or waits for it (``shared_image_encoder``
opens one per process). A refresh is left alone: it may have nothing to encode.

Two places start it. The `index` command, before it imports the indexer: against no early session, 10 alternated
fresh processes each, median, a 2-photo new index 0.893 -> 0.726 s, 32 photos 2.418 -> 2.352 s. And, first,
``clipsearch.launch``, before the command line is imported, when the arguments are its plain form: a further
0.790 -> 0.714 s and 2.431 -> 2.378 s (the same way, 10 and 8 runs).
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

THREAD_NAME = "clipsearch-early-encoder"
_STARTED: set[tuple[Path, ModelSpec, bool]] = set()  # what this process started opening (launch, then the command)


def open_encoder_early(index_dir: Path, model: ModelSpec, device: Device, int8: bool = False) -> bool:
    """Start opening the session a first run into ``index_dir`` will encode with; returns whether it started (a
    new index, encoded on this CPU with the cached ONNX tower), or had been started already in this process."""
    index_dir = Path(index_dir).expanduser()
    if device.is_cuda or IndexLayout(index_dir).catalog.exists():
        return False
    if (index_dir, model, int8) in _STARTED:
        return True
    try:
        tower = cached_image_tower(spec_key(model, check=False))
    except Exception:  # noqa: BLE001  (a spec that cannot be keyed: the run says why, in its own words)
        return False
    if choose_image_backend(device, tower, int8).backend != ONNX:
        return False
    _STARTED.add((index_dir, model, int8))
    threading.Thread(target=_open_quietly, args=(tower, int8), name=THREAD_NAME).start()
    return True


def _open_quietly(tower: ExportedImageTower, int8: bool) -> None:
    """Not a daemon: the process waits for it rather than tearing a half-built session down. A failure is left to
    the run, which opens the session again and says what went wrong (or encodes with torch)."""
    with contextlib.suppress(Exception):
        indexing_encoder(tower, int8)
