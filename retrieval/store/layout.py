"""Where an index folder keeps its files."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import ClipsearchError, ReadOnlyIndexError, UsageError

CATALOG_FILE = "catalog.sqlite"
VECTORS_FILE = "vectors.faiss"
LOCK_FILE = "write.lock"


def default_index_dir() -> Path:
    """``$XDG_DATA_HOME/clipsearch/index`` (``~/.local/share/clipsearch/index`` when unset)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "clipsearch" / "index"


def resolve_index_dir(index: Path | None) -> Path:
    """``--index`` as given (``~`` expanded), else ``default_index_dir``."""
    return (index or default_index_dir()).expanduser()


@dataclass(frozen=True)
class IndexLayout:
    """The files of one index folder: the catalog is the truth, the FAISS file is derived from it."""

    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / CATALOG_FILE

    @property
    def vectors(self) -> Path:
        return self.root / VECTORS_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    def exists(self) -> bool:
        return self.catalog.is_file()


def unwritable_index_error(root: Path, error: OSError) -> ClipsearchError:
    """One line for an index folder that cannot be written: read-only, or a file in the way of the folder."""
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in [root, *root.parents] if p.exists() and not p.is_dir()), root)
        return UsageError(f"--index {root}: {blocker} is a file, not a folder")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyIndexError(
            f"read-only index: {root} cannot be written ({error.strerror}); searching it still works"
        )
    return ClipsearchError(f"cannot use the index folder {root}: {error.strerror or error}")
