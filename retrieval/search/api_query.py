"""The JSON form of a combined query (``POST /api/query``), and its translation into the one ``Query`` model.

Images are named by catalog id or sent as base64 bytes, never by a path on the server: the server reads only the
files it indexed. Uploaded bytes are decoded by the caller's ``decode`` (the server's bounded decoder).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from retrieval.errors import UsageError
from retrieval.search.query import Filters, Query, Term
from retrieval.store.filters import filter_spec

MAX_TERMS = 16  # per list: each image term may be a decode


class Strict(BaseModel):
    """A request shape that refuses keys it does not know (the server answers 400 naming them)."""

    model_config = ConfigDict(extra="forbid")


class TermIn(Strict):
    """Exactly one of ``text``, ``image_id`` (an indexed image) or ``image_data`` (base64 bytes of an image)."""

    text: str | None = Field(None, max_length=1000)
    image_id: int | None = None
    image_data: str | None = None
    weight: float = Field(1.0, gt=0, le=100)


class QueryIn(Strict):
    positive: list[TermIn] = Field(min_length=1, max_length=MAX_TERMS)
    negative: list[TermIn] = Field(default_factory=list, max_length=MAX_TERMS)


def _filters_model() -> type[Strict]:
    """``FiltersIn``, built from the fields of ``Filters`` (the one declaration) with their help and bounds."""
    hints = get_type_hints(Filters)
    declared = {}
    for each in fields(Filters):
        spec = filter_spec(each)
        bounds = {"description": spec.description, "ge": spec.ge, "max_length": spec.max_length}
        if isinstance(each.default, tuple):  # a list in JSON
            declared[each.name] = (list[str], Field(default_factory=list, **bounds))
        else:
            declared[each.name] = (hints[each.name], Field(each.default, **bounds))
    return create_model("FiltersIn", __base__=Strict, **declared)


FiltersIn = _filters_model()


class SearchIn(Strict):
    """A search: what to look for (``query``), which images may come back (``filters``), in which order."""

    query: QueryIn
    filters: FiltersIn = Field(default_factory=FiltersIn)
    sort: Literal["relevance", "date"] = "relevance"
    keywords: bool | None = Field(None, description="Fuse with file-name matches; default: when a text looks like one.")
    k: int | None = Field(None, ge=1, description="Results per page (default 48).")
    offset: int = Field(0, ge=0, description="Skip this many results (for the next page).")
    min_score: float | None = Field(None, ge=-1, le=1, description="Drop results below this cosine score.")
    rerank: int | None = Field(
        None, ge=1, le=1000, description="Re-rank the dual encoder's top N with the ITM re-ranker (one text query)."
    )


def to_query(body: SearchIn, under: str | None, decode: Callable[[bytes], Any]) -> Query:
    """The request as a ``Query``; ``under`` is the caller's checked folder, ``decode`` its bounded decoder
    (it refuses oversized bytes too)."""

    def term(item: TermIn) -> Term:
        if item.image_data is not None:
            try:
                data = base64.b64decode(item.image_data, validate=True)
            except (binascii.Error, ValueError):
                raise UsageError("image_data must be base64") from None
            return Term(picture=decode(data), weight=item.weight)
        return Term(text=item.text, image_id=item.image_id, weight=item.weight)

    filters = Filters.from_dict(body.filters.model_dump() | {"under": under})
    return Query(
        positive=tuple(term(item) for item in body.query.positive),
        negative=tuple(term(item) for item in body.query.negative),
        filters=filters,
        sort=body.sort,
        keywords=body.keywords,
    )
