"""The local web app and JSON API: one warm SearchService behind FastAPI, plus the static page.

Only indexed files are ever read: requests name images by catalog id, and the path comes from the catalog. The
one path a request may carry, the ``under`` filter, must lie inside an indexed folder before it is used at all.

The routes live in one module per concern (routes_pages, routes_search, routes_images, routes_index) and take the
service through one dependency (service.py). ``create_app`` is the one place where what applies to every request
is attached: the middlewares, the exception -> status table, and ``GUARDS`` (dependencies run before every route).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from retrieval.errors import (
    ClipsearchError,
    EmptyIndexError,
    IndexBusyError,
    ModelLoadError,
    ModelMismatchError,
    UsageError,
)
from retrieval.search import routes_images, routes_index, routes_pages, routes_search
from retrieval.search.api_query import MALFORMED
from retrieval.search.credential import TokenRequired
from retrieval.search.duplicate_jobs import DuplicatesBusy
from retrieval.search.file_guard import FileChanged, FileNotServed
from retrieval.search.routes_pages import STATIC_DIR
from retrieval.search.security import GuardMiddleware, require_token
from retrieval.search.service import NoSuchImage, SearchService, ServerSettings
from retrieval.search.thumbnails import ThumbnailError
from retrieval.search.uploads import RETRY_AFTER_S, UploadBusy, UploadTooLarge, too_large

__all__ = [
    "MULTIPART_SLACK",
    "STATIC_DIR",
    "SearchService",
    "ServerSettings",
    "check_port_free",
    "create_app",
    "run_server",
]

MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around an uploaded file
ROUTERS = (routes_pages.router, routes_search.router, routes_images.router, routes_index.router)
GUARDS: tuple[Depends, ...] = (Depends(require_token),)  # dependencies every route runs first

# The one table from an exception to its HTTP status; the body is always {"detail": the exception's message}.
ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (UsageError, 400),
    (TokenRequired, 401),
    (NoSuchImage, 404),
    (FileNotServed, 404),
    (ThumbnailError, 404),
    (EmptyIndexError, 409),
    (ModelMismatchError, 409),
    (FileChanged, 409),
    (UploadTooLarge, 413),
    (IndexBusyError, 503),
    (ModelLoadError, 503),
    (UploadBusy, 503),
    (DuplicatesBusy, 503),
    (ClipsearchError, 500),  # any other error of ours: its message, not a traceback
)
ERROR_HEADERS: dict[type[Exception], dict[str, str]] = {
    UploadBusy: {"Retry-After": str(RETRY_AFTER_S)},
    DuplicatesBusy: {"Retry-After": str(RETRY_AFTER_S)},
    TokenRequired: {"WWW-Authenticate": "Bearer"},
}


def create_app(
    index_dir: Path | str, settings: ServerSettings | None = None, warm: bool = True, warm_in_background: bool = False
) -> FastAPI:
    """The ASGI app for one index. Opening the index happens here, so a bad index fails before a server starts
    listening; ``warm`` loads the model here too, or (``warm_in_background``) while the server already answers."""
    settings = settings or ServerSettings()
    service = SearchService(Path(index_dir).expanduser(), settings)
    if warm:
        service.warm(wait=not warm_in_background)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        lifespan=lifespan,
        title="clipsearch",
        summary="Search an index of photos by text, by an uploaded image, or by an indexed image.",
        version="1",
        docs_url=None,  # Swagger and ReDoc load from a CDN: the schema stays at /openapi.json, offline
        redoc_url=None,
        openapi_url=None,  # served by routes_pages, behind the token
    )
    app.state.service = service
    app.state.settings = settings
    # base64 images in a POST /api/query body take 4/3 of their size: the body limit leaves room for one
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes * 4 // 3 + MULTIPART_SLACK)
    app.add_middleware(GuardMiddleware, allowed_hosts=settings.allowed_hosts)  # outermost: runs first
    for kind, _status in ERROR_STATUS:
        app.add_exception_handler(kind, _error_response)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in ROUTERS:
        app.include_router(router, dependencies=list(GUARDS))
    app.add_api_route("/api/health", health, include_in_schema=False)  # the one route without the token
    return app


def health() -> dict:
    """Whether the server is up (for a proxy or a supervisor): nothing about the index, so no token."""
    return {"status": "ok"}


def run_server(
    index_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServerSettings | None = None,
    alongside: Callable[[], AbstractContextManager] | None = None,
):
    """Serve until interrupted: the index opens before the port does, the model loads once in the background
    while the page already answers (a query waits for it). ``alongside`` (``serve --watch``: the folder watcher,
    which this read-side module must not import) runs while the server does; new vectors reach queries through
    the generation check."""
    import uvicorn

    check_port_free(host, port)
    app = create_app(index_dir, settings, warm_in_background=True)
    with alongside() if alongside is not None else nullcontext():
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


def check_port_free(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when the port is taken (uvicorn would say so only after)."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UsageError(f"cannot listen on {host!r}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise UsageError(f"cannot listen on {host}:{port} ({error.strerror}): choose another --port") from None


async def _error_response(_request: Request, error: Exception) -> JSONResponse:
    status = next(code for kind, code in ERROR_STATUS if isinstance(error, kind))
    headers = next((extra for kind, extra in ERROR_HEADERS.items() if isinstance(error, kind)), None)
    return JSONResponse({"detail": str(error)}, status_code=status, headers=headers)


async def _invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    """Keys a request body does not know: 400 naming them (a typo in a filter must not widen a search). Values
    that are no value at all (NaN, infinities, integers past 64 bits, text that is not Unicode): 400 naming the
    fields. A missing or empty text: 400. Other invalid values: 422. ``detail`` is always one line for a person;
    ``errors`` keeps FastAPI's list for programs, without echoing the input (a NaN or a lone surrogate in it could
    not be written as JSON)."""
    errors = error.errors()
    unknown = [_field(e) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return JSONResponse({"detail": f"unknown field(s) in the request: {', '.join(unknown)}"}, status_code=400)
    malformed = [f"{_field(e)} {e['msg'][0].lower()}{e['msg'][1:]}" for e in errors if e["type"] in MALFORMED]
    if malformed:
        return JSONResponse({"detail": "; ".join(malformed)}, status_code=400)
    listed = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in errors]
    said = "; ".join(f"{_field(e)}: {e['msg']}" for e in errors[:3])  # one line for a person
    status = 400 if all(e["type"] in ("missing", "string_too_short") for e in errors) else 422  # no or empty text
    return JSONResponse({"detail": said, "errors": listed}, status_code=status)


def _field(error: dict) -> str:
    return ".".join(map(str, error["loc"][1:])) or str(error["loc"][0])


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413: at once when Content-Length says so, and while
    streaming when it does not, so an oversized upload is never spooled to disk whole."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse({"detail": too_large(self.max_bytes)}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large(self.max_bytes))
            return message

        return await self.app(scope, limited_receive, send)
