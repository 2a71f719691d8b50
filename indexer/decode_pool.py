"""Decode threads without torch: read, hash, decode and crop files into compact uint8 batches, in this process.

The ONNX path of a run (``indexer.overlap``) needs no torch ``DataLoader`` and no worker processes: Pillow releases
the GIL while it decodes (draft-reduced JPEGs included) and resizes, hashlib while it hashes and ONNX Runtime while
it encodes, so threads decode beside the encoder with no batch pickled through a pipe (the system time that cost:
5.6 against rclip's 1.5 s for 1,000 web-sized JPEGs, docs/benchmarks.md). Each file is its own task, so a slow
file holds back only its batch; batches come out in file order. At most ``AHEAD`` batches are in flight, so
decoded images are held for their batch and the few queued behind it, never for a whole run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from retrieval.images import DecodedItem, ImageFileDataset, refuse_bombs_in_every_thread

AHEAD = 3  # batches in flight: enough that the encoder never waits, few enough to keep memory flat


class DecodePool:
    """Batches of decoded items in file order, decoded by ``threads`` threads (``0``: in the thread that
    iterates). A file that fails is a ``DecodedItem`` with its error, never a failed batch."""

    def __init__(self, dataset: ImageFileDataset, batch_size: int, threads: int):
        self.dataset = dataset
        starts = range(0, len(dataset), batch_size)
        self.upcoming = iter([range(start, min(start + batch_size, len(dataset))) for start in starts])
        self.waiting: deque[list[Future]] = deque()
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 0 else None
        if self.executor is not None:
            refuse_bombs_in_every_thread()
            for _ in range(AHEAD):
                self._submit()

    def _submit(self) -> None:
        positions = next(self.upcoming, None)
        if positions is not None:
            self.waiting.append([self.executor.submit(self.dataset.__getitem__, position) for position in positions])

    def __iter__(self) -> Iterator[list[DecodedItem]]:
        if self.executor is None:
            for positions in self.upcoming:
                yield [self.dataset[position] for position in positions]
            return
        while self.waiting:
            futures = self.waiting.popleft()
            self._submit()
            yield [future.result() for future in futures]

    def close(self) -> None:
        """Stop handing out work; the threads finish the files in hand (what was queued is dropped)."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
