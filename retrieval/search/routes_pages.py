"""The web pages: the search page and the duplicates page (their scripts and styles are under /static), and the
API's schema. A page opened with ``?token=`` (the URL `clipsearch serve` prints) trades the token for a cookie and
reloads without it, so the token leaves the address bar and the browser history (retrieval/search/credential.py)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from retrieval.search.credential import cookie_name

STATIC_DIR = Path(__file__).with_name("static")

router = APIRouter(include_in_schema=False)


def page_response(request: Request, name: str) -> Response:
    """The page, or (with ``?token=``, already checked by the guard) a cookie and a redirect to the same URL
    without the token."""
    token = request.query_params.get("token")
    if token is None:
        return FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})
    kept = [(key, value) for key, value in request.query_params.multi_items() if key != "token"]
    response = RedirectResponse(request.url.path + (f"?{urlencode(kept)}" if kept else ""), status_code=303)
    response.set_cookie(cookie_name(request.url.port), token, httponly=True, samesite="strict", path="/")
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/")
def page(request: Request) -> Response:
    return page_response(request, "index.html")


@router.get("/duplicates")
def duplicates_page(request: Request) -> Response:
    return page_response(request, "duplicates.html")


@router.get("/openapi.json")
def schema(request: Request) -> dict:
    """The API's OpenAPI schema, behind the token like every other route."""
    return request.app.openapi()
