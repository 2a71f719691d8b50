"""Which model a command uses: the one asked for with ``--model``, else the one the index records.

The model is part of the index (another one is refused), so asking the user to repeat it on every run only adds
a way to fail: ``clipsearch index`` with no ``--model`` refreshes an index built with any model.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.model.spec import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec
from retrieval.store.layout import IndexLayout


def model_for_index(index_dir: Path | None, name: str | None, pretrained: str | None) -> ModelSpec:
    """``--model``/``--pretrained`` when given; else the model recorded in ``index_dir``; else the default."""
    if name is None and pretrained is None and index_dir is not None:
        recorded = recorded_model(index_dir)
        if recorded is not None:
            return recorded
    if name is None:
        name = DEFAULT_MODEL
    if pretrained is None:
        pretrained = DEFAULT_PRETRAINED
    return ModelSpec(name, pretrained or None)


def recorded_model(index_dir: Path) -> ModelSpec | None:
    """The model an existing index was built with; None for a new or empty index."""
    from retrieval.store.catalog import Catalog

    layout = IndexLayout(Path(index_dir).expanduser())
    if not layout.catalog.is_file():
        return None
    catalog = Catalog(layout.catalog, create=False)
    try:
        identity = catalog.model_identity()
    except Exception:  # an unreadable catalog: the indexer says why in its own words
        return None
    finally:
        catalog.close()
    return ModelSpec(identity.name, identity.pretrained) if identity else None
