"""Rebuild the vector index as another type from the catalog's stored embeddings, without running the encoder.

The type asked for (``auto`` or a type) and the memory budget are recorded, so later `clipsearch index` runs keep
them in force: ``auto`` moves to another type when the collection crosses a threshold, and an IVF index is
retrained once the collection has doubled since it was trained. Approximate types are tuned and measured against
exact search on text queries at build time; the recall is recorded for `clipsearch info`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import ClipsearchError, EmptyIndexError
from retrieval.model.device import Device, resolve_device
from retrieval.model.spec import ModelIdentity
from retrieval.store.catalog import STATUS_OK, Catalog
from retrieval.store.index_types import (
    AUTO,
    DEFAULT_TYPE,
    TARGET_RECALL,
    check_index_type,
    choose_index_type,
    default_params,
    kind,
)
from retrieval.store.layout import IndexLayout
from retrieval.store.sync import (
    built_count,
    fetch_vectors,
    record_build,
    record_request,
    recorded_budget,
    recorded_type,
    requested_type,
    save_vectors,
)
from retrieval.store.tuning import RecallReport, exact_top_k, probe_texts, tune
from retrieval.store.vectors import VectorIndex
from retrieval.store.write_lock import write_lock


@dataclass(frozen=True)
class ReindexSummary:
    index_type: str
    previous_type: str
    vectors: int
    seconds: float
    file_bytes: int  # size of the FAISS file, close to its resident memory
    recall: RecallReport | None  # None for exact search
    note: str | None = None  # why the index is not the type asked for

    def line(self) -> str:
        text = (
            f"vectors: {self.previous_type} -> {self.index_type} over {self.vectors} images in {self.seconds:.1f} s "
            f"({self.file_bytes / 1e6:.1f} MB)"
        )
        if self.note:
            return f"{text}; exact search ({self.note})"
        if self.recall is None:
            return text + "; exact search"
        return text + (
            f"; recall@10 {self.recall.recall:.3f} against exact search on {self.recall.queries} "
            f"{self.recall.kind} queries (search effort {self.recall.effort})"
        )


def reindex(
    index_dir: Path,
    index_type: str = AUTO,
    max_memory: int | None = None,
    device: Device | str = "auto",
    wait: bool = True,
) -> ReindexSummary:
    """Rebuild as ``index_type`` (``auto``: chosen from size and ``max_memory``) and keep that choice in force.
    ``device`` (where text probes are encoded): a string is resolved here, the public entry."""
    device = resolve_device(device)
    layout = IndexLayout(Path(index_dir).expanduser())
    check_index_type(index_type)
    if not layout.exists():
        raise EmptyIndexError(f"no index at {layout.root}: run `clipsearch index FOLDER` first")
    with write_lock(layout, wait):
        catalog = Catalog(layout.catalog, create=False)
        try:
            record_request(catalog, index_type, max_memory)
            identity = _identity(catalog, layout)
            return rebuild_as(catalog, layout, planned_type(catalog, identity.embed_dim), device)
        finally:
            catalog.close()


def apply_index_type(
    catalog: Catalog, layout: IndexLayout, index_type: str | None, max_memory: int | None, device: Device
) -> ReindexSummary | None:
    """After an index run, with the write lock held: rebuild when the type in force calls for another type, or
    when an IVF index has doubled since it was trained. None when nothing needed doing."""
    if index_type is not None:
        check_index_type(index_type)
    record_request(catalog, index_type, max_memory)
    identity = catalog.model_identity()
    count = catalog.count(STATUS_OK)
    if identity is None or count == 0:
        return None
    wanted = planned_type(catalog, identity.embed_dim)
    current = recorded_type(catalog)
    built = built_count(catalog)
    outgrown = kind(current).trains and count > 2 * max(built, 1)
    if wanted == current and not outgrown:
        return None
    return rebuild_as(catalog, layout, wanted, device)


def builds_at_end(catalog: Catalog, incoming: int, index_type: str | None, max_memory: int | None) -> bool:
    """Whether a run about to encode ``incoming`` files should leave the vector index alone and build it from the
    stored embeddings once they are committed: when the type in force after the run will differ from the type held
    now. A first run of 100M images under auto would otherwise grow an exact index of ~100 GB only to replace it;
    the build at the end streams the catalog (``VectorIndex.build``), so memory stays the final index's own plus a
    training sample."""
    identity = catalog.model_identity()
    if identity is None:  # no model recorded yet: asked again once the encoder is loaded
        return False
    requested = index_type or requested_type(catalog)
    budget = recorded_budget(catalog) if max_memory is None else max_memory
    count = catalog.count(STATUS_OK) + incoming
    current = recorded_type(catalog)
    wanted = requested if requested != AUTO else choose_index_type(count, identity.embed_dim, budget, current)
    return wanted != current


def planned_type(catalog: Catalog, dim: int) -> str:
    """The type in force: the one asked for, or auto's pick for today's size and the recorded budget."""
    requested = requested_type(catalog)
    if requested != AUTO:
        return requested
    return choose_index_type(catalog.count(STATUS_OK), dim, recorded_budget(catalog), recorded_type(catalog))


def rebuild_as(
    catalog: Catalog,
    layout: IndexLayout,
    index_type: str,
    device: Device,
    probes: tuple[np.ndarray, str] | None = None,
) -> ReindexSummary:
    """Build ``index_type`` from stored embeddings, tune and measure it, save it, then record it (write lock held).
    ``probes``: (query vectors, their kind) to tune with instead of the model's own text probes (a benchmark's
    synthetic catalog has no model to encode them)."""
    started = time.perf_counter()
    identity = _identity(catalog, layout)
    previous = recorded_type(catalog)
    count, generation, dim = catalog.count(STATUS_OK), catalog.vectors_generation(), identity.embed_dim
    params = default_params(index_type, count, dim)
    index, report, note = VectorIndex.build(dim, catalog.iter_embeddings(), index_type, params), None, None
    if not index.kind.exact:
        queries, probe_kind = probes or probe_queries(catalog, identity, device)
        exact = exact_top_k(catalog.iter_embeddings(), queries)
        index, report = _tuned(catalog, index, params, queries, exact, probe_kind)
        if report.recall < TARGET_RECALL:  # the promise cannot be kept: exact search, and the user is told
            note = (
                f"{index_type} reached recall@10 {report.recall:.3f} < {TARGET_RECALL} even at its densest build: "
                f"the index stays exact (flat); `clipsearch reindex --index-type {index_type}` tries again"
            )
            index_type, report = DEFAULT_TYPE, None
            index = VectorIndex.build(
                dim, catalog.iter_embeddings(), index_type, default_params(index_type, count, dim)
            )
            record_request(catalog, index_type, None)
    save_vectors(catalog, layout, index, generation)  # the file first: meta never names a type the file lacks
    record_build(catalog, index, count, report)
    return ReindexSummary(
        index_type, previous, count, time.perf_counter() - started, layout.vectors.stat().st_size, report, note
    )


def _tuned(catalog: Catalog, index: VectorIndex, params, queries: np.ndarray, exact: np.ndarray, probe_kind: str):
    """Tune the effort; where that falls short of the target recall, rebuild denser (the kind's own stronger
    knobs) and tune again, until the target is met or the kind has no stronger build. The best try is returned."""
    best = None
    while True:
        index.rescore_source = lambda ids: fetch_vectors(catalog, ids)
        report = tune(index, queries, exact, probe_kind)
        if best is None or report.recall > best[1].recall:
            best = (index, report)
        params = index.kind.strengthened(params)
        if report.recall >= TARGET_RECALL or params is None:
            return best
        index = VectorIndex.build(index.dim, catalog.iter_embeddings(), index.kind.name, params)


def probe_queries(catalog: Catalog, identity: ModelIdentity, device: Device) -> tuple[np.ndarray, str]:
    """Text probes encoded with the index's own model; stored image vectors when the model cannot be loaded."""
    from retrieval.model.encoder import Encoder

    try:
        encoder = Encoder.load(identity.spec(), device)
        return encoder.encode_texts(probe_texts()), "text"
    except ClipsearchError:
        ids, vectors = next(iter(catalog.iter_embeddings()))
        pick = np.linspace(0, len(ids) - 1, num=min(len(ids), len(probe_texts()))).astype(int)
        return vectors[pick], "image"


def _identity(catalog: Catalog, layout: IndexLayout) -> ModelIdentity:
    identity = catalog.model_identity()
    if identity is None or catalog.count(STATUS_OK) == 0:
        raise EmptyIndexError(f"no images are indexed in {layout.root} yet")
    return identity
