"""The JSON API's response shapes (they document the API in /openapi.json) and the URLs each image carries."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from retrieval.search.duplicates import DuplicateGroup
from retrieval.search.engine import SearchResult
from retrieval.search.service import SearchService
from retrieval.search.thumbnails import THUMBNAIL_SIZES
from retrieval.store.catalog import ImageRow
from retrieval.store.image_text import ImageText
from retrieval.store.paths import display_path


class ResultOut(BaseModel):
    rank: int
    score: float
    image_id: int
    path: str
    width: int | None
    height: int | None
    taken_at: str | None = None
    thumbnail_url: str
    preview_url: str
    file_url: str
    stage: str = "clip"  # "itm" when the re-ranker produced score (then clip_score is the cosine)
    clip_score: float | None = None
    matched: str = "clip"  # why it is here: "clip" (the picture), "name" (file-name keywords) or "text" (words read)


class SearchOut(BaseModel):
    query: dict[str, Any]
    offset: int
    k: int
    has_more: bool
    took_ms: float
    results: list[ResultOut]


class TextLineOut(BaseModel):
    text: str
    confidence: float | None
    box: list[list[int]] | None  # four corners in upright full-size pixels, clockwise from the top left


class ImageOut(BaseModel):
    image_id: int
    path: str
    width: int | None
    height: int | None
    size: int
    status: str
    error: str | None
    thumbnail_url: str
    preview_url: str
    file_url: str
    text: list[TextLineOut] = []  # the lines read in the photo (index --ocr), in reading order
    text_status: str | None = None  # ok or failed (text_error says why); None: not read (OCR off, or not yet)
    text_error: str | None = None
    caption: str | None = None  # the caption the decoder wrote (index --captions); None: none written


class DuplicateMemberOut(BaseModel):
    image_id: int
    path: str
    width: int | None
    height: int | None
    size: int
    score: float  # cosine similarity to the group's first (kept) file
    pixels: float  # pixel similarity to that file (retrieval.pixel_print): what made it a duplicate
    thumbnail_url: str
    preview_url: str
    file_url: str


class DuplicateGroupOut(BaseModel):
    members: list[DuplicateMemberOut]


class DuplicatesOut(BaseModel):
    threshold: float
    total_groups: int
    took_ms: float
    groups: list[DuplicateGroupOut]


def urls(image_id: int, version: int) -> dict[str, str]:
    """An image's URLs; the version token (the indexed mtime) lets browsers cache its thumbnails for long."""
    base = f"/api/images/{image_id}"
    return {
        "thumbnail_url": f"{base}/thumbnail?v={version}",
        "preview_url": f"{base}/thumbnail?size={THUMBNAIL_SIZES[-1]}&v={version}",
        "file_url": f"{base}/file",
    }


def results_out(service: SearchService, results: list[SearchResult]) -> list[ResultOut]:
    versions = service.versions([r.image_id for r in results])
    return [ResultOut(**r.to_dict(), **urls(r.image_id, versions.get(r.image_id, 0))) for r in results]


def groups_out(service: SearchService, groups: list[DuplicateGroup]) -> list[DuplicateGroupOut]:
    versions = service.versions([m.image_id for g in groups for m in g.members])

    def member(m) -> DuplicateMemberOut:
        return DuplicateMemberOut(**m.to_dict(), **urls(m.image_id, versions.get(m.image_id, 0)))

    return [DuplicateGroupOut(members=[member(m) for m in group.members]) for group in groups]


def image_out(row: ImageRow, text: ImageText | None = None, caption: str | None = None) -> ImageOut:
    read = {"text": text.lines, "text_status": text.status, "text_error": text.error} if text else {}
    return ImageOut(
        image_id=row.id,
        path=display_path(row.path),  # as every answer shows paths; the API accepts this form back
        width=row.width,
        height=row.height,
        size=row.size,
        status=row.status,
        error=None if row.error is None else display_path(row.error),
        **urls(row.id, row.mtime_ns),
        **read,
        caption=caption,
    )
