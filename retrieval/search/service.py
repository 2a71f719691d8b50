"""The warm engine every request shares, and the FastAPI dependency that hands it to a route.

Routes ask the service, never ``service.engine.catalog``: what a route may know about the index (a row, the indexed
folders, the generation of the vectors, an opened indexed file, a decoded upload) is a method here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from retrieval.errors import EmptyIndexError, UsageError
from retrieval.model.device import Device
from retrieval.search.duplicate_jobs import DuplicateJobs
from retrieval.search.duplicates import DuplicateGroup, PairsAtLowest
from retrieval.search.engine import SearchEngine
from retrieval.search.file_guard import OpenedFile, open_indexed
from retrieval.search.info import index_info
from retrieval.search.security import LOOPBACK_NAMES
from retrieval.search.thumbnails import ThumbnailCache, cache_dir_for
from retrieval.search.uploads import DecodeBudget
from retrieval.store.catalog import STATUS_OK, ImageRow
from retrieval.store.image_text import CAPTION_SOURCE, ImageText
from retrieval.store.paths import from_display

MAX_IMAGE_ID = 2**63 - 1  # SQLite's largest integer: a larger id can name no image (and must not overflow)
T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """Limits of the HTTP API; the defaults suit a personal photo collection."""

    device: Device | str = "auto"  # a string is resolved once, by SearchEngine
    text_bf16: bool = False  # CPU: text queries through a bfloat16 text tower (see Encoder.load_text_only)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000  # checked from the header, before decoding (retrieval/search/uploads.py)
    max_query_pixels: int = 80_000_000  # all the images of one query together, from their headers
    max_upload_decodes: int = 2  # decodes at once (uploads, thumbnails); more uploads get 503 with Retry-After
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host: names answered (DNS rebinding); see security.py
    token: str | None = None  # asked of every request (credential.py); `serve` always sets one but for --no-token
    max_thumbnail_bytes: int = 128 * 2**20  # larger files get a placeholder thumbnail instead of being read
    max_results: int = 1000  # offset + k of one request: deeper scrolling stops here
    default_k: int = 48


class NoSuchImage(LookupError):
    """No (indexed) image has the id or path a request named (404)."""


class SearchService:
    """The engine all requests share. Queries take turns on one dedicated thread: torch already uses every core,
    and one calling thread keeps one warm OpenMP team instead of a team per web worker thread. Before each query
    a cheap catalog read notices what an indexer committed meanwhile, so new photos appear without a restart."""

    def __init__(self, index_dir: Path, settings: ServerSettings):
        self.settings = settings
        self.engine = SearchEngine(index_dir, device=settings.device, text_bf16=settings.text_bf16)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsearch-query")
        self.decodes = DecodeBudget(settings.max_upload_pixels, settings.max_upload_decodes)  # uploads, thumbnails
        cache_dir = cache_dir_for(self.engine.layout.root, self.engine.catalog.read_only)
        self.thumbnails = ThumbnailCache(cache_dir, self.decodes, settings.max_thumbnail_bytes)
        self._generation = self.engine.catalog.vectors_generation()
        self.duplicate_pairs = PairsAtLowest()  # used on the duplicates thread only, one pass at a time
        self.duplicates = DuplicateJobs(lambda threshold: self.duplicate_pairs.groups(self.engine.catalog, threshold))

    def warm(self, wait: bool = True) -> None:
        """Load the model and the vectors, so the first query is as fast as the rest. ``wait=False``: on the
        query thread, in the background: the page and every route that needs no model answer at once, and a
        query that comes early waits its turn behind the loading (a failure is logged, and each query then says
        it in its own answer)."""
        # The vectors and the text encoder (ONNX when exported: well under a second) on the query thread; the image
        # model (seconds of torch) beside it, so a text query that arrives meanwhile does not wait for it.
        loading = [self._worker.submit(self._warm_text)]
        if wait:
            loading.append(self._worker.submit(self._warm_images))
        else:
            images = Future()
            threading.Thread(target=_run_into, args=(self._warm_images, images), daemon=True).start()
            loading.append(images)
        for step in loading:
            if wait:
                step.result()
            else:
                step.add_done_callback(_log_failure)

    def _warm_text(self) -> None:
        try:
            self.engine.vectors  # noqa: B018
            self.engine.text_encoder.encode_texts(["warm up"])
        except EmptyIndexError:
            pass  # nothing indexed yet: search answers 409 until the indexer has committed

    def _warm_images(self) -> None:
        """The image encoder (uploads and images outside the index need it: the ONNX tower when cached, else the
        torch model); ``Encoder.load`` and ``shared_image_encoder`` build it once even when a query asks for it at
        the same time."""
        with contextlib.suppress(EmptyIndexError):
            self.engine.image_encoder  # noqa: B018

    def query(self, search: Callable[[SearchEngine], T]) -> T:
        """``search(engine)`` on the query thread, after picking up vectors an indexer committed meanwhile."""
        return self._worker.submit(self._query, search).result()

    def _query(self, search: Callable[[SearchEngine], T]) -> T:
        generation = self.engine.catalog.vectors_generation()
        if generation != self._generation:
            self.engine.refresh()
            self._generation = generation
        return search(self.engine)

    def close(self) -> None:
        self.duplicates.close()
        self._worker.shutdown(wait=True)
        self.engine.close()

    # --- what routes may know about the index ---------------------------------------------------------------------

    def row(self, image_id: int) -> ImageRow:
        """The catalog row of an image (indexed or failed), or ``NoSuchImage``."""
        row = self.engine.row(image_id) if 0 <= image_id <= MAX_IMAGE_ID else None
        if row is None:
            raise NoSuchImage(f"no image has id {image_id}")
        return row

    def indexed_row(self, image_id: int) -> ImageRow:
        """The catalog row of an indexed (not failed) image, or ``NoSuchImage``."""
        row = self.engine.row(image_id) if 0 <= image_id <= MAX_IMAGE_ID else None
        if row is None or row.status != STATUS_OK:
            raise NoSuchImage(f"no indexed image has id {image_id}")
        return row

    def text_of(self, row: ImageRow) -> ImageText:
        """The text read in an image (index --ocr), shown with its facts."""
        return self.engine.text_of(row.id)

    def caption_of(self, row: ImageRow) -> str | None:
        """The caption written for an image (index --captions), or None."""
        lines = self.engine.text_of(row.id, CAPTION_SOURCE).lines
        return lines[0]["text"] if lines else None

    def row_by_path(self, path: str) -> ImageRow:
        """A catalog lookup by path (the path never touches the disk), or ``NoSuchImage``."""
        row = self.engine.catalog.row_by_path(from_display(path)) or self.engine.catalog.row_by_path(path)
        if row is None:
            raise NoSuchImage("that path is not in the index")
        return row

    def versions(self, image_ids: Sequence[int]) -> dict[int, int]:
        """Each image's indexed mtime: the version token that lets browsers cache its thumbnails for long."""
        return {image_id: row.mtime_ns for image_id, row in self.engine.catalog.rows_by_id(list(image_ids)).items()}

    def open_file(self, row: ImageRow) -> OpenedFile:
        """The row's file, open, if it is still the file that was indexed (``FileNotServed``, ``FileChanged``)."""
        return open_indexed(row.path, row.size, row.mtime_ns, self.engine.catalog.roots(), row.id)

    def checked_under(self, under: str | None) -> str | None:
        """Accept only a folder inside an indexed one, judged on the text alone (``..`` folded first)."""
        if under is None or not under.strip():
            return None
        folder = os.path.normpath(under.strip())
        if not os.path.isabs(folder):
            raise UsageError("under must be an absolute folder path")
        roots = self.engine.catalog.roots()
        for candidate in dict.fromkeys((from_display(folder), folder)):  # as the API shows paths, then literally
            if any(candidate == root or candidate.startswith(root.rstrip("/") + "/") for root in roots):
                return candidate
        raise UsageError("under must be a folder inside the indexed folders")

    def decode_upload(self, data: bytes):
        """An uploaded query image, decoded within the pixel budget and the decode slots (``UploadTooLarge``,
        ``UploadBusy``); undecodable bytes are a ``UsageError``."""
        from retrieval.images import DecodeError

        image_size = self.engine.identity.image_size if self.engine.identity else None
        try:
            return self.decodes.decode(data, image_size)
        except DecodeError as error:
            raise UsageError(f"cannot use the upload as a query: {error}") from None

    def index_info(self, with_failures: bool) -> dict:
        return index_info(self.engine.layout.root, with_failures, self.engine.device).to_dict()

    def duplicate_groups(self, threshold: float) -> tuple[list[DuplicateGroup], float]:
        """Near-duplicate groups and the milliseconds their pass took, within the cost bound of duplicate_jobs.py
        (off the query thread, one pass at a time, kept per index state and threshold)."""
        return self.duplicates.groups(self.engine.catalog.vectors_generation(), threshold)


def service_of(request: Request) -> SearchService:
    """The dependency every route takes its service from (the one the app was created with)."""
    return request.app.state.service


Service = Annotated[SearchService, Depends(service_of)]


def _log_failure(loading) -> None:
    error = loading.exception()
    if error is not None:
        logging.getLogger("clipsearch").error("loading the model failed: %s", error)


def _run_into(work: Callable[[], None], future: Future) -> None:
    try:
        work()
    except BaseException as error:  # noqa: BLE001  (reported through the future, logged by _log_failure)
        future.set_exception(error)
    else:
        future.set_result(None)
