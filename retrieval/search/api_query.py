"""The JSON form of a combined query (``POST /api/query``), and its translation into the one ``Query`` model.

Images are named by catalog id or sent as base64 bytes, never by a path on the server: the server reads only the
files it indexed. Uploaded bytes are decoded by the caller's ``decode`` (the server's bounded decoder).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from retrieval.errors import UsageError
from retrieval.search.query import Filters, Query, Term
from retrieval.store.filters import filter_spec

MAX_TERMS = 16  # per list: each image term may be a decode
INT64 = (-(2**63), 2**63 - 1)  # SQLite's integers: a larger one would overflow deep in a query
MALFORMED = ("finite_number", "int64", "unicode")  # validation errors answered 400: the value is not a value at all


def _int64(value: int) -> int:
    if not INT64[0] <= value <= INT64[1]:
        raise PydanticCustomError("int64", "must fit in 64 bits")
    return value


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("unicode", "is not valid Unicode (a lone surrogate)") from None
    return value


Int64 = Annotated[int, AfterValidator(_int64)]
Text = Annotated[str, AfterValidator(_unicode)]


class Strict(BaseModel):
    """A request shape that refuses keys it does not know (the server answers 400 naming them), and numbers that
    are not finite (NaN, infinities; 400 too)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TermIn(Strict):
    """Exactly one of ``text``, ``image_id`` (an indexed image) or ``image_data`` (base64 bytes of an image)."""

    text: Text | None = Field(None, max_length=1000)
    image_id: Int64 | None = None
    image_data: Text | None = None
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
            declared[each.name] = (list[Text], Field(default_factory=list, **bounds))
        else:
            checked = {str | None: Text | None, int | None: Int64 | None}.get(hints[each.name], hints[each.name])
            declared[each.name] = (checked, Field(each.default, **bounds))
    return create_model("FiltersIn", __base__=Strict, **declared)


FiltersIn = _filters_model()


class SearchIn(Strict):
    """A search: what to look for (``query``), which images may come back (``filters``), in which order."""

    query: QueryIn
    filters: FiltersIn = Field(default_factory=FiltersIn)
    sort: Literal["relevance", "date"] = "relevance"
    keywords: bool | None = Field(None, description="Fuse with file-name matches; default: when a text looks like one.")
    text_match: bool | None = Field(None, description="Fuse with the words read in photos (index --ocr); default: on.")
    k: Int64 | None = Field(None, ge=1, description="Results per page (default 48).")
    offset: Int64 = Field(0, ge=0, description="Skip this many results (for the next page).")
    min_score: float | None = Field(None, ge=-1, le=1, description="Drop results below this cosine score.")
    rerank: int | None = Field(
        None, ge=1, le=1000, description="Re-rank the dual encoder's top N with the ITM re-ranker (one text query)."
    )


def to_query(body: SearchIn, under: str | None, decode: Callable[[bytes], Any], max_pixels: int | None = None) -> Query:
    """The request as a ``Query``; ``under`` is the caller's checked folder, ``decode`` its bounded decoder
    (it refuses oversized bytes too). Cheap refusals come before any decoding: terms that cancel each other
    out, and images with more than ``max_pixels`` together (read from their headers). Identical images are
    decoded once."""
    _refuse_cancelling(body.query)
    uploads: dict[str, bytes] = {}
    for item in (*body.query.positive, *body.query.negative):
        if item.image_data is not None and item.image_data not in uploads:
            try:
                uploads[item.image_data] = base64.b64decode(item.image_data, validate=True)
            except (binascii.Error, ValueError):
                raise UsageError("image_data must be base64") from None
    if max_pixels is not None:
        _refuse_too_many_pixels(uploads.values(), max_pixels)
    pictures = {text: decode(data) for text, data in uploads.items()}

    def term(item: TermIn) -> Term:
        if item.image_data is not None:
            return Term(picture=pictures[item.image_data], weight=item.weight)
        return Term(text=item.text, image_id=item.image_id, weight=item.weight)

    filters = Filters.from_dict(body.filters.model_dump() | {"under": under})
    return Query(
        positive=tuple(term(item) for item in body.query.positive),
        negative=tuple(term(item) for item in body.query.negative),
        filters=filters,
        sort=body.sort,
        keywords=body.keywords,
        text_match=body.text_match,
    )


def _refuse_cancelling(query: QueryIn) -> None:
    """Each term added and taken away with the same weight: the query vector would be zero (engine.py says so
    too, after encoding every term)."""
    net: dict[tuple, float] = {}
    for items, sign in ((query.positive, 1.0), (query.negative, -1.0)):
        for item in items:
            key = (item.text, item.image_id, item.image_data)
            net[key] = net.get(key, 0.0) + sign * item.weight
    if all(abs(weight) < 1e-9 for weight in net.values()):
        raise UsageError("the terms of this query cancel each other out: change a weight or a term")


def _refuse_too_many_pixels(uploads: Iterable[bytes], max_pixels: int) -> None:
    from retrieval.images import DecodeError
    from retrieval.search.uploads import UploadTooLarge, header_size

    total = 0
    for data in uploads:
        try:
            width, height = header_size(data)
        except DecodeError as error:
            raise UsageError(f"cannot use the upload as a query: {error}") from None
        total += width * height
    if total > max_pixels:
        raise UploadTooLarge(
            f"the images of this query have {total / 1e6:.1f} MP together, over the limit of "
            f"{max_pixels / 1e6:g} MP per request: send fewer or smaller images"
        )
