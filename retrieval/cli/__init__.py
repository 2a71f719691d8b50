"""The `clipsearch` command: a thin skin over the library. Each command module registers itself on `app`."""

from retrieval.cli import check as check_command  # noqa: F401  (registers check)
from retrieval.cli import commands  # noqa: F401  (registers index, search, similar, info)
from retrieval.cli import duplicates as duplicates_command  # noqa: F401  (registers duplicates)
from retrieval.cli import eval as eval_commands  # noqa: F401  (registers eval flickr30k, eval captions)
from retrieval.cli import export_text as export_text_command  # noqa: F401  (registers export-text)
from retrieval.cli import itm as itm_command  # noqa: F401  (registers train-itm)
from retrieval.cli import reindex as reindex_command  # noqa: F401  (registers reindex)
from retrieval.cli import serve as serve_command  # noqa: F401  (registers serve)
from retrieval.cli import train as train_command  # noqa: F401  (registers train)
from retrieval.cli.app import app


def main() -> None:
    import os
    import sys

    # Idle OpenMP threads sleep instead of spinning: on a busy machine, or beside our own decoding workers, spinning
    # threads steal the cores the work needs (a one-query search was 5-8x slower with 2 spinning threads under
    # load; docs/benchmarks.md). Set before torch loads its OpenMP runtime; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as their own bytes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    app()
