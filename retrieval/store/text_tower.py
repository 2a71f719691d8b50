"""Which exported text tower the catalog records, and whether it is current: for the model the index records,
with every file as it was checked (``retrieval.model.text_onnx``)."""

from __future__ import annotations

from retrieval.model.text_onnx import TextTowerRecord, files_match
from retrieval.store.catalog import Catalog, MetaKey
from retrieval.store.layout import IndexLayout


def current_text_tower(catalog: Catalog, layout: IndexLayout) -> TextTowerRecord | None:
    """The recorded export when it belongs to the index's model and its files are intact, else None."""
    identity = catalog.model_identity()
    text = catalog.get_meta(MetaKey.TEXT_TOWER)
    if identity is None or not text:
        return None
    try:
        record = TextTowerRecord.from_json(text)
    except (ValueError, TypeError):
        return None
    if record.model_key != identity.key() or not files_match(layout.root / record.folder, record):
        return None
    return record
