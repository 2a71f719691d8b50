"""The caption pass: after CLIP encoding, write one caption for every indexed photo no caption pass has looked at,
into the catalog's text store as source "caption" (one more producer, beside OCR: ``indexer.text_pass``).

Search then matches captions through the same full-text index and fusion as the words OCR reads. The pass is
resumable and crash-safe as the OCR pass is (pending = no caption pass row; a batch is one transaction); a photo
that cannot be read is recorded as failed with its reason. With nothing to caption it returns before importing
torch, so a refresh with no change stays torch-free. The decoder is the one trained on the index's own CLIP model
(``FOLDER-cap`` beside ``local-dir:FOLDER``, or the folder given), refused when it was trained on another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from indexer.text_pass import TextResult, commit_results, pending_images
from retrieval.errors import Interrupted
from retrieval.images import DecodeError, content_hash, decode_image, read_file
from retrieval.model.device import Device
from retrieval.model.spec import ModelSpec
from retrieval.store.catalog import Catalog
from retrieval.store.image_text import CAPTION_SOURCE

BATCH = 32  # photos decoded, captioned and committed together


@dataclass(frozen=True)
class CaptionLine:
    """A caption as the text store keeps a line: no confidence or box."""

    text: str
    confidence: float | None = None
    box: list | None = None


@dataclass
class CaptionSummary:
    captioned: int = 0
    failed: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        per = 1000 * self.seconds / max(1, self.captioned + self.failed)
        return f"captions: wrote {self.captioned} ({self.failed} failed) in {self.seconds:.1f} s ({per:.0f} ms a photo)"


def run_caption_pass(
    catalog: Catalog, spec: ModelSpec, folder: Path | None, device: Device, progress: bool, batch_size: int = BATCH
) -> CaptionSummary:
    """Caption every pending image (the caller holds the write lock). Nothing pending: returns at once."""
    summary = CaptionSummary()
    work = pending_images(catalog, CAPTION_SOURCE)
    if not work:
        return summary
    from tqdm import tqdm

    from retrieval.model.caption_writer import open_captioner

    captioner = open_captioner(spec, folder, device)
    started = time.perf_counter()
    try:
        with tqdm(total=len(work), unit="img", disable=not progress, dynamic_ncols=True, desc="captioning") as bar:
            for start in range(0, len(work), batch_size):
                part = work[start : start + batch_size]
                for result in commit_results(catalog, CAPTION_SOURCE, _caption_batch(captioner, part)):
                    summary.captioned += result.error is None
                    summary.failed += result.error is not None
                bar.update(len(part))
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted while writing captions; the vectors and the captions written so far are kept: run "
            "`clipsearch index` again to continue"
        ) from None
    summary.seconds = time.perf_counter() - started
    return summary


def _caption_batch(captioner, part: list[tuple[int, str, str | None]]) -> list[TextResult]:
    """Read, hash and decode each file once; caption the readable ones in one batch."""
    import torch

    results: dict[int, TextResult] = {}
    pixels, readable = [], []
    for image_id, path, indexed_hash in part:
        digest = None
        try:
            data = read_file(path)
            digest = content_hash(data)
            pixels.append(captioner.preprocess(decode_image(data, captioner.image_size)))
            readable.append((image_id, indexed_hash, digest))
        except DecodeError as error:
            results[image_id] = TextResult(image_id, indexed_hash, digest, [], str(error))
    if readable:
        for (image_id, indexed_hash, digest), caption in zip(readable, captioner.captions(torch.stack(pixels))):
            results[image_id] = TextResult(image_id, indexed_hash, digest, [CaptionLine(caption)] if caption else [])
    return [results[image_id] for image_id, _, _ in part]
