"""Decode workers without torch: processes that read, hash, decode and crop files into compact uint8 batches.

The ONNX path of a run (``indexer.overlap``) needs no torch ``DataLoader``: a batch of ``batch_size`` files goes to
one worker process, which returns its ``DecodedItem``s with (S, S, 3) uint8 pixels (``retrieval.model.pixels``),
pickled through a pipe: 150 KB an image at 224 px, a quarter of the float32 tensors the DataLoader passes through
shared memory. At most ``AHEAD`` batches per worker are in flight, so decoded images are held for their batch
and the few queued behind it, never for a whole run.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from retrieval.images import DecodedItem, ImageFileDataset

AHEAD = 2  # batches in flight per worker: enough that the encoder never waits, few enough to keep memory flat

_dataset: ImageFileDataset | None = None  # each worker's copy, set once by _start_worker


def _start_worker(dataset: ImageFileDataset) -> None:
    """Ctrl-C reaches every process of the group: the main process alone stops the run (and its workers)."""
    global _dataset
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _dataset = dataset


def _decode(positions: range) -> list[DecodedItem]:
    return [_dataset[position] for position in positions]


class DecodePool:
    """Batches of decoded items in file order. The worker processes fork when the pool is made (its first
    batches are handed out at once): make it before the run starts its threads. ``workers=0`` decodes in the
    thread that iterates. A worker that dies (killed for memory) fails the run with ``BrokenProcessPool``."""

    def __init__(self, dataset: ImageFileDataset, batch_size: int, workers: int):
        self.dataset = dataset
        starts = range(0, len(dataset), batch_size)
        self.upcoming = iter([range(start, min(start + batch_size, len(dataset))) for start in starts])
        self.waiting: deque[Future] = deque()
        self.executor = None
        if workers > 0:
            context = multiprocessing.get_context("fork")
            self.executor = ProcessPoolExecutor(workers, context, _start_worker, (dataset,))
            for _ in range(AHEAD * workers):
                self._submit()

    def _submit(self) -> None:
        positions = next(self.upcoming, None)
        if positions is not None:
            self.waiting.append(self.executor.submit(_decode, positions))

    def __iter__(self) -> Iterator[list[DecodedItem]]:
        if self.executor is None:
            for positions in self.upcoming:
                yield [self.dataset[position] for position in positions]
            return
        while self.waiting:
            batch = self.waiting.popleft().result()
            self._submit()
            yield batch

    def close(self) -> None:
        """Stop handing out work; workers finish the batch in hand and exit (what was queued is dropped)."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
