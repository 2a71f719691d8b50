"""The `clipsearch` command: a thin skin over the library. Each command module registers itself on `app`."""

from retrieval.cli import commands  # noqa: F401  (registers index, search, similar, info)
from retrieval.cli.app import app


def main() -> None:
    app()
