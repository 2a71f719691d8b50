"""Indexed images by id or path: their facts, thumbnails and original files. Only indexed files are ever read:
the path comes from the catalog, and the file is opened once and checked (retrieval/search/file_guard.py)."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response, StreamingResponse

from retrieval.search.file_guard import content_disposition, stream
from retrieval.search.responses import ImageOut, image_out
from retrieval.search.service import Service
from retrieval.search.thumbnails import THUMBNAIL_SIZES

router = APIRouter(prefix="/api/images", tags=["images"])


@router.get("", response_model=ImageOut)
def image_by_path(
    service: Service, path: Annotated[str, Query(description="The absolute path of an indexed file.")]
) -> ImageOut:
    """Look an indexed file up by its path (a catalog lookup: the path never touches the disk)."""
    row = service.row_by_path(path)
    return image_out(row, service.text_of(row), service.caption_of(row))


@router.get("/{image_id}", response_model=ImageOut)
def image_details(service: Service, image_id: int) -> ImageOut:
    """The facts the catalog holds about one image, the text read in it (index --ocr) and its caption (index
    --captions)."""
    row = service.row(image_id)
    return image_out(row, service.text_of(row), service.caption_of(row))


@router.get("/{image_id}/thumbnail", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def thumbnail(
    service: Service, image_id: int, size: Annotated[int, Query(description=f"One of {THUMBNAIL_SIZES}.")] = 256
) -> Response:
    """An upright JPEG thumbnail (made on first request, then cached in the index folder); a grey placeholder
    (``X-Clipsearch-Placeholder: too-large``) for a file over the server's decode budget."""
    if size not in THUMBNAIL_SIZES:
        raise HTTPException(400, f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
    row = service.indexed_row(image_id)
    opened = service.open_file(row)
    try:
        made = service.thumbnails.get(image_id, opened, row.mtime_ns, size)
    finally:
        opened.close()
    headers = {"Cache-Control": "private, max-age=86400"}
    if made.placeholder:
        headers["X-Clipsearch-Placeholder"] = "too-large"
    return Response(made.data, media_type="image/jpeg", headers=headers)


@router.get("/{image_id}/file", response_class=StreamingResponse)
def original(service: Service, image_id: int):
    """The original file, as it was indexed: 409 when it changed since, 404 when it is gone or now leads
    outside the indexed folders (retrieval/search/file_guard.py)."""
    row = service.indexed_row(image_id)
    opened = service.open_file(row)
    headers = {
        "Content-Length": str(opened.size),
        "Content-Disposition": content_disposition(Path(row.path).name),
        "Cache-Control": "private, max-age=3600",
    }
    media_type = mimetypes.guess_type(row.path)[0] or "application/octet-stream"
    return StreamingResponse(stream(opened), media_type=media_type, headers=headers)
