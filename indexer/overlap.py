"""The encoding run as overlapping stages, so that no stage waits for another that could run beside it:

    DataLoader workers (processes)  read, hash and decode files (only read and hash on the nvJPEG path); on the
                                    ONNX path (``options.onnx``) ``indexer.decode_pool`` workers instead, which
                                    hand over uint8 crops and need no torch
    feed thread                     nvJPEG decode and preprocess on the GPU, on its own CUDA stream; stack the
                                    batch, pin it and copy it to the device while the previous batch encodes
    model-load thread               builds the model while the workers decode the first batches
    main thread                     encodes batches, gathers them into commit-sized chunks in file order
    writer thread                   commits each chunk (catalog rows, then FAISS adds) while the next encodes

This is the local ``EncodedChunkSource`` (``indexer.encoding``): the writer thread calls the sink's ``write``.
Bounded queues (``stages.Channel``) between them keep memory flat. Crash safety is the writer's: one chunk is one
SQLite transaction, committed in file order, so an interrupted run resumes exactly as a sequential one would.
Any stage's failure stops the others and is raised here; a Ctrl-C waits for the chunk being committed, not more.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from indexer.encoding import Chunk, ChunkSink, Encoded
from indexer.gpu_decode import JpegBytesDataset, decode_batch, gpu_decode_available
from indexer.plan import WorkItem
from indexer.stages import DONE, Channel, Stage, Stopped, first_error
from retrieval.images import ImageFileDataset, collate_decoded
from retrieval.model.build import build_image_transform
from retrieval.model.device import Device
from retrieval.model.encoder import Encoder
from retrieval.model.pixels import SquareCrop
from retrieval.model.spec import ModelSpec

QUEUED_BATCHES = 2  # decoded batches waiting for the encoder (each is batch_size images on the device)
QUEUED_CHUNKS = 2  # encoded chunks waiting for the writer


@dataclass(frozen=True)
class EncodeOptions:
    model: ModelSpec
    device: Device
    batch_size: int
    workers: int
    chunk_size: int
    onnx: SquareCrop | None = None  # the ONNX path: workers crop to this uint8 square, no torch is imported


@dataclass(frozen=True)
class OverlappedSource:
    """Encoding on this machine, as overlapped stages: an ``EncodedChunkSource``."""

    options: EncodeOptions

    def run(self, work: Sequence[WorkItem], sink: ChunkSink, progress: bool) -> float:
        return encode_and_commit(work, self.options, sink, progress)


@dataclass(frozen=True)
class _Front:
    """How batches reach the encoder: ``feed`` fills the channel (in the feed thread), ``encode`` turns one fed
    item into vectors (in the main thread), ``close`` stops the workers once the feed thread is done."""

    feed: Callable[[Channel], None]
    encode: Callable[[Any, tuple], Any]
    close: Callable[[], None]
    encoder: Any = None  # loaded before the workers started (the transform needed the model)


def encode_and_commit(work: Sequence[WorkItem], options: EncodeOptions, sink: ChunkSink, progress: bool) -> float:
    """Decode, encode and commit ``work``; returns the seconds from a loaded model to the last commit.

    ``sink.ready`` runs in this thread once the model is loaded, before the first commit; ``sink.write`` runs in
    the writer thread, one chunk at a time, in file order.
    """
    paths = [item.facts.path for item in work]
    front = _onnx_front(paths, options) if options.onnx is not None else _torch_front(paths, options, sink)
    stop = threading.Event()
    fed, encoded = Channel(QUEUED_BATCHES, stop), Channel(QUEUED_CHUNKS, stop)
    feeder = Stage("feed", lambda: front.feed(fed), stop)
    writer = Stage("writer", lambda: _write(encoded, sink.write), stop)
    loading = Stage("model-load", sink.load, stop) if front.encoder is None else None
    stages = [stage for stage in (loading, feeder, writer) if stage is not None]
    for stage in stages:
        stage.start()
    try:
        try:
            encoder = loading.wait() if loading is not None else front.encoder
            sink.ready(encoder)
            started = time.perf_counter()
            _encode(work, encoder, front.encode, fed, encoded, options, progress)
            writer.wait()
            return time.perf_counter() - started
        except Stopped:
            pass  # another stage failed: raised below, once every stage has stopped
    finally:
        stop.set()
        writer.join()  # a commit under way ends (or fails) before the caller saves the vectors
        feeder.join(timeout=5)  # it may sit in a worker's next batch: a daemon, never waited for long
        front.close()
    raise first_error(stages) or RuntimeError("indexing stopped without a reason")


def _onnx_front(paths: list[str], options: EncodeOptions) -> _Front:
    """Workers crop to uint8 squares (no torch anywhere); the encoder normalises and encodes a batch at a time."""
    from indexer.decode_pool import DecodePool

    crop = options.onnx
    pool = DecodePool(ImageFileDataset(paths, crop, crop.side), options.batch_size, options.workers)  # forks now

    def feed(out: Channel) -> None:
        for batch in pool:
            ok = [item for item in batch if item.pixels is not None]
            out.put((batch, ok, np.stack([item.pixels for item in ok]) if ok else None, None))
        out.put(DONE)

    return _Front(feed, lambda encoder, item: encoder.encode_crops(item[2]), pool.close)


def _torch_front(paths: list[str], options: EncodeOptions, sink: ChunkSink) -> _Front:
    """DataLoader workers preprocess to tensors (or read bytes for nvJPEG); a feed thread moves them to the
    device."""
    from torch.utils.data import DataLoader

    encoder: Encoder | None = None
    transform = build_image_transform(options.model)  # weightless: the workers need only the transform
    if transform is None:
        encoder = sink.load()
        preprocess, cfg, size = encoder.preprocess, encoder.identity.preprocess, encoder.identity.image_size
    else:
        preprocess, cfg = transform
        size = _side(cfg)
    on_gpu = gpu_decode_available(options.device, cfg)
    dataset = (JpegBytesDataset if on_gpu else ImageFileDataset)(paths, preprocess, size)
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        num_workers=options.workers,
        collate_fn=collate_decoded,
        prefetch_factor=4 if options.workers else None,
        worker_init_fn=_ignore_ctrl_c,
    )
    batches = iter(loader)  # forks the workers now, before this run starts any thread
    return _Front(
        lambda out: _feed(batches, out, on_gpu, size, cfg, preprocess, options.device),
        _encode_on_device,
        lambda: None,
        encoder,
    )


def _ignore_ctrl_c(_worker_id: int) -> None:
    """Ctrl-C in a terminal reaches every process of the group: the main process alone stops the run (and its
    workers), so the user sees "interrupted", not a worker's death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _side(cfg: dict[str, Any]) -> int:
    size = cfg.get("size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _feed(batches, out: Channel, on_gpu: bool, size: int, cfg: dict, preprocess, device: Device) -> None:
    """Loader batches to device tensors. On CUDA on a stream of its own, so copies and nvJPEG decoding overlap
    with the encoder's kernels; the event it records tells the encoder when the batch is ready."""
    import torch

    stream = torch.cuda.Stream(device.torch_name) if device.is_cuda else None
    for batch in batches:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if on_gpu:
                batch = decode_batch(batch, size, cfg, device.torch_name, preprocess)
            ok = [item for item in batch if item.pixels is not None]
            pixels = _to_device([item.pixels for item in ok], device) if ok else None
            ready = stream.record_event() if stream is not None else None
        out.put((batch, ok, pixels, ready))
    out.put(DONE)


def _to_device(pixels: list, device: Device):
    """One batch tensor on ``device``; CPU-decoded batches go through pinned memory (an asynchronous copy)."""
    import torch

    if not device.is_cuda:
        return torch.stack(pixels)
    if all(p.device.type == "cpu" for p in pixels):
        return torch.stack(pixels).pin_memory().to(device.torch_name, non_blocking=True)
    name = device.torch_name
    return torch.stack([p.to(name, non_blocking=True) for p in pixels])  # nvJPEG's, and a few CPU fall-backs


def _encode_on_device(encoder: Encoder, item: tuple):
    """One fed batch through the torch encoder, once its copy to the device (on the feed stream) is done."""
    import torch

    _batch, _ok, pixels, ready = item
    if ready is not None:
        current = torch.cuda.current_stream(pixels.device)
        current.wait_event(ready)
        pixels.record_stream(current)  # made on the feed stream, read on this one
    return encoder.encode_images(pixels)


def _encode(work, encoder, encode: Callable, fed: Channel, out: Channel, options: EncodeOptions, progress: bool):
    from tqdm import tqdm

    pending: list[Encoded] = []
    with tqdm(total=len(work), unit="img", disable=not progress, dynamic_ncols=True, desc="indexing") as bar:
        while (item := fed.get()) is not DONE:
            batch, ok, _pixels, _ready = item
            vectors = encode(encoder, item) if ok else []
            by_position = {decoded.position: vector for decoded, vector in zip(ok, vectors)}
            for decoded in batch:  # without its pixels: chunks wait in a queue, and a commit needs only the facts
                vector = by_position.get(decoded.position)
                pending.append((work[decoded.position], replace(decoded, pixels=None), vector))
            bar.update(len(batch))
            if len(pending) >= options.chunk_size:
                out.put(pending)
                pending = []
    if pending:
        out.put(pending)
    out.put(DONE)


def _write(inbox: Channel, commit: Callable[[Chunk], None]) -> None:
    while (chunk := inbox.get()) is not DONE:
        commit(chunk)
