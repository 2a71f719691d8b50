"""The OCR pass: after CLIP encoding, read the text printed in every indexed photo no OCR pass has looked at yet,
into the catalog's text store (``retrieval.store.image_text``).

A stage of its own, so search works as soon as the vectors are in and the text arrives after. Its work is the
indexed images without an OCR pass row, so it resumes by itself: a batch of results is one SQLite transaction (the
lines, the pass row, the text index), and kill -9 at any moment loses at most the batch being read. A photo whose
file changed since it was encoded is left for the next run (its content hash no longer matches); a photo OCR fails
on is recorded as failed with its reason (retried when the file changes) and never stops the run. With nothing to
read, the OCR model is never loaded.

Workers are processes (spawned: the parent holds torch's threads), each with one RapidOCR whose ONNX sessions run
one thread, so every core reads its own photo; ``workers=0`` reads in this process with every core.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from indexer.text_pass import TextResult, commit_results, pending_images
from retrieval.errors import Interrupted
from retrieval.images import DecodeError, content_hash, decode_image_and_size, read_file
from retrieval.model.device import Device
from retrieval.model.ocr import DECODE_MIN_SIDE, ReadLine, TextReader, require_ocr
from retrieval.store.catalog import Catalog
from retrieval.store.image_text import OCR_SOURCE

COMMIT_EVERY = 16  # photos per transaction ...
COMMIT_EVERY_S = 5.0  # ... or this often, whichever comes first

Outcome = tuple[str | None, list[ReadLine], str | None]  # content hash of the bytes read, lines, error


@dataclass
class OcrSummary:
    read: int = 0
    with_text: int = 0
    failed: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"text: read {self.read} photos ({self.with_text} with text, {self.failed} failed) in {self.seconds:.1f} s"
        )


def pending_ocr(catalog: Catalog) -> list[tuple[int, str, str | None]]:
    """(id, path, content hash) of indexed images the OCR pass has not looked at, in id order."""
    return pending_images(catalog, OCR_SOURCE)


def run_ocr_pass(
    catalog: Catalog, device: Device, workers: int, progress: bool, commit_every: int = COMMIT_EVERY
) -> OcrSummary:
    """Read the text of every pending image (the caller holds the write lock), ``commit_every`` photos a
    transaction. Nothing pending: returns at once, without loading the model."""
    summary = OcrSummary()
    work = pending_ocr(catalog)
    if not work:
        return summary
    require_ocr()
    from tqdm import tqdm

    started = time.perf_counter()
    batch: list[TextResult] = []
    last_commit = time.monotonic()
    try:
        with tqdm(total=len(work), unit="img", disable=not progress, dynamic_ncols=True, desc="reading text") as bar:
            for (image_id, _path, indexed_hash), outcome in zip(work, _outcomes(work, device, workers)):
                batch.append(TextResult(image_id, indexed_hash, *outcome))
                bar.update(1)
                if len(batch) >= commit_every or time.monotonic() - last_commit > COMMIT_EVERY_S:
                    _commit(catalog, batch, summary)
                    batch, last_commit = [], time.monotonic()
            _commit(catalog, batch, summary)
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted while reading text in photos; their vectors and the text read so far are kept: run "
            "`clipsearch index` again to continue"
        ) from None
    summary.seconds = time.perf_counter() - started
    return summary


def _outcomes(work: Sequence[tuple[int, str, str | None]], device: Device, workers: int) -> Iterator[Outcome]:
    paths = [path for _, path, _ in work]
    if workers <= 0:
        _start_reader(device, os.cpu_count() or 1, ignore_ctrl_c=False)
        yield from map(read_photo, paths)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(paths)), initializer=_start_reader, initargs=(device, 1)) as pool:
        yield from pool.imap(read_photo, paths)


_reader: TextReader | None = None  # one per process


def _start_reader(device: Device, threads: int, ignore_ctrl_c: bool = True) -> None:
    global _reader
    if ignore_ctrl_c:  # the main process alone stops the run
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _reader is None:
        _reader = TextReader(device, threads)


def read_photo(path: str) -> Outcome:
    """One file's text: read once, hashed (a file changed since it was encoded is not attributed to its row),
    decoded upright at a bounded size; any failure becomes the recorded reason."""
    digest = None
    try:
        data = read_file(path)
        digest = content_hash(data)
        image, full_size = decode_image_and_size(data, DECODE_MIN_SIDE, reduce=True)
        del data
        return digest, _reader.read(image, full_size), None
    except DecodeError as error:
        return digest, [], str(error)
    except Exception as error:  # noqa: BLE001  (a worker must never die on one file)
        return digest, [], f"cannot read text ({type(error).__name__}: {error})"


def _commit(catalog: Catalog, batch: list[TextResult], summary: OcrSummary) -> None:
    for result in commit_results(catalog, OCR_SOURCE, batch):
        summary.read += 1
        summary.with_text += bool(result.lines)
        summary.failed += result.error is not None
