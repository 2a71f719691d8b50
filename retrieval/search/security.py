"""What every request and response of the server is guarded by: the token (``require_token``, credential.py), the
Host check against DNS rebinding, and headers that keep the page from being framed, sniffed, embedded by other
sites or fed scripts from elsewhere.

A web page the user visits can point its own DNS name at 127.0.0.1 and then read the local server as a same-origin
site. Its requests still carry that name in ``Host:``, so answering only the names the server was bound for
(loopback names, the ``--host`` value, and ``--allowed-host`` additions) closes the hole.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import PlainTextResponse

from retrieval.search.credential import BEARER, PAGE_PATHS, TokenRequired, cookie_name, same_token, token_dir

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),  # no other site may embed a photo, even with a cookie
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
)


def allowed_host_names(bind_host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The names a request may carry in ``Host:`` for a server listening on ``bind_host``. A wildcard bind
    (0.0.0.0, ::) adds this machine's name and addresses, so other devices on the network can use them."""
    names = [*LOOPBACK_NAMES, bind_host, *extra]
    if bind_host in WILDCARD_HOSTS:
        names += _this_machine()
    return tuple(dict.fromkeys(normal_host(name) for name in names if name))


def _this_machine() -> list[str]:
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        addresses = set()
    return [name, socket.getfqdn(), *sorted(addresses)]


def normal_host(value: str) -> str:
    """``Host:`` without its port, brackets or case: ``[::1]:8000`` -> ``::1``, ``LocalHost:80`` -> ``localhost``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value.rstrip(".")


class GuardMiddleware:
    """Answer 400 to a ``Host:`` that is not allowed; add the security headers to every response."""

    def __init__(self, app, allowed_hosts: Iterable[str]):
        self.app = app
        self.allowed = frozenset(normal_host(name) for name in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if normal_host(host) not in self.allowed:
            shown = host[:100].encode("ascii", "backslashreplace").decode()
            response = PlainTextResponse(
                f"Host {shown!r} is not allowed (DNS rebinding protection); "
                f"start the server with --allowed-host NAME to accept it",
                status_code=400,
            )
            return await response(scope, receive, self._with_headers(send))
        return await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return send_with_headers


def request_token(request: Request) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, the page's cookie, or ``?token=`` on a page."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith(BEARER):
        return header[len(BEARER) :].strip()
    if request.url.path in PAGE_PATHS and "token" in request.query_params:
        return request.query_params["token"]
    return request.cookies.get(cookie_name(request.url.port))


def require_token(request: Request) -> None:
    """The guard every route runs first (server.GUARDS): 401 without the server's token; nothing when the
    server was started with ``--no-token``."""
    token = request.app.state.settings.token
    if token is None or same_token(request_token(request), token):
        return
    if request.url.path in PAGE_PATHS:
        raise TokenRequired(
            "this clipsearch server needs its token: open the URL that `clipsearch serve` printed "
            "(it ends in ?token=...)",
        )
    raise TokenRequired(
        "this clipsearch server needs its token: send 'Authorization: Bearer TOKEN' "
        f"(the token is in {token_dir()}/serve-PORT.token)"
    )
