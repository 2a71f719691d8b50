"""Image features without torch: the exported image tower in ONNX Runtime.

The export depends only on the model, so it lives in a per-user cache keyed by the model's identity
(``$XDG_CACHE_HOME/clipsearch/image-towers/<key digest>``): another index of the same model never needs torch to
make it again. The folder holds the graph and ``record.json`` (a ``TextTowerRecord``: the same facts, for this
tower); an index's catalog records the export it checked (``MetaKey.IMAGE_TOWER``). A tower is used only when
the record's model is the index's model and the files are the ones recorded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from retrieval.model.text_onnx import TextTowerRecord, cpu_session, files_match
from retrieval.unit import unit_rows

TOWER_FILE = "image.onnx"
RECORD_FILE = "record.json"


class ImageEncoder(Protocol):
    """What encodes preprocessed pixels: the torch ``Encoder`` or ``OnnxImageEncoder``."""

    @property
    def dim(self) -> int: ...

    def describe(self) -> str: ...

    def encode_images(self, pixels) -> np.ndarray:
        """L2-normalised float32 features of a preprocessed (N, 3, S, S) batch."""
        ...


def image_tower_cache(model_key: str) -> Path:
    """The cache folder of the image tower exported from the model with ``model_key``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    name = hashlib.sha256(model_key.encode()).hexdigest()[:16]
    return Path(cache_home) / "clipsearch" / "image-towers" / name


class OnnxImageEncoder:
    """Normalised float32 image features from an exported tower: an ``ImageEncoder``."""

    def __init__(self, folder: Path, record: TextTowerRecord, graph_file: str = TOWER_FILE, threads: int | None = None):
        self.record = record
        self.session = cpu_session(folder / graph_file, threads)
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def describe(self) -> str:
        return f"ONNX {self.record.precision or 'float32'} image tower"

    def encode_images(self, pixels) -> np.ndarray:
        (features,) = self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
        return unit_rows(np.asarray(features, dtype=np.float32))


@dataclass(frozen=True)
class ExportedImageTower:
    """The cached export for a model: current (``problem`` None) or why it is not used."""

    folder: Path
    record: TextTowerRecord | None
    problem: str | None

    @property
    def current(self) -> bool:
        return self.problem is None

    def open(self, threads: int | None = None) -> OnnxImageEncoder:
        if self.record is None or self.problem is not None:
            raise ValueError(self.problem or "no exported image tower")
        return OnnxImageEncoder(self.folder, self.record, threads=threads)


def cached_image_tower(model_key: str) -> ExportedImageTower:
    """The image tower cached for ``model_key``: current when its record is of that model and its files intact."""
    folder = image_tower_cache(model_key)
    try:
        record = TextTowerRecord.from_json((folder / RECORD_FILE).read_text())
    except FileNotFoundError:
        return ExportedImageTower(folder, None, "no exported image tower")
    except (OSError, ValueError, TypeError):
        return ExportedImageTower(folder, None, "the cached image tower's record is unreadable")
    if record.model_key != model_key:
        return ExportedImageTower(folder, record, "the cached image tower is of another model")
    if not files_match(folder, record):
        return ExportedImageTower(folder, record, "the cached image tower's files changed")
    return ExportedImageTower(folder, record, None)
