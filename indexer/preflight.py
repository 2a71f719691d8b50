"""What `clipsearch index` can refuse before torch and the model load (seconds on a busy machine): a path that
is not a folder, and a folder with no image files that the index does not know either."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from indexer.scan import image_suffixes, resolve_folder
from retrieval.errors import UsageError
from retrieval.store.layout import IndexLayout


def check_folders(index_dir: Path, paths: Sequence[Path]) -> None:
    """Raise the same one-line errors the run would, only sooner."""
    folders = [resolve_folder(Path(path)) for path in paths]
    empty = [folder for folder in folders if not has_image_files(folder)]
    if not empty:
        return
    known = _known_roots(index_dir)
    for folder in empty:
        if not any(_overlap(folder, root) for root in known):  # a known folder emptied: the run removes its images
            raise UsageError(f"no images found in {folder}")


def has_image_files(folder: str) -> bool:
    """Whether the indexer's walk would find any candidate at all; stops at the first one."""
    suffixes = image_suffixes()
    for _current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not n.startswith(".") and os.path.splitext(n)[1].lower() in suffixes for n in files):
            return True
    return False


def _known_roots(index_dir: Path) -> list[str]:
    layout = IndexLayout(Path(index_dir).expanduser())
    if not layout.catalog.is_file():
        return []
    from retrieval.store.catalog import Catalog

    try:
        catalog = Catalog(layout.catalog, create=False)
    except Exception:  # the run itself reports an unreadable index in its own words
        return []
    try:
        return catalog.roots()
    finally:
        catalog.close()


def _overlap(folder: str, root: str) -> bool:
    return any(a == b or a.startswith(b.rstrip("/") + "/") for a, b in ((folder, root), (root, folder)))
