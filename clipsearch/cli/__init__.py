"""The `clipsearch` command: a thin skin over the library. Each command module registers itself on `app`."""

from clipsearch.cli import caption as caption_commands  # noqa: F401  (registers train-captioner, caption, ask)
from clipsearch.cli import check as check_command  # noqa: F401  (registers check)
from clipsearch.cli import commands  # noqa: F401  (registers index, search, similar, text, info)
from clipsearch.cli import duplicates as duplicates_command  # noqa: F401  (registers duplicates)
from clipsearch.cli import eval as eval_commands  # noqa: F401  (registers eval flickr30k, eval captions)
from clipsearch.cli import export_text as export_text_command  # noqa: F401  (registers export-text)
from clipsearch.cli import forget as forget_command  # noqa: F401  (registers forget)
from clipsearch.cli import itm as itm_command  # noqa: F401  (registers train-itm)
from clipsearch.cli import reindex as reindex_command  # noqa: F401  (registers reindex)
from clipsearch.cli import serve as serve_command  # noqa: F401  (registers serve)
from clipsearch.cli import train as train_command  # noqa: F401  (registers train)
from clipsearch.cli.app import app


def main() -> None:
    import sys

    # Idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE): set when `retrieval` is imported, above, for the
    # library and the command alike (retrieval/__init__.py).
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as their own bytes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    try:
        app()
    finally:
        skip_final_collection()


def skip_final_collection() -> None:
    """The command is done: what it made is about to be freed with the interpreter. Moved out of the collector's
    reach (``gc.freeze``), the objects are still freed and every exit handler still runs, but the collections of
    the interpreter's shutdown no longer walk them: 0.10-0.13 s of each command's exit (a 2-photo `index`, idle
    machine: 0.15 s from the last exit handler to the process's end, 0.04-0.05 s frozen)."""
    import gc

    gc.freeze()
