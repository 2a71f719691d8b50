"""Load an open_clip model from a tag, a checkpoint file or a ``local-dir:`` folder, and encode with it.

The model is part of an index: ``ModelIdentity`` is what the catalog records, so that an index is never
queried with vectors from another model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from retrieval.errors import ModelLoadError, UsageError

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

log = logging.getLogger(__name__)


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
        """Two specs with the same key produce the same vectors."""
        if self.weights_digest:
            return f"sha256:{self.weights_digest}"
        return f"{self.name}/{self.pretrained or 'random'}"

    def describe(self) -> str:
        if self.name.startswith(LOCAL_DIR_PREFIX) or self.weights_digest:
            return f"{self.name} [{(self.weights_digest or '')[:12]}]"
        return f"{self.name} ({self.pretrained or 'random weights'})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelIdentity:
        return cls(**json.loads(text))


def file_digest(path: Path) -> str:
    """sha256 of a weights file, memoised per (path, size, mtime): opening an index checks it more than once."""
    stat = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _file_digest(path: str, _size: int, _mtime_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but CUDA is not available on this machine")
    return device


def _weights_path(spec: ModelSpec) -> Path | None:
    local = spec.local_dir
    if local is not None:
        import open_clip.factory as factory

        found = factory._find_checkpoint_in_dir(local)
        return Path(found) if found else None
    return spec.checkpoint_file


def _needs_quick_gelu(spec: ModelSpec) -> bool:
    """open_clip only warns when a QuickGELU tag (e.g. ``openai``) is loaded into a GELU config; we obey it."""
    import open_clip

    if spec.local_dir is not None or not spec.pretrained or spec.checkpoint_file is not None:
        return False
    return bool(open_clip.get_pretrained_cfg(spec.name, spec.pretrained).get("quick_gelu", False))


def _check_spec(spec: ModelSpec) -> None:
    import open_clip

    local = spec.local_dir
    if local is not None:
        if not (local / CONFIG_FILE).is_file():
            raise ModelLoadError(f"no {CONFIG_FILE} in model folder {local}")
        return
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


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _weights_cached(cfg: dict[str, Any]) -> bool:
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _fail_fast_when_offline(spec: ModelSpec) -> None:
    """open_clip retries a dead network for most of a minute; when weights are not cached, probe first."""
    import open_clip

    if spec.local_dir is not None or not spec.pretrained or spec.checkpoint_file is not None:
        return
    cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
    if _weights_cached(cfg):
        return
    host = "huggingface.co" if cfg.get("hf_hub") else urlparse(cfg.get("url", "")).hostname or ""
    if host and not _host_reachable(host):
        raise ModelLoadError(
            f"weights for {spec.describe()} are not cached and {host} cannot be reached (offline?): pass a "
            f"local checkpoint with --pretrained /path/to/open_clip_pytorch_model.bin, or --model local-dir:FOLDER"
        )


def build_model(spec: ModelSpec, device: str = "cpu", precision: str = "fp32") -> tuple[Any, Any]:
    """Build the open_clip model and its eval transform, turning open_clip's failures into one-line errors."""
    import open_clip

    _check_spec(spec)
    _fail_fast_when_offline(spec)
    pretrained = None if spec.local_dir is not None else spec.pretrained
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name,
                pretrained=pretrained,
                device=device,
                precision=precision,
                force_quick_gelu=_needs_quick_gelu(spec),
            )
    except RuntimeError as error:
        if "Failed to download" in str(error) or "download" in str(error).lower():
            raise ModelLoadError(
                f"could not download weights for {spec.describe()} (offline?): pass a local checkpoint with "
                f"--pretrained /path/to/open_clip_pytorch_model.bin, or --model local-dir:FOLDER"
            ) from error
        raise ModelLoadError(f"could not load model {spec.describe()}: {error}") from error
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load model {spec.describe()}: {error}") from error
    model.eval()
    return model, preprocess


def model_identity(spec: ModelSpec, model: Any) -> ModelIdentity:
    weights = _weights_path(spec)
    image_size = model.visual.image_size
    if isinstance(image_size, (tuple, list)):
        image_size = int(image_size[0])
    local, checkpoint = spec.local_dir, spec.checkpoint_file
    return ModelIdentity(  # absolute paths, so the index opens from any working directory
        name=f"{LOCAL_DIR_PREFIX}{local.resolve()}" if local is not None else spec.name,
        pretrained=str(checkpoint.resolve()) if checkpoint is not None else spec.pretrained,
        weights_digest=file_digest(weights) if weights is not None else None,
        embed_dim=int(model.text_projection.shape[1])
        if getattr(model, "text_projection", None) is not None and hasattr(model.text_projection, "shape")
        else int(model.visual.output_dim),
        image_size=int(image_size),
        preprocess=dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
    )


_LOADED: dict[tuple[str, str], Encoder] = {}


class Encoder:
    """A loaded CLIP model with its preprocessing and tokenizer; all outputs are L2-normalised float32."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, identity: ModelIdentity, device: str):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device

    @classmethod
    def load(cls, spec: ModelSpec, device: str = "auto") -> Encoder:
        """One load per process for a given model and device: the indexer, the engine, evaluation and the server
        share it instead of holding two copies (about 1 GB for ViT-B-32)."""
        device = resolve_device(device)
        key = (spec_key(spec), device)
        if key not in _LOADED:
            _LOADED.clear()  # keep at most one model in memory
            _LOADED[key] = cls._build(spec, device)
        return _LOADED[key]

    @classmethod
    def _build(cls, spec: ModelSpec, device: str) -> Encoder:
        import open_clip

        precision = "fp16" if device.startswith("cuda") else "fp32"
        model, preprocess = build_model(spec, device=device, precision=precision)
        tokenizer = open_clip.get_tokenizer(spec.name)
        return cls(model, preprocess, tokenizer, model_identity(spec, model), device)

    @property
    def dim(self) -> int:
        return self.identity.embed_dim

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode a preprocessed batch (N, 3, H, W)."""
        import torch

        with torch.inference_mode():
            pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
            features = self.model.encode_image(pixels, normalize=True)
        return features.float().cpu().numpy()

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        return self.encode_images(torch.stack([self.preprocess(image) for image in images]))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
                chunks.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks)


def save_model_dir(model: Any, model_cfg: dict[str, Any], out_dir: Path | str) -> Path:
    """Write a ``local-dir:`` model folder (config with preprocessing + safetensors weights)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    return out


TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_random_model_dir(out_dir: Path | str, model_cfg: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A seeded random-weight model folder: the offline stand-in for real weights in tests and benchmarks."""
    import open_clip
    import torch

    cfg = json.loads(json.dumps(model_cfg or TINY_MODEL_CFG))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    model.visual.preprocess_cfg = asdict(open_clip.transform.PreprocessCfg(size=cfg["vision_cfg"]["image_size"]))
    return save_model_dir(model, cfg, out_dir)


def spec_key(spec: ModelSpec) -> str:
    """The identity key of a spec without building the model (same value as ``ModelIdentity.key``)."""
    _check_spec(spec)
    weights = _weights_path(spec)
    if weights is not None:
        return f"sha256:{file_digest(weights)}"
    return f"{spec.name}/{spec.pretrained or 'random'}"
