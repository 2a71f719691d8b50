"""A new index's first batches decoded while the indexer is still being imported.

`clipsearch index FOLDER` spends ~0.3 s importing the catalog (SQLAlchemy) and FAISS and creating the catalog
before its plan says what to encode, one core busy and the other idle. For a new index (no catalog yet) the plan is
known without them: every image the scan finds, in scan order, all new. So the CLI starts decoding that list
first, in the decode threads the run would start (``indexer.decode_pool``), and then imports the rest. The run
takes the started pool only when its own plan, made under the write lock from its own scan, asks for exactly the
same files with the same crop, batch size and threads (``decode_pool_for``); anything else (another process made
the index meanwhile, a file came or went, the encoder is torch's) drops it. What a run encodes is its own plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from indexer.decode_pool import start_decode_pool
from indexer.run_shape import default_batch_size, default_workers
from indexer.scan import resolve_folder, scan_folder
from retrieval.errors import ClipsearchError
from retrieval.model.device import Device
from retrieval.model.image_onnx import ONNX, cached_image_tower, choose_image_backend
from retrieval.model.pixels import crop_for
from retrieval.model.spec import ModelSpec, spec_key
from retrieval.store.layout import IndexLayout


def start_decoding_new_index(
    index_dir: Path,
    folders: Sequence[Path],
    model: ModelSpec,
    device: Device,
    batch_size: int | None = None,
    workers: int | None = None,
    int8: bool = False,
) -> bool:
    """Start decoding what a first run into ``index_dir`` will encode, when that is known before the catalog is
    read: a new index, images encoded by the cached ONNX tower. Returns whether it started. Settings as
    ``IndexSettings`` names them (None: the run's defaults)."""
    if not folders or device.is_cuda or IndexLayout(Path(index_dir).expanduser()).catalog.exists():
        return False
    try:
        tower = cached_image_tower(spec_key(model, check=False))
        roots = [resolve_folder(Path(folder)) for folder in folders]
    except (ClipsearchError, OSError, ValueError):
        return False  # the run says what is wrong, in its own words
    if choose_image_backend(device, tower, int8).backend != ONNX or tower.identity is None:
        return False
    paths = list(dict.fromkeys(facts.path for root in roots for facts in scan_folder(root, roots).files))
    if not paths:
        return False
    crop = crop_for(tower.identity.image_size, tower.identity.preprocess)
    batch = batch_size or default_batch_size(device, onnx=True)
    threads = default_workers(device, onnx=True) if workers is None else workers
    start_decode_pool(paths, crop, batch, threads)
    return True
