"""The local web app and JSON API: one warm SearchEngine behind FastAPI, plus the static page.

Only indexed files are ever read: requests name images by catalog id, and the path comes from the catalog. The
one path a request may carry, the ``under`` filter, must lie inside an indexed folder before it is used at all.
"""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from retrieval.errors import (
    ClipsearchError,
    EmptyIndexError,
    IndexBusyError,
    ModelLoadError,
    ModelMismatchError,
    UsageError,
)
from retrieval.search.api_query import SearchIn, to_query
from retrieval.search.duplicates import DEFAULT_THRESHOLD, find_duplicates
from retrieval.search.engine import SearchEngine, SearchResult
from retrieval.search.file_guard import (
    FileChanged,
    FileNotServed,
    OpenedFile,
    content_disposition,
    open_indexed,
    stream,
)
from retrieval.search.info import IndexInfo, index_info
from retrieval.search.security import LOOPBACK_NAMES, GuardMiddleware
from retrieval.search.thumbnails import THUMBNAIL_SIZES, ThumbnailCache, ThumbnailError, cache_dir_for
from retrieval.search.uploads import RETRY_AFTER_S, UploadBusy, UploadDecoder, UploadTooLarge
from retrieval.store.catalog import STATUS_OK

STATIC_DIR = Path(__file__).with_name("static")
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around an uploaded file
MAX_IMAGE_ID = 2**63 - 1  # SQLite's largest integer: a larger id can name no image (and must not overflow)


@dataclass(frozen=True)
class ServerSettings:
    """Limits of the HTTP API; the defaults suit a personal photo collection."""

    device: str = "auto"
    text_bf16: bool = False  # CPU: text queries through a bfloat16 text tower (see Encoder.load_text)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000  # checked from the header, before decoding (retrieval/search/uploads.py)
    max_upload_decodes: int = 2  # uploads decoded at once; more get 503 with Retry-After
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host: names answered (DNS rebinding); see security.py
    max_results: int = 1000  # offset + k of one request: deeper scrolling stops here
    default_k: int = 48


# --- response shapes (they document the API in /openapi.json) -------------------------------------------------


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


class SearchOut(BaseModel):
    query: dict[str, Any]
    offset: int
    k: int
    has_more: bool
    took_ms: float
    results: list[ResultOut]


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


class DuplicateMemberOut(BaseModel):
    image_id: int
    path: str
    width: int | None
    height: int | None
    size: int
    score: float  # cosine similarity to the group's first (kept) file
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


# --- the warm engine ------------------------------------------------------------------------------------------


class SearchService:
    """The engine all requests share. Queries take turns on one dedicated thread: torch already uses every core,
    and one calling thread keeps one warm OpenMP team instead of a team per web worker thread. Before each query
    a cheap catalog read notices what an indexer committed meanwhile, so new photos appear without a restart."""

    def __init__(
        self, index_dir: Path, device: str = "auto", text_bf16: bool = False, uploads: UploadDecoder | None = None
    ):
        self.engine = SearchEngine(index_dir, device=device, text_bf16=text_bf16)
        self.thumbnails = ThumbnailCache(cache_dir_for(self.engine.layout.root, self.engine.catalog.read_only))
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsearch-query")
        self.uploads = uploads or UploadDecoder(ServerSettings.max_upload_pixels, ServerSettings.max_upload_decodes)
        self._generation = self.engine.catalog.vectors_generation()

    def warm(self) -> None:
        """Load the model and the vectors now, so the first query is as fast as the rest."""
        self._worker.submit(self._warm).result()

    def _warm(self) -> None:
        try:
            self.engine.vectors  # noqa: B018
            self.engine.encoder.encode_texts(["warm up"])
            self.engine.text_encoder.encode_texts(["warm up"])
        except EmptyIndexError:
            pass  # nothing indexed yet: search answers 409 until the indexer has committed

    def query(self, search: Callable[[SearchEngine], list[SearchResult]]) -> list[SearchResult]:
        return self._worker.submit(self._query, search).result()

    def _query(self, search: Callable[[SearchEngine], list[SearchResult]]) -> list[SearchResult]:
        generation = self.engine.catalog.vectors_generation()
        if generation != self._generation:
            self.engine.refresh()
            self._generation = generation
        return search(self.engine)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self.engine.close()


# --- the app --------------------------------------------------------------------------------------------------

ERROR_STATUS: tuple[tuple[type[ClipsearchError], int], ...] = (
    (UsageError, 400),
    (EmptyIndexError, 409),
    (ModelMismatchError, 409),
    (IndexBusyError, 503),
    (ModelLoadError, 503),
)


def create_app(index_dir: Path | str, settings: ServerSettings | None = None, warm: bool = True) -> FastAPI:
    """The ASGI app for one index. Opening (and with ``warm``, loading the model) happens here, so a bad index or
    model fails before a server starts listening."""
    settings = settings or ServerSettings()
    uploads = UploadDecoder(settings.max_upload_pixels, settings.max_upload_decodes)
    service = SearchService(Path(index_dir).expanduser(), settings.device, settings.text_bf16, uploads)
    if warm:
        service.warm()

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
    )
    app.state.service = service
    app.state.settings = settings
    # base64 images in a POST /api/query body take 4/3 of their size: the body limit leaves room for one
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes * 4 // 3 + MULTIPART_SLACK)
    app.add_middleware(GuardMiddleware, allowed_hosts=settings.allowed_hosts)  # outermost: runs first
    app.add_exception_handler(ClipsearchError, _clipsearch_error)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_page_routes(app)
    _add_search_routes(app, service, settings)
    _add_image_routes(app, service)
    _add_duplicate_routes(app, service)
    return app


def run_server(
    index_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServerSettings | None = None,
    alongside: Callable[[], AbstractContextManager] | None = None,
):
    """Serve until interrupted: the model and the index are loaded once, before the port opens. ``alongside``
    (``serve --watch``: the folder watcher, which this read-side module must not import) runs while the server
    does, started once the model is warm; new vectors reach queries through the generation check."""
    import uvicorn

    _check_port_free(host, port)
    app = create_app(index_dir, settings)
    with alongside() if alongside is not None else nullcontext():
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


def _check_port_free(host: str, port: int) -> None:
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


async def _clipsearch_error(_request: Request, error: ClipsearchError) -> JSONResponse:
    status = next((code for kind, code in ERROR_STATUS if isinstance(error, kind)), 500)
    return JSONResponse({"detail": str(error)}, status_code=status)


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
            response = JSONResponse({"detail": _too_large(self.max_bytes)}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, _too_large(self.max_bytes))
            return message

        return await self.app(scope, limited_receive, send)


def _too_large(max_bytes: int) -> str:
    limit = f"{max_bytes / 2**20:.1f} MiB" if max_bytes >= 2**20 else f"{max_bytes / 1024:.0f} KiB"
    return f"the upload is larger than the limit of {limit}"


def _add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/duplicates", include_in_schema=False)
    def duplicates_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "duplicates.html", headers={"Cache-Control": "no-cache"})


KQuery = Annotated[int | None, Query(ge=1, description="Results per page (default 48).")]
OffsetQuery = Annotated[int, Query(ge=0, description="Skip this many results (for the next page).")]
MinScoreQuery = Annotated[float | None, Query(ge=-1, le=1, description="Drop results below this cosine score.")]
UnderQuery = Annotated[str | None, Query(description="Only results inside this folder (one inside the index).")]


def _add_search_routes(app: FastAPI, service: SearchService, settings: ServerSettings) -> None:
    def page(query: dict, k: int | None, offset: int, run: Callable[[int, str | None], list[SearchResult]], under):
        """One page of results: search ``offset + k + 1`` deep (one extra says whether another page exists)."""
        k = k or settings.default_k
        if offset + k > settings.max_results:
            raise UsageError(f"offset + k may be at most {settings.max_results}")
        folder = _checked_under(service, under)
        started = time.perf_counter()
        results = service.query(lambda engine: run(offset + k + 1, folder))
        took_ms = (time.perf_counter() - started) * 1000
        shown = _results_out(service, results[offset : offset + k])
        return SearchOut(
            query=query, offset=offset, k=k, has_more=len(results) > offset + k, took_ms=took_ms, results=shown
        )

    @app.get("/api/search", response_model=SearchOut, tags=["search"])
    def search_text(
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
        return page(
            {"text": q} | ({"rerank": rerank} if rerank else {}),
            k,
            offset,
            lambda depth, folder: service.engine.search_text(
                q, min(depth, rerank) if rerank else depth, min_score, folder, rerank=rerank
            ),
            under,
        )

    @app.get("/api/similar/{image_id}", response_model=SearchOut, tags=["search"])
    def search_similar(
        image_id: int,
        k: KQuery = None,
        offset: OffsetQuery = 0,
        min_score: MinScoreQuery = None,
        under: UnderQuery = None,
    ) -> SearchOut:
        """Images like an indexed image ("more like this"); the image itself is left out."""
        _indexed_row(service, image_id)
        return page(
            {"image_id": image_id},
            k,
            offset,
            lambda depth, folder: service.engine.search_by_id(image_id, depth, min_score, folder),
            under,
        )

    @app.post("/api/search/image", response_model=SearchOut, tags=["search"])
    def search_upload(
        image: Annotated[UploadFile, File(description="A JPEG, PNG, WebP, GIF, TIFF or BMP image.")],
        k: KQuery = None,
        offset: OffsetQuery = 0,
        min_score: MinScoreQuery = None,
        under: UnderQuery = None,
    ) -> SearchOut:
        """Images like an uploaded one. It is decoded with the indexer's protections (size, bombs, EXIF)."""
        data = image.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, _too_large(settings.max_upload_bytes))
        picture = _decode_upload(service, data)  # pixel cap, reduced decode, bounded concurrency
        return page(
            {"upload": image.filename or "image"},
            k,
            offset,
            lambda depth, folder: service.engine.search_image(picture, depth, min_score, folder),
            under,
        )

    @app.post("/api/query", response_model=SearchOut, tags=["search"])
    def search_query(body: SearchIn) -> SearchOut:
        """A combined query: texts and images added (``positive``) or taken away (``negative``), with weights;
        filters on folder, date taken, camera, pixel size and file type; relevance or date order. In date order
        a page is a slice of the best ``max_results`` matches (above ``min_score``), newest first."""
        folder = _checked_under(service, body.filters.under)

        def decode(data: bytes):
            if len(data) > settings.max_upload_bytes:
                raise HTTPException(413, _too_large(settings.max_upload_bytes))
            return _decode_upload(service, data)

        query = to_query(body, folder, decode)
        k = body.k or settings.default_k
        depth = settings.max_results if query.sort == "date" else None
        rerank = body.rerank

        def run(wanted: int, _folder) -> list[SearchResult]:
            wanted = depth or wanted
            if rerank:  # pages end at the re-ranked top N
                return service.engine.search(query, min(wanted, rerank), body.min_score, rerank=rerank)
            return service.engine.search(query, wanted, body.min_score)

        return page(query.to_dict() | ({"rerank": rerank} if rerank else {}), k, body.offset, run, None)

    @app.get("/api/stats", response_model=IndexInfo, tags=["index"])
    def stats(
        failed: Annotated[bool, Query(description="Also list the files that could not be indexed.")] = False,
    ) -> dict:
        """What is indexed: image and failure counts, model, folders, size, index type and its measured recall."""
        return index_info(service.engine.layout.root, with_failures=failed).to_dict()


def _add_image_routes(app: FastAPI, service: SearchService) -> None:
    @app.get("/api/images", response_model=ImageOut, tags=["images"])
    def image_by_path(path: Annotated[str, Query(description="The absolute path of an indexed file.")]) -> ImageOut:
        """Look an indexed file up by its path (a catalog lookup: the path never touches the disk)."""
        row = service.engine.catalog.row_by_path(path)
        if row is None:
            raise HTTPException(404, "that path is not in the index")
        return _image_out(row)

    @app.get("/api/images/{image_id}", response_model=ImageOut, tags=["images"])
    def image_details(image_id: int) -> ImageOut:
        """The facts the catalog holds about one image."""
        row = service.engine.row(image_id) if 0 <= image_id <= MAX_IMAGE_ID else None
        if row is None:
            raise HTTPException(404, f"no image has id {image_id}")
        return _image_out(row)

    @app.get(
        "/api/images/{image_id}/thumbnail",
        tags=["images"],
        response_class=FileResponse,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    def thumbnail(image_id: int, size: Annotated[int, Query(description=f"One of {THUMBNAIL_SIZES}.")] = 256):
        """An upright JPEG thumbnail (made on first request, then cached in the index folder)."""
        if size not in THUMBNAIL_SIZES:
            raise HTTPException(400, f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        opened = _opened_file(service, _indexed_row(service, image_id))
        try:
            cached = service.thumbnails.get(image_id, opened.real_path, size)
        except ThumbnailError as error:
            raise HTTPException(404, str(error)) from None
        finally:
            opened.close()
        return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/images/{image_id}/file", tags=["images"], response_class=FileResponse)
    def original(image_id: int):
        """The original file, as it was indexed: 409 when it changed since, 404 when it is gone or now leads
        outside the indexed folders (retrieval/search/file_guard.py)."""
        row = _indexed_row(service, image_id)
        opened = _opened_file(service, row)
        headers = {
            "Content-Length": str(opened.size),
            "Content-Disposition": content_disposition(Path(row.path).name),
            "Cache-Control": "private, max-age=3600",
        }
        media_type = mimetypes.guess_type(row.path)[0] or "application/octet-stream"
        return StreamingResponse(stream(opened), media_type=media_type, headers=headers)


def _add_duplicate_routes(app: FastAPI, service: SearchService) -> None:
    cached: dict[tuple[int, float], tuple[list, float]] = {}  # (generation, threshold) -> (groups, took_ms)

    @app.get("/api/duplicates", response_model=DuplicatesOut, tags=["index"])
    def duplicates(
        threshold: Annotated[
            float, Query(gt=0, le=1, description="Cosine similarity at which photos count as near-duplicates.")
        ] = DEFAULT_THRESHOLD,
        limit: Annotated[int, Query(ge=1, le=1000, description="Most groups returned (largest first).")] = 200,
    ) -> DuplicatesOut:
        """Groups of near-identical photos, largest groups first, each with the file to keep (most pixels, then
        most bytes) first. Computed once per index state and threshold (an exact pass over all vectors)."""
        key = (service.engine.catalog.vectors_generation(), round(threshold, 4))
        if key not in cached:
            started = time.perf_counter()
            groups = service.query(lambda engine: find_duplicates(engine.catalog, threshold))
            cached.clear()
            cached[key] = (groups, (time.perf_counter() - started) * 1000)
        groups, took_ms = cached[key]
        shown = groups[:limit]
        rows = service.engine.catalog.rows_by_id([m.image_id for g in shown for m in g.members])
        out = [
            DuplicateGroupOut(
                members=[
                    DuplicateMemberOut(
                        **m.to_dict(), **_urls(m.image_id, rows[m.image_id].mtime_ns if m.image_id in rows else 0)
                    )
                    for m in group.members
                ]
            )
            for group in shown
        ]
        return DuplicatesOut(threshold=threshold, total_groups=len(groups), took_ms=took_ms, groups=out)


# --- helpers --------------------------------------------------------------------------------------------------


def _indexed_row(service: SearchService, image_id: int):
    row = service.engine.row(image_id) if 0 <= image_id <= MAX_IMAGE_ID else None
    if row is None or row.status != STATUS_OK:
        raise HTTPException(404, f"no indexed image has id {image_id}")
    return row


def _opened_file(service: SearchService, row) -> OpenedFile:
    """The row's file, open, if it is still the file that was indexed (see file_guard)."""
    try:
        return open_indexed(row.path, row.size, row.mtime_ns, service.engine.catalog.roots(), row.id)
    except FileNotServed as error:
        raise HTTPException(404, str(error)) from None
    except FileChanged as error:
        raise HTTPException(409, str(error)) from None


def _checked_under(service: SearchService, under: str | None) -> str | None:
    """Accept only a folder inside an indexed one, judged on the text alone (``..`` folded first)."""
    if under is None or not under.strip():
        return None
    folder = os.path.normpath(under.strip())
    if not os.path.isabs(folder):
        raise UsageError("under must be an absolute folder path")
    roots = service.engine.catalog.roots()
    if not any(folder == root or folder.startswith(root.rstrip("/") + "/") for root in roots):
        raise UsageError("under must be a folder inside the indexed folders")
    return folder


def _decode_upload(service: SearchService, data: bytes):
    from retrieval.images import DecodeError

    image_size = service.engine.identity.image_size if service.engine.identity else None
    try:
        return service.uploads.decode(data, image_size)
    except DecodeError as error:
        raise UsageError(f"cannot use the upload as a query: {error}") from None
    except UploadTooLarge as error:
        raise HTTPException(413, str(error)) from None
    except UploadBusy as error:
        raise HTTPException(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def _urls(image_id: int, version: int) -> dict[str, str]:
    base = f"/api/images/{image_id}"
    return {
        "thumbnail_url": f"{base}/thumbnail?v={version}",
        "preview_url": f"{base}/thumbnail?size={THUMBNAIL_SIZES[-1]}&v={version}",
        "file_url": f"{base}/file",
    }


def _results_out(service: SearchService, results: list[SearchResult]) -> list[ResultOut]:
    """Results with their URLs; the version token (the indexed mtime) lets browsers cache thumbnails for long."""
    rows = service.engine.catalog.rows_by_id([r.image_id for r in results])
    return [
        ResultOut(**r.to_dict(), **_urls(r.image_id, rows[r.image_id].mtime_ns if r.image_id in rows else 0))
        for r in results
    ]


def _image_out(row) -> ImageOut:
    return ImageOut(
        image_id=row.id,
        path=row.path,
        width=row.width,
        height=row.height,
        size=row.size,
        status=row.status,
        error=row.error,
        **_urls(row.id, row.mtime_ns),
    )
