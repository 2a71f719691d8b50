"""Text queries without torch: the exported text tower in ONNX Runtime, fed by the torch-free tokenizer.

Importing torch and open_clip and loading the model cost a `clipsearch search` about 5 s; this path costs a
fraction of a second. The export lives in its own folder inside the index (``text-tower-<digest>``), written by
``indexer.text_export``, which also records a ``TextTowerRecord`` in the catalog: the model it was made from,
how it was checked against the torch tower, and the digest of every file. A tower is used only when the record's
model is the index's model and the files are the ones recorded; anything else falls back to the torch path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrieval.model.clip_tokenizer import ClipTokenizer
from retrieval.model.spec import file_digest
from retrieval.model.text_features import truncated
from retrieval.unit import unit_rows

TOWER_FILE = "text.onnx"
FOLDER_PREFIX = "text-tower-"


@dataclass(frozen=True)
class TextTowerRecord:
    """What the catalog records about an exported text tower (``MetaKey.TEXT_TOWER``)."""

    folder: str  # inside the index folder
    model_key: str  # ModelIdentity.key() of the model it was exported from
    precision: str  # "int8" or "float32": the graph in TOWER_FILE
    digest: str  # sha256 over the files' own sha256s: the export's identity
    files: dict[str, list] = field(default_factory=dict)  # name -> [sha256, size, mtime_ns]
    min_cosine: float = 0.0  # float32 graph against the torch tower on the probe captions
    top10_same: bool = False  # float32 graph: the same top-10 as the torch tower on the probe captions
    int8_overlap: float | None = None  # int8 graph: mean top-10 overlap with float32 on the probe captions
    graph: str = ""  # the image tower's form (retrieval.model.image_onnx.GRAPH_FORMS); "" for the text tower

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TextTowerRecord:
        return cls(**json.loads(text))


def side_file(graph_name: str) -> str:
    """The name of the file beside a graph that holds its weights (ONNX external data): every tower is written so
    (``retrieval.model.text_export.save_graph``), because ONNX Runtime builds a session from it in half the time it
    takes to parse the weights out of one protobuf (ViT-B-32-256: 0.30 against 0.55 s; docs/benchmarks.md)."""
    return f"{graph_name}.data"


def graph_files(folder: Path, graph_name: str) -> list[str]:
    """A graph's file and its side file when it has one (exports made before side files have none): what an export
    records, checks and moves as one."""
    return [graph_name] + ([side_file(graph_name)] if (folder / side_file(graph_name)).exists() else [])


def stamp_files(folder: Path, names: Sequence[str]) -> tuple[dict[str, list], str]:
    """(per-file [sha256, size, mtime_ns], combined digest) of files in ``folder``."""
    files = {}
    for name in names:
        stat = (folder / name).stat()
        files[name] = [file_digest(folder / name), stat.st_size, stat.st_mtime_ns]
    return files, _combined(files)


def _combined(files: dict[str, list]) -> str:
    return hashlib.sha256("".join(f"{name}:{files[name][0]}\n" for name in sorted(files)).encode()).hexdigest()


def files_match(folder: Path, record: TextTowerRecord) -> bool:
    """Whether the folder holds exactly the recorded files: size and mtime as recorded (no hashing), or else
    the same sha256; and the record's digest is the digest of those files."""
    if _combined(record.files) != record.digest:
        return False
    for name, (sha, size, mtime_ns) in record.files.items():
        try:
            stat = (folder / name).stat()
        except OSError:
            return False
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns) and (
            stat.st_size != size or file_digest(folder / name) != sha
        ):
            return False
    return True


def cpu_session(
    graph: Path, threads: int | None = None, spin: bool = True, arena: bool = True, keep_optimized: bool = False
):
    """An ONNX Runtime session on the CPU that logs errors only; ``threads``: its intra-op threads (None: all);
    ``spin=False``: idle threads sleep instead of spinning (other processes need the cores); ``arena=False``: no
    memory arena (ViT-B-32's image tower peaks at 659 instead of 962 MB: the arena keeps its largest blocks) and no
    memory pattern (the block it plans for a whole batch's activations; ViT-B-32 float32, 32 images: peaks of
    645-810 against 667-963 MB, as fast; docs/benchmarks.md).

    ``keep_optimized``: the graph ONNX Runtime optimises is kept beside ``graph`` (``optimized_graph``) the first
    time, where the folder can be written; later sessions load that and skip the optimisation (a recorded export
    only: a file beside a graph still being checked would be recorded with it)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = arena
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    optimized = optimized_graph(graph, onnxruntime.__version__) if keep_optimized else None
    if optimized is not None and optimized.is_file():
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return onnxruntime.InferenceSession(str(optimized), options, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001  (a damaged copy: the recorded graph still answers)
            optimized.unlink(missing_ok=True)
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is None or not os.access(graph.parent, os.W_OK):
        return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    from retrieval.atomic import temp_path

    # EXTENDED: the fusions, not ALL's layout changes for this CPU's vector width (the file may move machines)
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    saved = temp_path(optimized)
    options.optimized_model_filepath = str(saved)
    try:
        session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for stale in graph.parent.glob(f"{graph.name}.ort-*.onnx"):  # made from an older graph or runtime
            stale.unlink(missing_ok=True)
        os.replace(saved, optimized)
    finally:
        saved.unlink(missing_ok=True)
    return session


def optimized_graph(graph: Path, runtime_version: str) -> Path | None:
    """Where ``cpu_session`` keeps ``graph`` as ONNX Runtime optimised it: named by the runtime's version and the
    size and mtime of the graph and its side file, so another runtime or a replaced graph never loads a stale copy
    (None: no graph)."""
    try:
        stats = [(graph.parent / name).stat() for name in graph_files(graph.parent, graph.name)]
    except OSError:
        return None
    stamped = ":".join(f"{stat.st_size}:{stat.st_mtime_ns}" for stat in stats)
    stamp = hashlib.sha256(f"{runtime_version}:{stamped}".encode()).hexdigest()[:16]
    return graph.with_name(f"{graph.name}.ort-{stamp}.onnx")


class OnnxTextEncoder:
    """Normalised float32 text features from an exported tower: a ``TextEncoder`` (``text_encoder``)."""

    def __init__(
        self,
        folder: Path,
        record: TextTowerRecord,
        graph_file: str = TOWER_FILE,
        threads: int | None = None,
        keep_optimized: bool = False,
    ):
        self.record = record
        self.tokenizer = ClipTokenizer(folder)
        self.session = cpu_session(folder / graph_file, threads, keep_optimized=keep_optimized)
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def describe(self) -> str:
        return f"ONNX {self.record.precision or 'float32'} text tower"

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Features of (n, context) token rows, run only up to the batch's last end-of-text token."""
        (features,) = self.session.run(None, {"tokens": np.ascontiguousarray(truncated(tokens))})
        return unit_rows(np.asarray(features, dtype=np.float32))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        chunks = [
            self.encode_tokens(self.tokenizer(list(texts[start : start + batch_size])))
            for start in range(0, len(texts), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)


@dataclass(frozen=True)
class ExportedTower:
    """What an index's exported tower is worth to text queries: current (``problem`` None) or why not."""

    folder: Path | None
    record: TextTowerRecord | None
    problem: str | None  # None: current for the index's model, every file as recorded

    @property
    def current(self) -> bool:
        return self.problem is None

    def open(self) -> OnnxTextEncoder:
        """The tower in ONNX Runtime (raises when onnxruntime is missing or the graph cannot be read)."""
        if self.folder is None or self.record is None or self.problem is not None:
            raise ValueError(self.problem or "no exported tower")
        return OnnxTextEncoder(self.folder, self.record, keep_optimized=True)


def exported_tower(root: Path, record_json: str | None, model_key: str | None) -> ExportedTower:
    """The export the catalog records (``record_json``) for an index at ``root`` whose model has ``model_key``:
    current when it belongs to that model and its files are intact; else the reason it is not used."""
    if not record_json:
        return ExportedTower(None, None, "no exported tower: run clipsearch export-text")
    try:
        record = TextTowerRecord.from_json(record_json)
    except (ValueError, TypeError):
        return ExportedTower(None, None, "the recorded export is unreadable: run clipsearch export-text")
    folder = root / record.folder
    if record.model_key != model_key:
        return ExportedTower(folder, record, "the export is of another model: run clipsearch export-text")
    if os.sep in record.folder or not files_match(folder, record):
        return ExportedTower(folder, record, "the exported files changed: run clipsearch export-text")
    return ExportedTower(folder, record, None)
