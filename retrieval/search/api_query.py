"""The JSON form of a combined query (``POST /api/query``), and its translation into the one ``Query`` model.

Images are named by catalog id or sent as base64 bytes, never by a path on the server: the server reads only the
files it indexed. Uploaded bytes are decoded by the caller's ``decode`` (the server's bounded decoder).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

from retrieval.errors import UsageError
from retrieval.search.query import Filters, Query, Term

MAX_TERMS = 16  # per list: each image term may be a decode


class TermIn(BaseModel):
    """Exactly one of ``text``, ``image_id`` (an indexed image) or ``image_data`` (base64 bytes of an image)."""

    text: str | None = Field(None, max_length=1000)
    image_id: int | None = None
    image_data: str | None = None
    weight: float = Field(1.0, gt=0, le=100)


class QueryIn(BaseModel):
    positive: list[TermIn] = Field(min_length=1, max_length=MAX_TERMS)
    negative: list[TermIn] = Field(default_factory=list, max_length=MAX_TERMS)


class FiltersIn(BaseModel):
    under: str | None = Field(None, description="Only results inside this folder (one inside the index).")
    after: str | None = Field(None, description="Taken on or after: YYYY, YYYY-MM, YYYY-MM-DD or 'YYYY-MM-DD HH:MM'.")
    before: str | None = Field(None, description="Taken on or before (the whole day, month or year named).")
    camera: str | None = Field(None, max_length=200, description="Any part of the camera's make and model.")
    min_width: int | None = Field(None, ge=1)
    min_height: int | None = Field(None, ge=1)
    types: list[str] = Field(default_factory=list, max_length=20, description="File types: jpg, png, webp, ...")


class SearchIn(BaseModel):
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
