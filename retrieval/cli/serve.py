"""`clipsearch serve`: the web page and JSON API over one index, with the model kept warm."""

from __future__ import annotations

from typing import Annotated

import typer

from retrieval.cli.app import app, quiet_libraries, resolve_index_dir, user_errors
from retrieval.cli.options import BF16TextOption, DeviceOption, IndexOption

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@app.command()
@user_errors
def serve(
    index_dir: IndexOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    device: DeviceOption = "auto",
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest query image accepted.")] = 20.0,
    bf16_text: BF16TextOption = False,
) -> None:
    """Serve a search page and JSON API (docs at /docs) for an index; the model loads once."""
    quiet_libraries()
    from retrieval.errors import UsageError
    from retrieval.search.server import ServerSettings, run_server

    if max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    if host not in LOOPBACK_HOSTS:
        typer.echo(f"clipsearch: warning: listening on {host}: anyone who can reach it can see your photos", err=True)
    index = resolve_index_dir(index_dir)
    typer.echo(f"clipsearch: loading the model and the index at {index} ...", err=True)
    settings = ServerSettings(device=device, text_bf16=bf16_text, max_upload_bytes=int(max_upload_mb * 2**20))
    run_server(index, host=host, port=port, settings=settings)
