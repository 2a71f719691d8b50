"""`clipsearch serve`: the web page and JSON API over one index, with the model kept warm."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Annotated

import typer

from clipsearch.cli.app import app, quiet_libraries, user_errors
from clipsearch.cli.options import BF16TextOption, DeviceOption, IndexOption
from retrieval.store.layout import resolve_index_dir

if TYPE_CHECKING:
    from retrieval.model.device import Device

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@app.command()
@user_errors
def serve(
    index_dir: IndexOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    device: DeviceOption = "auto",
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest query image accepted.")] = 20.0,
    max_upload_mp: Annotated[
        float, typer.Option("--max-upload-mp", help="Most megapixels a query image may have (read from its header).")
    ] = 40.0,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Also answer requests for this Host name (repeatable); loopback names and --host always work.",
            show_default=False,
        ),
    ] = None,
    bf16_text: BF16TextOption = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Also index new, changed, moved and deleted photos in the indexed folders."),
    ] = False,
    no_token: Annotated[
        bool,
        typer.Option(
            "--no-token",
            help="Answer without a token (behind your own authenticating proxy): then any user or page that can "
            "reach the port reads every indexed photo.",
        ),
    ] = False,
) -> None:
    """Serve a search page and JSON API (schema at /openapi.json) for an index; the model loads once."""
    quiet_libraries()
    from retrieval.errors import UsageError
    from retrieval.model.device import resolve_device

    device = resolve_device(device)  # once, here: the engine and the watcher take the Device
    if max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    if max_upload_mp <= 0:
        raise UsageError("--max-upload-mp must be positive")
    _require_web_extra()
    from retrieval.search.credential import new_token, page_url, published_token
    from retrieval.search.security import allowed_host_names
    from retrieval.search.server import ServerSettings, check_port_free, run_server

    if host not in LOOPBACK_HOSTS:
        typer.echo(f"clipsearch: warning: listening on {host}: the token crosses the network in clear", err=True)
    index = resolve_index_dir(index_dir)
    typer.echo(f"clipsearch: opening the index at {index} (the model loads in the background) ...", err=True)
    settings = ServerSettings(
        device=device,
        text_bf16=bf16_text,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_upload_pixels=int(max_upload_mp * 1e6),
        allowed_hosts=allowed_host_names(host, allowed_host or ()),
        token=None if no_token else new_token(),
    )
    alongside = _watcher(index, device) if watch else None
    if no_token:
        typer.echo(
            "clipsearch: warning: --no-token: any user or web page that reaches the port reads your photos", err=True
        )
        typer.echo(f"clipsearch: open {page_url(host, port, None)}", err=True)
        run_server(index, host=host, port=port, settings=settings, alongside=alongside)
        return
    check_port_free(host, port)  # before the token file of a server already on that port is replaced
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # `kill` too removes the token file (uvicorn re-raises it)
    with published_token(settings.token, port) as token_path:
        typer.echo(f"clipsearch: open {page_url(host, port, settings.token)}", err=True)
        typer.echo(f"clipsearch: the token is in {token_path} (search --server reads it from there)", err=True)
        run_server(index, host=host, port=port, settings=settings, alongside=alongside)


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def _watcher(index, device: Device):
    """``serve --watch``: the folder watcher on a background thread of the server process (the server itself,
    on the read side, never imports the indexer)."""
    from functools import partial

    from indexer.watch import recorded_settings, watching_in_background

    def on_batch(summary) -> None:
        if summary.added + summary.updated + summary.moved + summary.removed + summary.failed:
            typer.echo(f"clipsearch: watch: {summary.line()}", err=True)

    return partial(
        watching_in_background,
        index,
        recorded_settings(index, device),
        on_batch=on_batch,
        on_error=lambda message: typer.echo(f"clipsearch: watch: {message}", err=True),
    )


def _require_web_extra() -> None:
    """One line naming the extra, instead of a traceback, when the web packages are not installed."""
    from importlib.util import find_spec

    from retrieval.errors import UsageError

    missing = [name for name in ("fastapi", "uvicorn") if find_spec(name) is None]
    if find_spec("python_multipart") is None and find_spec("multipart") is None:
        missing.append("python-multipart")
    if missing:
        raise UsageError(
            f"serve needs the web extra ({', '.join(missing)} missing): pip install 'clipsearch[serve]' "
            f"(in a checkout: .venv/bin/pip install -e '.[serve]')"
        )
