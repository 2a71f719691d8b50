"""The seam between encoding and writing: sources of encoded chunks, and the one sink that commits them.

As in clip-retrieval's ``Runner`` (reader -> mapper -> writer, with interchangeable distributors), the writer does
not know who encoded its chunks. A source decodes and encodes the work and hands the sink commit-sized chunks of
(work item, outcome, vector or None) in work order; the sink's ``write`` is one catalog transaction per chunk, so
crash safety and resuming are the writer's whichever source ran:

    OverlappedSource (indexer.overlap)   this machine: decode workers, model, encoder and writer thread overlapped
    RaySource (indexer.ray_runner)       a Ray Data job decodes and encodes on a cluster, rows stream back

``indexer.pipeline.encoding_source`` picks one; nothing else in a run differs. A new source is one class with
``run``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from retrieval.images import DecodedItem

if TYPE_CHECKING:
    from indexer.plan import WorkItem
    from retrieval.model.encoder import Encoder

Encoded = tuple["WorkItem", DecodedItem, np.ndarray | None]  # a work item, how decoding went, its vector (None: failed)
Chunk = list[Encoded]  # one catalog transaction's worth, in work order


@dataclass(frozen=True)
class ChunkSink:
    """What a source feeds. ``load`` builds the encoder (the source decides when, and in which thread); ``ready``
    hears the loaded encoder once, before the first chunk; ``write`` commits one chunk, called for one chunk at a
    time, in work order (a Ctrl-C lets the chunk being written finish)."""

    load: Callable[[], Encoder]
    ready: Callable[[Encoder], None]
    write: Callable[[Chunk], None]


class EncodedChunkSource(Protocol):
    def run(self, work: Sequence[WorkItem], sink: ChunkSink, progress: bool) -> float:
        """Decode and encode ``work``, writing every chunk through ``sink``; returns the seconds from a loaded
        model to the last write. A failure anywhere (a source's stage or ``sink.write``) is raised here."""
        ...
