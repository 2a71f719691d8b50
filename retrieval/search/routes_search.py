"""Searches: by text, by an indexed image, by an uploaded image, and the combined query (``POST /api/query``).
Each answers one page of results; the query runs on the service's query thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, UploadFile

from retrieval.errors import UsageError
from retrieval.search.api_query import SearchIn, to_query
from retrieval.search.engine import SearchEngine, SearchResult
from retrieval.search.responses import SearchOut, results_out
from retrieval.search.service import SearchService, Service
from retrieval.search.uploads import too_large

router = APIRouter(prefix="/api", tags=["search"])

KQuery = Annotated[int | None, Query(ge=1, description="Results per page (default 48).")]
OffsetQuery = Annotated[int, Query(ge=0, description="Skip this many results (for the next page).")]
MinScoreQuery = Annotated[float | None, Query(ge=-1, le=1, description="Drop results below this cosine score.")]
UnderQuery = Annotated[str | None, Query(description="Only results inside this folder (one inside the index).")]
Search = Callable[[SearchEngine, int, str | None], list[SearchResult]]  # (engine, depth, checked folder) -> results


def page(service: SearchService, query: dict, k: int | None, offset: int, run: Search, under: str | None) -> SearchOut:
    """One page of results: search ``offset + k + 1`` deep (one extra says whether another page exists)."""
    settings = service.settings
    k = k or settings.default_k
    if offset + k > settings.max_results:
        raise UsageError(f"offset + k may be at most {settings.max_results}")
    folder = service.checked_under(under)
    started = time.perf_counter()
    results = service.query(lambda engine: run(engine, offset + k + 1, folder))
    took_ms = (time.perf_counter() - started) * 1000
    shown = results_out(service, results[offset : offset + k])
    more = len(results) > offset + k
    return SearchOut(query=query, offset=offset, k=k, has_more=more, took_ms=took_ms, results=shown)


def decoded_upload(service: SearchService, data: bytes):
    """An uploaded query image within the byte limit, the pixel budget and the decode slots."""
    if len(data) > service.settings.max_upload_bytes:
        raise HTTPException(413, too_large(service.settings.max_upload_bytes))
    return service.decode_upload(data)


@router.get("/search", response_model=SearchOut)
def search_text(
    service: Service,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="What to look for, in words.")],
    k: KQuery = None,
    offset: OffsetQuery = 0,
    min_score: MinScoreQuery = None,
    under: UnderQuery = None,
    rerank: Annotated[
        int | None, Query(ge=1, le=1000, description="Re-rank the dual encoder's top N with the ITM re-ranker.")
    ] = None,
) -> SearchOut:
    """Images matching a text description, best first; with ``rerank`` only the top N, in the re-ranker's
    order (pages end at N)."""

    def run(engine: SearchEngine, depth: int, folder: str | None) -> list[SearchResult]:
        return engine.search_text(q, min(depth, rerank) if rerank else depth, min_score, folder, rerank=rerank)

    return page(service, {"text": q} | ({"rerank": rerank} if rerank else {}), k, offset, run, under)


@router.get("/similar/{image_id}", response_model=SearchOut)
def search_similar(
    service: Service,
    image_id: int,
    k: KQuery = None,
    offset: OffsetQuery = 0,
    min_score: MinScoreQuery = None,
    under: UnderQuery = None,
) -> SearchOut:
    """Images like an indexed image ("more like this"); the image itself is left out."""
    service.indexed_row(image_id)

    def run(engine: SearchEngine, depth: int, folder: str | None) -> list[SearchResult]:
        return engine.search_by_id(image_id, depth, min_score, folder)

    return page(service, {"image_id": image_id}, k, offset, run, under)


@router.post("/search/image", response_model=SearchOut)
def search_upload(
    service: Service,
    image: Annotated[UploadFile, File(description="A JPEG, PNG, WebP, GIF, TIFF or BMP image.")],
    k: KQuery = None,
    offset: OffsetQuery = 0,
    min_score: MinScoreQuery = None,
    under: UnderQuery = None,
) -> SearchOut:
    """Images like an uploaded one. It is decoded with the indexer's protections (size, bombs, EXIF)."""
    picture = decoded_upload(service, image.file.read(service.settings.max_upload_bytes + 1))

    def run(engine: SearchEngine, depth: int, folder: str | None) -> list[SearchResult]:
        return engine.search_image(picture, depth, min_score, folder)

    return page(service, {"upload": image.filename or "image"}, k, offset, run, under)


@router.post("/query", response_model=SearchOut)
def search_query(service: Service, body: SearchIn) -> SearchOut:
    """A combined query: texts and images added (``positive``) or taken away (``negative``), with weights;
    filters on folder, date taken, camera, pixel size and file type; relevance or date order. In date order
    a page is a slice of the best ``max_results`` matches (above ``min_score``), newest first."""
    folder = service.checked_under(body.filters.under)
    query = to_query(body, folder, lambda data: decoded_upload(service, data), service.settings.max_query_pixels)
    depth = service.settings.max_results if query.sort == "date" else None
    rerank = body.rerank

    def run(engine: SearchEngine, wanted: int, _folder: str | None) -> list[SearchResult]:
        wanted = depth or wanted
        if rerank:  # pages end at the re-ranked top N
            return engine.search(query, min(wanted, rerank), body.min_score, rerank=rerank)
        return engine.search(query, wanted, body.min_score)

    return page(service, query.to_dict() | ({"rerank": rerank} if rerank else {}), body.k, body.offset, run, None)
