"""The web pages: the search page and the duplicates page (their scripts and styles are under /static)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).with_name("static")

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/duplicates")
def duplicates_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "duplicates.html", headers={"Cache-Control": "no-cache"})
