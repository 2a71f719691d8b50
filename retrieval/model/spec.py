"""What a model spec names, and the identity an index records for it.

The model is part of an index: ``ModelIdentity`` is what the catalog records, so that an index is never queried
with vectors from another model. ``identity_key`` is the one rule for "same vectors": ``ModelIdentity.key`` and
``spec_key`` (the key of a spec before its model is built) both call it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from retrieval.atomic import atomic_write
from retrieval.errors import ModelLoadError

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
DIGEST_CACHE_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: an open_clip name plus a tag or checkpoint path, or a ``local-dir:`` folder."""

    name: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED

    @property
    def local_dir(self) -> Path | None:
        if self.name.startswith(LOCAL_DIR_PREFIX):
            return Path(self.name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        return None

    @property
    def random_weights(self) -> bool:
        """No tag, checkpoint or folder: weights drawn afresh at every load, so no index can be built with them."""
        return self.local_dir is None and not self.pretrained

    @property
    def checkpoint_file(self) -> Path | None:
        """The checkpoint path when ``pretrained`` names a file rather than a tag."""
        if self.local_dir is not None or not self.pretrained:
            return None
        path = Path(self.pretrained).expanduser()
        looks_like_file = path.suffix in {".pt", ".pth", ".bin", ".safetensors"} or os.sep in self.pretrained
        return path if looks_like_file or path.is_file() else None

    def describe(self) -> str:
        if self.local_dir is not None:
            return self.name
        return f"{self.name} ({self.pretrained or 'random weights'})"


def identity_key(name: str, pretrained: str | None, weights_digest: str | None) -> str:
    """Two models with the same key produce the same vectors: weights by content when a file is known."""
    if weights_digest:
        return f"sha256:{weights_digest}"
    return f"{name}/{pretrained or 'random'}"


@dataclass(frozen=True)
class ModelIdentity:
    """What an index records about its model: enough to refuse a different one."""

    name: str
    pretrained: str | None
    weights_digest: str | None
    embed_dim: int
    image_size: int
    preprocess: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return identity_key(self.name, self.pretrained, self.weights_digest)

    def spec(self) -> ModelSpec:
        """The spec that loads this model again."""
        return ModelSpec(self.name, self.pretrained)

    def named_as(self, spec: ModelSpec) -> ModelIdentity:
        """This model as ``spec`` names it (a cached copy of the identity may name the folder it was made from)."""
        name, pretrained = recorded_names(spec)
        return replace(self, name=name, pretrained=pretrained)

    def describe(self) -> str:
        if self.name.startswith(LOCAL_DIR_PREFIX) or self.weights_digest:
            return f"{self.name} [{(self.weights_digest or '')[:12]}]"
        return f"{self.name} ({self.pretrained or 'random weights'})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelIdentity:
        return cls(**json.loads(text))


def recorded_names(spec: ModelSpec) -> tuple[str, str | None]:
    """The (name, pretrained) an index records for a spec: absolute paths, so the index opens from any working
    directory."""
    local, checkpoint = spec.local_dir, spec.checkpoint_file
    name = f"{LOCAL_DIR_PREFIX}{local.resolve()}" if local is not None else spec.name
    return name, str(checkpoint.resolve()) if checkpoint is not None else spec.pretrained


def spec_key(spec: ModelSpec, check: bool = True) -> str:
    """The identity key of a spec without building the model (the same value as ``ModelIdentity.key``).

    ``check=False`` skips ``check_spec``, which imports open_clip (and torch, over a second) for a tag: an index
    whose recorded key matches needs no more proof that the spec loads."""
    if check:
        check_spec(spec)
    weights = weights_path(spec)
    return identity_key(spec.name, spec.pretrained, file_digest(weights) if weights is not None else None)


def folder_beside(model_name: str, suffix: str) -> Path | None:
    """``local-dir:X`` -> ``X<suffix>`` beside it: where a head trained on that CLIP model is found by default
    (the re-ranker ``X-itm``, the captioning decoder ``X-cap``); None for other models."""
    if not model_name.startswith(LOCAL_DIR_PREFIX):
        return None
    folder = Path(model_name[len(LOCAL_DIR_PREFIX) :]).expanduser()
    return folder.with_name(folder.name + suffix)


def weights_path(spec: ModelSpec) -> Path | None:
    """The weights file of a ``local-dir:`` folder or a checkpoint path; None for tags and random weights."""
    local = spec.local_dir
    if local is not None:
        return find_checkpoint_in_dir(local)
    return spec.checkpoint_file


CHECKPOINT_PREFERENCE = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


def find_checkpoint_in_dir(folder: Path) -> Path | None:
    """The file open_clip loads from a ``local-dir:`` folder, by its own preference order (open_clip 3's
    ``factory._find_checkpoint_in_dir``, mirrored and checked against it by a test): importing open_clip here
    would import torch, over a second that an index with nothing to encode does not need."""
    found = [*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.pth")]
    if not found:
        return None
    found.sort()
    found.sort(key=lambda path: path.suffix == ".safetensors", reverse=True)
    preferred = sorted(
        (p for p in found if p.name in CHECKPOINT_PREFERENCE), key=lambda p: CHECKPOINT_PREFERENCE.index(p.name)
    )
    return (preferred or found)[0]


def check_spec(spec: ModelSpec) -> None:
    """Refuse a spec that cannot load, in one line, before anything slow happens."""
    local = spec.local_dir
    if local is not None:
        if not (local / CONFIG_FILE).is_file():
            raise ModelLoadError(f"no {CONFIG_FILE} in model folder {local}")
        return
    import open_clip

    if spec.name.replace("/", "-") not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model {spec.name!r}: use an open_clip model name (see `open_clip.list_models()`) "
            f"or local-dir:FOLDER"
        )
    if spec.pretrained and spec.checkpoint_file is None:
        if not open_clip.get_pretrained_cfg(spec.name, spec.pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
            raise ModelLoadError(
                f"{spec.pretrained!r} is neither a checkpoint file nor a pretrained tag of {spec.name} (tags: {tags})"
            )
    elif spec.checkpoint_file is not None and not spec.checkpoint_file.is_file():
        raise ModelLoadError(f"checkpoint file not found: {spec.checkpoint_file}")


def file_digest(path: Path) -> str:
    """sha256 of a weights file, memoised per (path, size, mtime): opening an index checks it more than once.

    Also remembered across processes (``$XDG_CACHE_HOME/clipsearch/weights-digests.json``, keyed by path, size,
    mtime and inode): hashing 600 MB of ViT-B-32 weights cost every `clipsearch search` about half a second.
    """
    stat = Path(path).stat()
    resolved = str(Path(path).resolve())
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache = _digest_cache_file()
    known = _read_digest_cache(cache)
    if key in known:
        return known[key]
    digest = _file_digest(resolved, stat.st_size, stat.st_mtime_ns)
    if stat.st_size >= DIGEST_CACHE_MIN_BYTES:  # small files hash in milliseconds: not worth an entry
        kept = {k: v for k, v in known.items() if not k.startswith(resolved + "|") and os.path.exists(k.split("|")[0])}
        _write_digest_cache(cache, kept | {key: digest})
    return digest


def _digest_cache_file() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "clipsearch" / "weights-digests.json"


def _read_digest_cache(path: Path) -> dict[str, str]:
    try:
        known = json.loads(path.read_text())
        return {str(k): str(v) for k, v in known.items()} if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_digest_cache(path: Path, known: dict[str, str]) -> None:
    """Best effort: a read-only home only costs the hashing again."""
    text = json.dumps(dict(list(known.items())[-64:])).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(text), durable=False)
    except OSError:
        pass


@lru_cache(maxsize=16)
def _file_digest(path: str, _size: int, _mtime_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
