"""Encode on a Ray cluster: the second ``EncodedChunkSource`` (``indexer.encoding``), for the same writer.

The driver (``indexer.pipeline``) scans, plans, diffs and commits exactly as a local run does; only the expensive
middle moves to the cluster, as one streaming Ray Data job:

    positions + paths ─CPU tasks: read, hash, decode, preprocess─▶ pixels ─actor pool: one model per actor─▶
    rows (position, content hash, size in pixels, header facts, float16 embedding, error) ─in order─▶ driver

Decoding runs the very code a local run runs (``ImageFileDataset``), so failures carry the same reasons. Ray
retries a task or restarts an actor that dies; rows come back in work order (``preserve_order``), each position
once, and the driver commits them chunk by chunk, so a killed driver resumes from its last commit like a local
run. Every node must see the files under the same path (a shared file system).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.encoding import Chunk, ChunkSink
from retrieval.errors import ClipsearchError, UsageError
from retrieval.faults import FAULT_ENV, fault_point
from retrieval.image_meta import ImageMeta, read_image_meta
from retrieval.images import DecodedItem, ImageFileDataset
from retrieval.model.spec import ModelSpec

if TYPE_CHECKING:
    from indexer.plan import WorkItem
    from retrieval.model.encoder import Encoder

BLOCK_ROWS = 256  # paths per decode task: big enough to amortise a task, small enough to spread a folder
DECODE_TASK_MEMORY = 1 << 30  # a worker with torch imported (~0.5 GB) plus a block: 256 files, float32 pixels
READ_FAILURES = ("file vanished before it could be read", "unreadable:")  # reasons a missing mount would give


class RayPathError(ClipsearchError):
    """A worker cannot read a file the driver can: the folders are not shared under the same path."""


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to encode. ``address``: ``auto`` starts a local cluster (or uses the one this process
    already joined); anything else is a cluster address (``ray start --head`` prints it)."""

    address: str = "auto"
    gpus_per_worker: float = 0.0  # GPUs each encoder actor holds; 0: actors encode on CPUs
    workers: int | None = None  # encoder actors; None: one per GPU of the cluster (at least one)
    block_rows: int = BLOCK_ROWS


@dataclass(frozen=True)
class RaySource:
    """Encoding on a Ray cluster: chunks come back in work order and the sink writes them on this (the driver's)
    thread while Ray Data keeps decoding and encoding the next rows."""

    ray: RaySettings
    spec: ModelSpec
    batch_size: int
    chunk_size: int
    int8: bool = False

    def run(self, work: Sequence[WorkItem], sink: ChunkSink, progress: bool) -> float:
        encoder = sink.load()  # the driver's own load: its preprocessing travels to the decode tasks
        sink.ready(encoder)
        started = time.perf_counter()
        chunks = encode_on_ray(
            work, encoder, self.spec, self.ray, self.batch_size, self.chunk_size, self.int8, progress
        )
        for chunk in chunks:
            sink.write(chunk)
        return time.perf_counter() - started


def encode_on_ray(
    work: Sequence[WorkItem],
    encoder: Encoder,
    spec: ModelSpec,
    ray_settings: RaySettings,
    batch_size: int,
    chunk_size: int,
    int8: bool = False,
    progress: bool = True,
) -> Iterator[Chunk]:
    """Yield commit-sized chunks of (work item, outcome, vector or None), in work order, like the local encoder.

    ``encoder`` is the driver's own load of the model: its preprocessing travels to the decode tasks, so pixels
    are made exactly as on this machine; the actors load ``spec`` themselves.
    """
    from tqdm import tqdm

    ray = connect(ray_settings.address)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    dataset = _dataset(ray, work, encoder, spec, ray_settings, batch_size, int8)
    pending: Chunk = []
    with tqdm(total=len(work), unit="img", disable=not progress, dynamic_ncols=True, desc="indexing (ray)") as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for row in _rows(batch):
                position, decoded, vector, node = row
                item = work[position]
                if vector is None:
                    check_worker_read(item.facts.path, decoded.error, node)
                pending.append((item, decoded, vector))
            bar.update(len(batch["position"]))
            if len(pending) >= chunk_size:
                yield pending
                pending = []
    if pending:
        yield pending


def connect(address: str) -> Any:
    """The ``ray`` module, connected: to the cluster this process already joined, a new local one, or ``address``."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra: ray[data])
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'clipsearch[ray]'") from None
    if ray.is_initialized():
        return ray
    try:
        if address == "auto":
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UsageError(f"cannot join the Ray cluster at {address}: {str(error).splitlines()[0]}") from None
    return ray


def check_worker_read(path: str, reason: str | None, node: str) -> None:
    """Refuse to record a file as unreadable when only the worker failed to read it: that is a cluster whose
    nodes do not share the folders, and recording it would mark healthy photos as failed."""
    if not reason or not reason.startswith(READ_FAILURES) or node == "":
        return
    if os.path.isfile(path) and os.access(path, os.R_OK):
        raise RayPathError(
            f"a Ray worker on {node} cannot read {path}, which this machine can: every node must see the folders "
            f"under the same path (a shared file system mounted at the same place); nothing after the last "
            f"committed chunk was written"
        )


def _dataset(ray, work, encoder, spec, ray_settings: RaySettings, batch_size: int, int8: bool):
    import pyarrow as pa

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in work order: ids as a local run gives
    context.enable_progress_bars = False
    paths = [item.facts.path for item in work]
    mtimes = np.array([item.facts.mtime_ns for item in work], dtype=np.int64)
    step = max(1, ray_settings.block_rows)
    blocks = [
        pa.table({"position": np.arange(start, min(start + step, len(paths)), dtype=np.int64),
                  "path": paths[start : start + step], "mtime_ns": mtimes[start : start + step]})
        for start in range(0, len(paths), step)
    ]  # fmt: skip
    size = encoder.identity.image_size
    decoded = ray.data.from_arrow(blocks).map_batches(
        _decode_block,
        batch_size=None,
        fn_kwargs={"preprocess": encoder.preprocess, "min_side": size},
        num_cpus=1,
        # Reserving the block's memory also keeps Ray Data from fusing decoding into the encoder actors (it fuses
        # only operators with equal resources), where files would be decoded one at a time beside the model.
        memory=DECODE_TASK_MEMORY,
    )
    actors = ray_settings.workers or _default_actors(ray, ray_settings.gpus_per_worker)
    env = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
    return decoded.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"spec": spec, "int8": int8, "on_gpu": bool(ray_settings.gpus_per_worker)},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=ray_settings.gpus_per_worker or None,
        num_cpus=1,
        runtime_env={"env_vars": env} if env else None,
    )


def _default_actors(ray, gpus_per_worker: float) -> int:
    if not gpus_per_worker:
        return 1
    return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_worker))


def _decode_block(batch: dict[str, np.ndarray], preprocess, min_side: int) -> dict[str, np.ndarray]:
    """CPU task: read, hash, decode and preprocess a block of files with the local indexer's own code."""
    paths = [str(path) for path in batch["path"]]
    dataset = ImageFileDataset(paths, preprocess, min_side)
    items = [dataset[i] for i in range(len(paths))]
    shape = next((tuple(item.pixels.shape) for item in items if item.pixels is not None), (3, min_side, min_side))
    pixels = np.zeros((len(items),) + shape, dtype=np.float32)
    for i, item in enumerate(items):
        if item.pixels is not None:
            pixels[i] = item.pixels.numpy()
    node = socket.gethostname()
    meta = [  # header facts read here, beside the file, not by the single writer
        json.dumps(asdict(read_image_meta(path, int(mtime)))) if item.pixels is not None else ""
        for path, mtime, item in zip(paths, batch["mtime_ns"], items)
    ]
    return {
        "position": batch["position"],
        "pixels": pixels,
        "ok": np.array([item.pixels is not None for item in items]),
        "meta": np.array(meta, dtype=object),
        **_facts(items, node),
    }


def _facts(items: list[DecodedItem], node: str) -> dict[str, np.ndarray]:
    return {
        "content_hash": np.array([item.content_hash or "" for item in items], dtype=object),
        "width": np.array([item.width or 0 for item in items], dtype=np.int64),
        "height": np.array([item.height or 0 for item in items], dtype=np.int64),
        "error": np.array([item.error or "" for item in items], dtype=object),
        "node": np.array([node if item.error else "" for item in items], dtype=object),
    }


class EncodeActor:
    """One loaded model per actor (on its GPU when Ray gave it one); turns pixel batches into float16 rows."""

    def __init__(self, spec: ModelSpec, int8: bool = False, on_gpu: bool = False):
        import torch

        from retrieval.model.device import CPU, Device
        from retrieval.model.encoder import Encoder

        cpus = int(os.environ.get("OMP_NUM_THREADS") or 0) or 1
        torch.set_num_threads(max(1, cpus))
        self.encoder = Encoder.load(spec, Device("cuda") if on_gpu else CPU, int8=int8)  # Ray gave it a GPU or none

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        fault_point("encode_batch")
        ok = batch["ok"].astype(bool)
        embedding = np.zeros((len(ok), self.encoder.dim), dtype=np.float16)
        if ok.any():
            vectors = self.encoder.encode_images(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
            embedding[ok] = vectors.astype(np.float16)
        out = {key: value for key, value in batch.items() if key != "pixels"}
        out["embedding"] = embedding
        return out


def _rows(batch: dict[str, np.ndarray]) -> Iterator[tuple[int, DecodedItem, np.ndarray | None, str]]:
    for i, position in enumerate(batch["position"]):
        ok = bool(batch["ok"][i])
        decoded = DecodedItem(
            position=int(position),
            pixels=None,
            content_hash=batch["content_hash"][i] or None,
            width=int(batch["width"][i]) if ok else None,
            height=int(batch["height"][i]) if ok else None,
            error=batch["error"][i] or None,
            meta=ImageMeta(**json.loads(batch["meta"][i])) if ok else None,
        )
        vector = batch["embedding"][i].astype(np.float32) if ok else None
        yield int(position), decoded, vector, str(batch["node"][i])
