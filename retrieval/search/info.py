"""What `clipsearch info` reports about an index folder, and `clipsearch text` about one photo, without loading the
model or the vectors."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retrieval.errors import UsageError
from retrieval.model.device import Device
from retrieval.model.image_onnx import cached_image_tower, choose_image_backend
from retrieval.model.spec import ModelIdentity
from retrieval.model.text_encoder import choose_text_backend
from retrieval.store.catalog import STATUS_FAILED, STATUS_OK, Catalog, MetaKey
from retrieval.store.image_text import ImageText, read_text, text_counts
from retrieval.store.layout import IndexLayout
from retrieval.store.paths import catalog_path, display_path
from retrieval.store.sync import faiss_file_current, recorded_recall, recorded_type, requested_type
from retrieval.store.text_tower import recorded_tower


@dataclass(frozen=True)
class IndexInfo:
    index_dir: str
    model: str | None
    embed_dim: int | None
    images: int
    failed: int
    roots: list[str]
    index_type: str
    size_bytes: int
    vectors_current: bool
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), with failed=True only
    index_type_requested: str = "auto"  # what later `clipsearch index` runs keep in force
    recall_at_10: float | None = None  # approximate types: measured against exact search when built
    recall_queries: int = 0
    recall_query_kind: str | None = None  # "text" (or "image" when the model could not be loaded)
    text_tower: str | None = None  # the exported ONNX text tower's precision when current (None: queries use torch)
    text_queries: str | None = None  # which backend answers text queries on the device asked about, and why
    image_encoding: str | None = None  # which backend `index` encodes images with on that device, and why
    ocr: bool = False  # whether `clipsearch index` reads the text in photos (index --ocr)
    text_read: int = 0  # photos the OCR pass has looked at ...
    with_text: int = 0  # ... found text in ...
    text_failed: int = 0  # ... and could not read

    def to_dict(self) -> dict:
        """JSON-ready: folder and file names that are not valid UTF-8 show their odd bytes as ``\\xNN``."""
        return asdict(self) | {
            "roots": [display_path(root) for root in self.roots],
            "failures": [(display_path(path), reason) for path, reason in self.failures],
        }


def index_info(index_dir: Path, with_failures: bool = False, device: Device | None = None) -> IndexInfo:
    """``device``: also say which backend answers text queries there (``retrieval.model.text_encoder``)."""
    layout = IndexLayout(Path(index_dir).expanduser())
    catalog = Catalog(layout.catalog, create=False)
    try:
        identity = catalog.model_identity()
        failures = [(row.path, row.error or "") for row in catalog.failed_rows()] if with_failures else []
        recall = recorded_recall(catalog)
        tower = recorded_tower(catalog, layout)
        with catalog.session() as session:
            counts = text_counts(session)
        return IndexInfo(
            index_dir=str(layout.root),
            model=identity.describe() if identity else None,
            embed_dim=identity.embed_dim if identity else None,
            images=catalog.count(STATUS_OK),
            failed=catalog.count(STATUS_FAILED),
            roots=catalog.roots(),
            index_type=recorded_type(catalog),
            size_bytes=_size(layout),
            vectors_current=faiss_file_current(catalog, layout),
            failures=failures,
            index_type_requested=requested_type(catalog),
            recall_at_10=recall.recall if recall else None,
            recall_queries=recall.queries if recall else 0,
            recall_query_kind=recall.kind if recall else None,
            text_tower=tower.record.precision if tower.current and tower.record else None,
            text_queries=choose_text_backend(device, tower).line() if device is not None and identity else None,
            image_encoding=_image_encoding(device, identity),
            ocr=catalog.get_meta(MetaKey.OCR) == "on",
            text_read=counts.read,
            with_text=counts.with_text,
            text_failed=counts.failed,
        )
    finally:
        catalog.close()


@dataclass(frozen=True)
class PhotoText:
    """The text read in one indexed photo (``clipsearch text PHOTO``)."""

    path: str
    image_id: int
    text: ImageText

    def to_dict(self) -> dict:
        return {"path": display_path(self.path), "image_id": self.image_id} | asdict(self.text)


def photo_text(index_dir: Path, photo: Path | str) -> PhotoText:
    """What the OCR pass read in ``photo`` (an indexed file, or a link to one)."""
    layout = IndexLayout(Path(index_dir).expanduser())
    catalog = Catalog(layout.catalog, create=False)
    try:
        row = catalog.row_by_path(catalog_path(photo)) or catalog.row_by_path(os.path.realpath(photo))
        if row is None:
            raise UsageError(f"{photo} is not indexed (`clipsearch index` its folder first)")
        with catalog.session() as session:
            return PhotoText(row.path, row.id, read_text(session, row.id))
    finally:
        catalog.close()


def _image_encoding(device: Device | None, identity: ModelIdentity | None) -> str | None:
    if device is None or identity is None:
        return None
    return choose_image_backend(device, cached_image_tower(identity.key())).line()


def _size(layout: IndexLayout) -> int:
    files = [layout.catalog, layout.vectors, Path(f"{layout.catalog}-wal")]
    return sum(os.path.getsize(f) for f in files if os.path.exists(f))
