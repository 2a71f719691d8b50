"""How a run on this machine is shaped: images per batch, decode threads, encoder lanes.

Its own module, importing nothing heavy, because two callers need the same numbers: the run itself
(``indexer.pipeline``) and the CLI's head start (``indexer.head_start``), which starts decoding before the indexer is
imported and is only taken by a run whose shape it matches.
"""

from __future__ import annotations

import os

from retrieval.model.device import Device


def default_batch_size(device: Device, onnx: bool = False) -> int:
    """CPU: 32 (larger batches gain nothing and delay the first commit); the ONNX image tower: 16, as fast per
    image with less session memory (ViT-B-32 float32, 2 threads: 24.7-27.7 against 24.0-24.7 images/s, peak
    537-674 against 800-810 MB; docs/benchmarks.md). CUDA: 256, where ViT-B-32 in fp16 runs near its peak images/s
    without holding much memory."""
    if device.is_cuda:
        return 256
    return 16 if onnx else 32


def default_workers(device: Device, onnx: bool = False) -> int:
    """CPU: one per core, at most 4 (the encoder needs the cores too). CUDA: decoding must keep up with the GPU,
    so every core, up to 16. The ONNX path: decode threads in the encoding process (``indexer.decode_pool``), one
    per core up to 16, as rclip 4 does: a thread waiting for its core costs nothing."""
    cores = os.cpu_count() or 1
    if onnx:
        return max(1, min(16, cores))
    return max(1, min(16 if device.is_cuda else 4, cores))


def encode_lanes() -> int:
    """The ONNX session's runs at once, one intra-op thread each: one per core. The decode threads share the
    cores; a run's part of a batch is its own, so no thread waits for another at every operator."""
    return os.cpu_count() or 1
