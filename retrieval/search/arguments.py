"""Checks of query arguments that need no model and no index: run first, so a typo fails in well under a
second instead of after the model has loaded, with a message that says what is wrong with the argument."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from retrieval.errors import UsageError


def check_min_score(min_score: float | None) -> None:
    if min_score is not None and not (math.isfinite(min_score) and -1 <= min_score <= 1):
        raise UsageError(f"--min-score must be between -1 and 1 (a cosine score), not {min_score:g}")


def check_folder(folder: Path | str | None, option: str = "--under") -> None:
    if folder is None:
        return
    path = Path(folder).expanduser()
    if not path.exists():
        raise UsageError(f"no such folder: {path}")
    if not path.is_dir():
        raise UsageError(f"{option} {path}: not a folder")


def check_image_file(image: Path | str) -> Path:
    """A query image must be a readable regular file that Pillow recognises (only its header is read)."""
    path = Path(image).expanduser()
    try:
        facts = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"no such image file: {path}") from None
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    if stat.S_ISDIR(facts.st_mode):
        raise UsageError(f"{path} is a folder, not an image file")
    if not stat.S_ISREG(facts.st_mode):
        raise UsageError(f"{path} is not a regular file (a device, pipe or socket)")
    from PIL import Image

    import retrieval.images  # noqa: F401  (registers HEIC/HEIF when pillow-heif is installed)

    try:
        with Image.open(path):
            pass
    except OSError as error:
        if isinstance(error, Image.UnidentifiedImageError):
            raise UsageError(f"{path} is not an image (unknown or corrupt format)") from None
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except Image.DecompressionBombError:
        pass  # the decoder refuses it with its own message
    return path


def check_query(min_score: float | None = None, under: Path | str | None = None, image: Path | str | None = None):
    """Every check above that applies, in the order a user reads the command line."""
    if image is not None:
        check_image_file(image)
    check_min_score(min_score)
    check_folder(under)
