"""Replace a file so that readers see the old contents or the new, never half: write a temporary file beside it,
then rename over it. ``durable`` also fsyncs the file and its folder, so the new contents survive a power cut."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from retrieval.faults import fault_point


def temp_path(path: Path) -> Path:
    """The temporary name beside ``path`` (per process and thread); ``clipsearch check`` sweeps stray ones."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write(path: Path | str, write: Callable[[BinaryIO], object], durable: bool = True, fault: str = "") -> None:
    """``write(f)`` fills the new file; ``fault`` names a crash-test point between writing and renaming."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
