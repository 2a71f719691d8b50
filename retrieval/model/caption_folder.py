"""Where a captioning decoder lives, told without importing torch (an index run checks it before any work, and a
refresh with nothing to caption must stay torch-free)."""

from __future__ import annotations

from pathlib import Path

from retrieval.errors import ModelLoadError, UsageError
from retrieval.model.spec import ModelSpec, folder_beside

CAPTION_CONFIG_FILE = "caption_config.json"
CAPTION_WEIGHTS_FILE = "caption_model.safetensors"
DEFAULT_FOLDER_SUFFIX = "-cap"


def default_caption_folder(model_name: str) -> Path | None:
    """``local-dir:X`` -> ``X-cap`` beside it (where `clipsearch train-captioner` writes by default), else None."""
    return folder_beside(model_name, DEFAULT_FOLDER_SUFFIX)


def caption_folder(spec: ModelSpec, folder: Path | None) -> Path:
    """The decoder folder to use: ``folder`` when given, else ``FOLDER-cap`` beside a ``local-dir:FOLDER`` model."""
    if folder is not None:
        return Path(folder).expanduser()
    beside = default_caption_folder(spec.name)
    if beside is None:
        raise UsageError(
            f"no captioning model for {spec.describe()}: pass --captioner FOLDER "
            "(train one with `clipsearch train-captioner`)"
        )
    return beside


def require_captioner(folder: Path) -> Path:
    """``folder`` if it holds a captioning model's files, else a one-line error saying how to make one."""
    if not (folder / CAPTION_CONFIG_FILE).is_file() or not (folder / CAPTION_WEIGHTS_FILE).is_file():
        raise ModelLoadError(
            f"{folder} is not a captioning model folder (no {CAPTION_CONFIG_FILE} and weights): "
            "train one with `clipsearch train-captioner`"
        )
    return folder
