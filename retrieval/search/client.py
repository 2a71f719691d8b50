"""Search through a running `clipsearch serve` (``--server URL``): repeated searches skip loading the model.

Standard library only, so the CLI needs no HTTP package. Results come back as the same ``SearchResult`` the
local engine returns, so the CLI prints them the same way. The server's token is found without being asked for
(credential.find_token), and what comes back is checked: at most ``MAX_ANSWER_BYTES``, JSON of the expected shape,
else one line naming the server.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from retrieval.errors import ClipsearchError, UsageError
from retrieval.model.device import Device
from retrieval.search.credential import TOKEN_ENV, find_token, token_dir
from retrieval.search.engine import SearchEngine, SearchResult
from retrieval.search.query import Query, Term
from retrieval.store.paths import catalog_path

MAX_ANSWER_BYTES = 32 * 2**20  # a page of 1000 results is well under 1 MB: a larger answer is not a clipsearch one
RESULT_FIELDS = ("rank", "score", "path", "image_id", "width", "height", "taken_at")
OPTIONAL_FIELDS = ("stage", "clip_score", "matched")  # on re-ranked results only; why it matched


class ServerClient:
    """The search API of one server. Paths of query images and ``under`` folders are resolved here, on the
    client, the way the local engine would resolve them."""

    def __init__(self, url: str, timeout: float = 120.0, token: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--server must be an http:// or https:// URL, not {url!r}")
        self.token = token or find_token(url)
        parts = urllib.parse.urlsplit(url)
        self.base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: no proxy

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def search_text(
        self, text: str, k: int = 10, min_score: float | None = None, under=None, rerank: int | None = None
    ) -> list[SearchResult]:
        if not text.strip():
            raise UsageError("the query text is empty")
        params = {"q": text, **_filters(k, min_score, under)} | ({"rerank": rerank} if rerank else {})
        return self._results(self._request("GET", "/api/search", params))

    def search_image(self, image: Path | str, k: int = 10, min_score: float | None = None, under=None):
        """Like ``SearchEngine.search_image``: an indexed image is searched by its id (and left out of its own
        results); any other file is uploaded."""
        path = Path(image).expanduser()
        if not path.is_file():
            raise UsageError(f"no such image file: {path}")
        params = _filters(k, min_score, under)
        image_id = self.indexed_id(Path(catalog_path(path)))
        if image_id is not None:
            return self._results(self._request("GET", f"/api/similar/{image_id}", params))
        body, content_type = _multipart("image", path.name, path.read_bytes())
        return self._results(self._request("POST", "/api/search/image", params, body, content_type))

    def search(
        self, query: Query, k: int = 10, min_score: float | None = None, rerank: int | None = None
    ) -> list[SearchResult]:
        """Like ``SearchEngine.search``: image files are sent by id when indexed, else as bytes. ``rerank`` goes
        through the text search route, so it takes one text and the folder filter only."""
        if rerank:
            from retrieval.search.rerank import rerank_text

            if query.filters.to_dict().keys() - {"under"} or query.sort != "relevance":
                raise UsageError("--rerank with --server takes a text and --under only")
            return self.search_text(rerank_text(query), k, min_score, query.filters.under, rerank)
        params = _filters(k, min_score, query.filters.under)
        filters = query.filters.to_dict() | ({"under": params["under"]} if "under" in params else {})
        body = {
            "query": {
                "positive": [self._term(term) for term in query.positive],
                "negative": [self._term(term) for term in query.negative],
            },
            "filters": filters,
            "sort": query.sort,
            "keywords": query.keywords,
            "text_match": query.text_match,
            "k": k,
            "min_score": min_score,
        }
        encoded = json.dumps(body).encode()
        return self._results(self._request("POST", "/api/query", {}, encoded, "application/json"))

    def _term(self, term: Term) -> dict:
        if term.text is not None:
            return {"text": term.text, "weight": term.weight}
        if term.image_id is not None:
            return {"image_id": term.image_id, "weight": term.weight}
        if term.picture is not None:
            buffer = io.BytesIO()
            term.picture.save(buffer, format="PNG")
            data = buffer.getvalue()
        else:
            path = Path(term.path).expanduser()
            if not path.is_file():
                raise UsageError(f"no such image file: {path}")
            image_id = self.indexed_id(Path(catalog_path(path)))
            if image_id is not None:
                return {"image_id": image_id, "weight": term.weight}
            data = path.read_bytes()
        return {"image_data": base64.b64encode(data).decode("ascii"), "weight": term.weight}

    def indexed_id(self, path: Path) -> int | None:
        """The id of an indexed (not failed) file, or None."""
        try:
            image = self._request("GET", "/api/images", {"path": str(path)})
        except _NotFound:
            return None
        return int(image["image_id"]) if image.get("status") == "ok" else None

    def _request(self, method: str, route: str, params: dict, body: bytes | None = None, content_type: str = ""):
        url = f"{self.base}{route}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return self._checked_json(response.read(MAX_ANSWER_BYTES + 1))
        except urllib.error.HTTPError as error:
            detail = _detail(error)
            if error.code == 404 and route == "/api/images":
                raise _NotFound(detail) from None
            if error.code == 401:
                where = (
                    "" if self.token else f" (none found in {token_dir()}; pass ?token= in the URL or set {TOKEN_ENV})"
                )
                raise ClipsearchError(f"the server at {self.base} refused the token{where}") from None
            kind = UsageError if error.code in (400, 404, 413, 422) else ClipsearchError
            raise kind(f"{detail} (server {self.base})") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ClipsearchError(f"cannot reach a clipsearch server at {self.base}: {reason}") from None

    def _checked_json(self, data: bytes) -> dict:
        """The answer as a JSON object, or one line saying why it is not a clipsearch answer."""
        if len(data) > MAX_ANSWER_BYTES:
            raise ClipsearchError(
                f"the answer of {self.base} is over {MAX_ANSWER_BYTES // 2**20} MiB: not a clipsearch server"
            )
        try:
            answer = json.loads(data)
        except ValueError:
            raise ClipsearchError(f"the answer of {self.base} is not JSON: is it a clipsearch server?") from None
        if not isinstance(answer, dict):
            raise ClipsearchError(
                f"the answer of {self.base} is not a clipsearch answer (a JSON {type(answer).__name__})"
            )
        return answer

    def _results(self, page: dict) -> list[SearchResult]:
        try:
            return [
                SearchResult(
                    **{name: item.get(name) for name in RESULT_FIELDS},
                    **{n: item[n] for n in OPTIONAL_FIELDS if n in item},
                )
                for item in page["results"]
            ]
        except (KeyError, TypeError, AttributeError):
            raise ClipsearchError(
                f"the answer of {self.base} has no list of results: is it a clipsearch server?"
            ) from None


class _NotFound(Exception):
    pass


def _filters(k: int, min_score: float | None, under) -> dict:
    if k < 1:
        raise UsageError("-k must be at least 1")
    params: dict = {"k": k}
    if min_score is not None:
        params["min_score"] = min_score
    if under is not None:
        params["under"] = str(Path(under).expanduser().resolve())
    return params


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(error.read() or b"{}").get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(str(item.get("msg", item)) for item in detail)
    return str(detail or f"HTTP {error.code} {error.reason}")


def _multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{safe_name}"\r\n'
        f"Content-Type: {media_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def open_searcher(
    index_dir: Path,
    device: Device | str = "auto",
    server: str | None = None,
    text_bf16: bool = False,
    rerank_model: Path | None = None,
    force_rerank: bool = False,
) -> SearchEngine | ServerClient:
    """The local engine, or a running server when ``server`` is given: both answer ``search`` (a ``Query``),
    ``search_text`` and ``search_image`` with the same arguments and results. A server re-ranks with its own."""
    if server and rerank_model is not None:
        raise UsageError("--rerank-model is for a local search: a server re-ranks with the model it was started with")
    if server:
        return ServerClient(server)
    return SearchEngine(
        index_dir, device=device, text_bf16=text_bf16, rerank_model=rerank_model, force_rerank=force_rerank
    )
