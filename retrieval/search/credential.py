"""The server's credential: a random token that only its user can read, asked of every request but a bare health
check.

A server on 127.0.0.1 is reachable by every user of the machine, so without a credential any of them reads every
indexed photo, including those in folders only the owner may open. As in Jupyter, ``clipsearch serve`` makes a
fresh token, writes it to a file only its user can read (``token_file``: 0600 in a 0700 folder under
``$XDG_RUNTIME_DIR``, else ``$XDG_STATE_HOME``), and prints the page URL with ``?token=`` in it. The page trades
the token for an HttpOnly, SameSite=Strict cookie and drops it from the address bar; scripts send
``Authorization: Bearer TOKEN``. ``search --server`` and ``ServerClient`` read the token file themselves.
Standard library only (the client imports it); the guard that asks every request is security.require_token.
"""

from __future__ import annotations

import hmac
import os
import secrets
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

TOKEN_ENV = "CLIPSEARCH_TOKEN"  # a token given by hand wins over the token file (a server on another machine)
PAGE_PATHS = ("/", "/duplicates")  # the pages, the only routes that take ``?token=`` (and trade it for a cookie)
BEARER = "bearer "


class TokenRequired(Exception):
    """A request without the server's token (401)."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_dir() -> Path:
    """Where servers leave their tokens: ``$XDG_RUNTIME_DIR/clipsearch`` (a per-user tmpfs), else
    ``$XDG_STATE_HOME/clipsearch`` (``~/.local/state/clipsearch``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "clipsearch"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "clipsearch"


def token_file(port: int) -> Path:
    """The token file of the server on ``port`` (one per port: a client knows the port from the URL)."""
    return token_dir() / f"serve-{port}.token"


def cookie_name(port: int | None) -> str:
    """Cookies are not kept apart by port: two servers on one host each get their own name."""
    return f"clipsearch_token_{port or 0}"


@contextmanager
def published_token(token: str, port: int) -> Iterator[Path]:
    """``token`` in ``token_file(port)`` (0600, folder 0700) while the block runs; removed after."""
    folder = token_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = token_file(port)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(token + "\n")
    os.replace(temporary, path)
    try:
        yield path
    finally:
        with suppress(OSError):
            if path.read_text().strip() == token:  # another server on the same port may have replaced it
                path.unlink()


def page_url(host: str, port: int, token: str | None) -> str:
    """The URL `serve` prints: the page, with the token to trade for a cookie."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def find_token(url: str) -> str | None:
    """The token for a server URL: ``?token=`` in the URL, then ``$CLIPSEARCH_TOKEN``, then the token file of
    the URL's port (a server of this user on this machine); None when there is none."""
    parts = urllib.parse.urlsplit(url)
    given = urllib.parse.parse_qs(parts.query).get("token")
    if given:
        return given[0]
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        return token_file(port).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def same_token(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())
