"""What the index holds: its statistics, and the near-duplicate groups among its photos."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from retrieval.search.duplicates import DEFAULT_THRESHOLD
from retrieval.search.info import IndexInfo
from retrieval.search.responses import DuplicatesOut, groups_out
from retrieval.search.service import Service

router = APIRouter(prefix="/api", tags=["index"])


@router.get("/stats", response_model=IndexInfo)
def stats(
    service: Service,
    failed: Annotated[bool, Query(description="Also list the files that could not be indexed.")] = False,
) -> dict:
    """What is indexed: image and failure counts, model, folders, size, index type and its measured recall."""
    return service.index_info(with_failures=failed)


@router.get("/duplicates", response_model=DuplicatesOut)
def duplicates(
    service: Service,
    threshold: Annotated[
        float, Query(gt=0, le=1, description="Cosine similarity at which photos are compared pixel by pixel.")
    ] = DEFAULT_THRESHOLD,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most groups returned (largest first).")] = 200,
) -> DuplicatesOut:
    """Groups of near-identical photos, largest groups first, each with the file to keep (most pixels, then
    most bytes) first. An exact pass over all vectors, kept per index state and threshold; thresholds below
    0.8 are refused (400), and while a pass at another threshold runs the answer is 503 with Retry-After."""
    groups, took_ms = service.duplicate_groups(threshold)
    return DuplicatesOut(
        threshold=threshold, total_groups=len(groups), took_ms=took_ms, groups=groups_out(service, groups[:limit])
    )
