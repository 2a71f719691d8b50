"""Image features without torch: the exported image tower in ONNX Runtime.

The export depends only on the model, so it lives in a per-user cache keyed by the model's identity
(``$XDG_CACHE_HOME/clipsearch/image-towers/<key digest>``): another index of the same model never needs torch to
make it again. The folder holds the graphs (each with its weights in a side file, ``text_onnx.side_file``), the
model's ``ModelIdentity`` (``identity.json``: what a new index records, and the preprocessing
``retrieval.model.pixels`` repeats without torch) and ``record.json`` (a
``TextTowerRecord``: the same facts as for the text tower); an index's catalog records the export it checked
(``MetaKey.IMAGE_TOWER``). A tower is used only when the record's model is the index's model and the files are the
ones recorded. ``choose_image_backend`` is the one rule for which backend encodes images.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from retrieval.model.device import Device
from retrieval.model.pixels import SquareCrop, crop_for, normalisation_for, unsupported_preprocess
from retrieval.model.spec import ModelIdentity
from retrieval.model.text_encoder import BackendChoice
from retrieval.model.text_onnx import TextTowerRecord, cpu_session, files_match
from retrieval.unit import unit_rows

if TYPE_CHECKING:
    from PIL import Image

TOWER_FILE = "image.onnx"
INT8_FILE = "image-int8.onnx"  # dynamic int8, per channel: kept when its top-10 agrees with float32 on the probes
RECORD_FILE = "record.json"
IDENTITY_FILE = "identity.json"
ONNX, TORCH = "onnx", "torch"
# The forms of graph the current exporter writes (``retrieval.model.image_export``), as recorded in
# ``TextTowerRecord.graph``. An export recorded with another ("": made before the lean form) still encodes, as it
# passed the same check against torch, and is made again after the next run that encodes (``outdated``).
LEAN, AS_WRITTEN = "vit-lean-1", "as-written-1"
GRAPH_FORMS = (LEAN, AS_WRITTEN)
GRAPH_FORM_WORDS = {LEAN: "lean ViT graph", AS_WRITTEN: "graph as written"}  # as `clipsearch info` says them
OLDER_FORM_WORDS = "older export: re-made at the next index run"


class ImageEncoder(Protocol):
    """What encodes preprocessed pixels: the torch ``Encoder`` or ``OnnxImageEncoder``."""

    @property
    def dim(self) -> int: ...

    @property
    def identity(self) -> ModelIdentity | None: ...

    def describe(self) -> str: ...

    def encode_images(self, pixels) -> np.ndarray:
        """L2-normalised float32 features of a preprocessed (N, 3, S, S) batch."""
        ...

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        """The same for a (N, S, S, 3) uint8 batch of ``retrieval.model.pixels`` crops."""
        ...

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The same for decoded images (query images, uploads)."""
        ...


def image_tower_cache(model_key: str) -> Path:
    """The cache folder of the image tower exported from the model with ``model_key``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    name = hashlib.sha256(model_key.encode()).hexdigest()[:16]
    return Path(cache_home) / "clipsearch" / "image-towers" / name


class OnnxImageEncoder:
    """Normalised float32 image features from an exported tower: an ``ImageEncoder``. ``identity``: the model's,
    which says how its images are cropped and normalised (``crop``, ``encode_crops``)."""

    def __init__(
        self,
        folder: Path,
        record: TextTowerRecord,
        graph_file: str = TOWER_FILE,
        threads: int | None = None,
        identity: ModelIdentity | None = None,
        spin: bool = True,
        lanes: int = 1,
    ):
        self.record = record
        self.identity = identity
        self.precision = "int8" if graph_file == INT8_FILE else (record.precision or "float32")
        self.session = cpu_session(folder / graph_file, threads, spin, arena=False)
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.side = int(self.session.get_inputs()[0].shape[-1])
        self._normalise = normalisation_for(identity.preprocess if identity else {})
        self.lanes = max(1, lanes)
        self._lane_threads = ThreadPoolExecutor(lanes - 1, thread_name_prefix="encode-lane") if lanes > 1 else None

    @property
    def crop(self) -> SquareCrop:
        """What a decode worker makes of an image for this tower: the uint8 square ``encode_crops`` takes."""
        return crop_for(self.side, self.identity.preprocess if self.identity else {})

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        """Features of a (N, S, S, 3) uint8 batch from ``crop``. Each lane normalises its own part: done for the
        whole batch before the split, it kept one core idle ~18 ms a 16-image batch once decoding had finished."""
        return self._in_lanes(crops, lambda part: self._run(self._normalise(part)))

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        crop = self.crop
        return self.encode_crops(np.stack([crop(image) for image in images]))

    def describe(self) -> str:
        return f"ONNX {self.precision} image tower"

    def encode_images(self, pixels) -> np.ndarray:
        """With ``lanes``, the batch is split into that many parts run at once (the session is thread-safe), each
        on the session's ``threads``: on 2 cores, two 1-thread runs of 8 images take 83-85 ms of CPU an image
        where one 2-thread run of 16 takes 93-95 ms (the threads of one run wait for each other at every
        operator; docs/benchmarks.md). Each image's features do not depend on the split."""
        return self._in_lanes(np.ascontiguousarray(pixels, dtype=np.float32), self._run)

    def _in_lanes(self, batch: np.ndarray, encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``encode`` on ``lanes`` parts of ``batch`` at once, this thread taking the first; rows in order."""
        if self._lane_threads is None or len(batch) < 2:
            return encode(batch)
        first, *rest = np.array_split(batch, min(len(batch), self.lanes))
        others = [self._lane_threads.submit(encode, part) for part in rest]
        return np.concatenate([encode(first), *(other.result() for other in others)])

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        (features,) = self.session.run(None, {"pixels": pixels})
        return unit_rows(np.asarray(features, dtype=np.float32))


@dataclass(frozen=True)
class ExportedImageTower:
    """The cached export for a model: current (``problem`` None) or why it is not used."""

    folder: Path
    record: TextTowerRecord | None
    problem: str | None
    identity: ModelIdentity | None = None  # the model's, as recorded beside the graph

    @property
    def current(self) -> bool:
        return self.problem is None

    @property
    def outdated(self) -> bool:
        """Current, but written by an older exporter than this code's (``GRAPH_FORMS``): to be made again."""
        return self.current and self.record is not None and self.record.graph not in GRAPH_FORMS

    @property
    def graph_form(self) -> str:
        """The recorded form of the graph in plain words, for a person (``GRAPH_FORM_WORDS``)."""
        if self.record is None:
            return ""
        return GRAPH_FORM_WORDS.get(self.record.graph, OLDER_FORM_WORDS)

    @property
    def has_int8(self) -> bool:
        """Whether the export kept an int8 graph (its top-10 agreed with float32's on the probes)."""
        return self.record is not None and INT8_FILE in self.record.files

    def open(
        self, threads: int | None = None, spin: bool = True, int8: bool = False, lanes: int = 1
    ) -> OnnxImageEncoder:
        """The tower in ONNX Runtime; ``threads``: intra-op threads of a run (None: every core); ``spin=False``
        when other threads (decoding) need the cores its threads would wait on; ``int8``: the int8 graph;
        ``lanes``: runs at once, each on a part of a batch (``OnnxImageEncoder.encode_images``)."""
        if self.record is None or self.problem is not None:
            raise ValueError(self.problem or "no exported image tower")
        graph = INT8_FILE if int8 else TOWER_FILE
        return OnnxImageEncoder(self.folder, self.record, graph, threads, self.identity, spin, lanes)


_OPEN: dict[tuple, OnnxImageEncoder] = {}
_OPENING = threading.Lock()


def shared_image_encoder(
    tower: ExportedImageTower, threads: int | None = None, spin: bool = True, int8: bool = False, lanes: int = 1
) -> OnnxImageEncoder:
    """One session per process for a tower, graph and thread count, as ``Encoder.load`` keeps one torch model: a
    watcher's preload and its runs, a server's image queries share it."""
    key = (str(tower.folder), tower.record.digest if tower.record else "", threads, spin, int8, lanes)
    with _OPENING:
        if key not in _OPEN:
            _OPEN.clear()  # one image tower in memory
            _OPEN[key] = tower.open(threads, spin, int8, lanes)
        return _OPEN[key]


def indexing_encoder(tower: ExportedImageTower, int8: bool = False) -> OnnxImageEncoder:
    """The session an indexing run encodes with (``shared_image_encoder``, so opened once per process): 1 intra-op
    thread that sleeps when idle, a part of each batch run at once per core (``encode_lanes``)."""
    return shared_image_encoder(tower, 1, False, int8, encode_lanes())


def encode_lanes() -> int:
    """The ONNX session's runs at once, one intra-op thread each: one per core. The decode threads share the
    cores; a run's part of a batch is its own, so no thread waits for another at every operator."""
    return os.cpu_count() or 1


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
    if IDENTITY_FILE not in record.files:
        return ExportedImageTower(folder, record, "the cached image tower predates identity.json")
    try:
        identity = ModelIdentity.from_json((folder / IDENTITY_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return ExportedImageTower(folder, record, "the cached image tower's identity.json is unreadable")
    return ExportedImageTower(folder, record, None, identity)


def choose_image_backend(device: Device, tower: ExportedImageTower, int8: bool = False) -> BackendChoice:
    """The one rule for who encodes images: on the CPU the cached ONNX tower when it is current and its
    preprocessing can be done without torch; torch on CUDA, for ``--int8`` (torch's dynamic int8) and for models
    that do not export. Decided from facts known without loading anything (`clipsearch info` says it)."""
    if device.is_cuda:
        return BackendChoice(TORCH, "CUDA: the ONNX image tower runs on the CPU", f"torch model on {device}")
    if int8 and not (tower.current and tower.has_int8):
        why = "the export kept no int8 graph" if tower.current else tower.problem
        return BackendChoice(TORCH, f"--int8: torch's dynamic int8 image tower ({why})", "torch model (int8)")
    if not tower.current:
        return BackendChoice(TORCH, f"{tower.problem}; a CPU run that encodes exports it", f"torch model on {device}")
    why = unsupported_preprocess(tower.identity.preprocess if tower.identity else {})
    if why is not None:
        return BackendChoice(TORCH, why, f"torch model on {device}")
    precision = "int8" if int8 else (tower.record.precision if tower.record else "?")
    reason = "--int8: int8 graph, checked against float32" if int8 else "exported, current"
    return BackendChoice(ONNX, f"{reason}; {tower.graph_form}", f"ONNX {precision} image tower")
