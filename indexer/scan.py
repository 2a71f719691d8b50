"""Walk folders for image files and compare what is on disk with what the catalog knows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from retrieval.errors import UsageError
from retrieval.file_types import HEIF_SUFFIXES, IMAGE_SUFFIXES


def image_suffixes() -> frozenset[str]:
    """HEIC/HEIF count only when pillow-heif is installed to decode them."""
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return IMAGE_SUFFIXES
    return IMAGE_SUFFIXES | HEIF_SUFFIXES


@dataclass(frozen=True)
class FileFacts:
    """What a cheap ``stat`` tells: enough to skip unchanged files without reading them."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    files: list[FileFacts] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): broken links, no access
    aliases: int = 0  # file links skipped because their target is indexed under its own path


def resolve_folder(path: Path) -> str:
    """An absolute folder path as the catalog stores it, or a clear error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"no such folder: {path}")
    if not path.is_dir():
        raise UsageError(f"not a folder: {path} (clipsearch indexes folders)")
    return str(path.resolve())


def scan_folder(folder: str, roots: Sequence[str] = ()) -> ScanResult:
    """Recursive walk; hidden files and folders are skipped; folder symlinks are not followed (no loops). A file
    symlink whose target the walk of ``folder`` or of one of ``roots`` finds anyway is skipped: the image is
    indexed once, under its real path (a link to a file elsewhere is indexed under the link's name)."""
    result = ScanResult()
    walked = (folder, *roots)
    suffixes = image_suffixes()

    def on_error(error: OSError) -> None:
        result.unreadable.append((str(error.filename), f"cannot read folder: {error.strerror}"))

    for current, dirs, files in os.walk(folder, onerror=on_error):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in suffixes:
                continue
            path = os.path.join(current, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                result.unreadable.append((path, "broken symbolic link"))
                continue
            except OSError as error:
                result.unreadable.append((path, f"cannot stat: {error.strerror}"))
                continue
            if not S_ISREG(stat.st_mode):  # a FIFO or device would block or never end when read
                result.unreadable.append((path, "not a regular file"))
                continue
            if os.path.islink(path) and _found_by_walk(os.path.realpath(path), walked, suffixes):
                result.aliases += 1
                continue
            result.files.append(FileFacts(path, stat.st_size, stat.st_mtime_ns))
    return result


def _found_by_walk(target: str, folders: Sequence[str], suffixes: frozenset[str]) -> bool:
    """Whether a walk of one of ``folders`` lists ``target`` itself (inside, no hidden part, an image suffix)."""
    if os.path.splitext(target)[1].lower() not in suffixes:
        return False
    for folder in folders:
        parts = os.path.relpath(target, folder).split(os.sep)
        if parts[0] not in (".", "..") and not any(part.startswith(".") for part in parts):
            return True
    return False
