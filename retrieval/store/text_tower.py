"""Which exported text tower the catalog records, and whether it is current: for the model the index records,
with every file as it was checked (``retrieval.model.text_onnx``)."""

from __future__ import annotations

from retrieval.model.text_onnx import ExportedTower, TextTowerRecord, exported_tower
from retrieval.store.catalog import Catalog, MetaKey
from retrieval.store.layout import IndexLayout


def current_text_tower(catalog: Catalog, layout: IndexLayout) -> TextTowerRecord | None:
    """The recorded export when it belongs to the index's model and its files are intact, else None."""
    tower = recorded_tower(catalog, layout)
    return tower.record if tower.current else None


def recorded_tower(catalog: Catalog, layout: IndexLayout) -> ExportedTower:
    """The catalog's export, current or with the reason it is not used (``retrieval.model.text_onnx``)."""
    identity = catalog.model_identity()
    return exported_tower(layout.root, catalog.get_meta(MetaKey.TEXT_TOWER), identity.key() if identity else None)
