"""Build an open_clip model from a spec: a tag (downloaded on first use), a checkpoint file or a ``local-dir:``
folder; whole, or only its text tower; and write a model folder. open_clip's failures become one-line errors.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from retrieval.errors import ModelLoadError
from retrieval.model.spec import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelIdentity,
    ModelSpec,
    check_spec,
    file_digest,
    recorded_names,
    weights_path,
)


def _needs_quick_gelu(spec: ModelSpec) -> bool:
    """open_clip only warns when a QuickGELU tag (e.g. ``openai``) is loaded into a GELU config; we obey it."""
    import open_clip

    if spec.local_dir is not None or not spec.pretrained or spec.checkpoint_file is not None:
        return False
    return bool(open_clip.get_pretrained_cfg(spec.name, spec.pretrained).get("quick_gelu", False))


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
            f"{_bundled_hint()}"
        )


def _bundled_hint() -> str:
    """In a checkout, the models shipped with it work offline: name one."""
    bundled = Path(__file__).resolve().parents[2] / "data" / "models" / "shapes-clip"
    return f" (this checkout ships one: --model local-dir:{bundled})" if bundled.is_dir() else ""


def build_model(spec: ModelSpec, device: str = "cpu", precision: str = "fp32") -> tuple[Any, Any]:
    """Build the open_clip model and its eval transform, turning open_clip's failures into one-line errors."""
    import open_clip

    check_spec(spec)
    _fail_fast_when_offline(spec)
    pretrained = None if spec.local_dir is not None else spec.pretrained
    weights_follow = weights_path(spec) is not None if spec.local_dir is not None else bool(spec.pretrained)
    try:
        with warnings.catch_warnings(), skip_weight_init() if weights_follow else nullcontext():
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
        raise ModelLoadError(load_failure(spec, error)) from error
    except Exception as error:  # noqa: BLE001  (a missing, corrupt, truncated or foreign file: pickle, asserts, ...)
        raise ModelLoadError(load_failure(spec, error)) from error
    model.eval()
    return model, preprocess


def load_failure(spec: ModelSpec, error: BaseException) -> str:
    """One line for a model that did not load: what was asked for and the first line of why (torch.load and
    open_clip's state-dict checks write paragraphs and tracebacks a user cannot act on)."""
    import pickle

    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error):
        reason = "not a PyTorch or safetensors checkpoint file"
    checkpoint = spec.checkpoint_file
    if checkpoint is not None:
        return f"{checkpoint} is not a {spec.name} checkpoint that open_clip can load ({reason})"
    return f"could not load model {spec.describe()} ({reason})"


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


@contextmanager
def skip_weight_init() -> Iterator[None]:
    """Make ``torch.nn.init`` a no-op while a model is constructed whose every parameter a strict checkpoint load
    then overwrites (open_clip loads full checkpoints with ``strict=True``): the random initialisation of
    ViT-B-32 costs over a second of CPU for nothing on every cold start."""
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, _leave_as_is)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _leave_as_is(tensor, *args, **kwargs):
    return tensor


def quantize_image_tower(model: Any) -> Any:
    """Dynamic int8 Linear layers in the image tower (CPU only, in place): an opt-in that trades a little
    accuracy for speed; docs/benchmarks.md has the measured speed and recall cost."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        model.visual = torch.ao.quantization.quantize_dynamic(model.visual, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def build_text_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """The model with only its text tower in memory, for text queries on the CPU: the image tower is built on
    PyTorch's meta device (no memory, no initialisation) and its weights are never read. Weights are float32 as
    ``build_model`` gives them, also from a file that stores them in fp16 (``assign`` would keep the file's dtype).
    None when this does not apply (not a standard open_clip CLIP, or weights not a plain state dict); the caller
    builds the whole model."""
    import open_clip
    import torch

    check_spec(spec)
    weights = _weights_file(spec)
    if weights is None:
        return None
    pretrained = None if spec.local_dir is not None else spec.pretrained
    silenced = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": true only of the meta image tower
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name, pretrained=pretrained, load_weights=False, device="meta",
                force_quick_gelu=_needs_quick_gelu(spec),
            )  # fmt: skip
    except (RuntimeError, OSError, ValueError, KeyError):
        return None  # build_model reports the problem properly
    finally:
        logging.disable(silenced)
    if type(model) is not open_clip.CLIP or getattr(model, "attn_mask", None) is None:
        return None
    wanted = {key for key in model.state_dict() if not key.startswith("visual.")}
    state = _read_tensors(weights, wanted)
    if state is None or set(state) != wanted:
        return None
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}  # fp16 files
    model.load_state_dict(state, strict=False, assign=True)
    length = model.attn_mask.shape[0]  # a non-persistent buffer: rebuilt as open_clip builds it
    model.attn_mask = torch.full((length, length), float("-inf")).triu_(1)
    model.eval()
    return model, preprocess


def build_image_transform(spec: ModelSpec) -> tuple[Any, dict[str, Any]] | None:
    """The model's eval image transform and its preprocess config, without its weights: the model is built on
    PyTorch's meta device (no memory, no initialisation, ~0.2 s for ViT-B-32), so decoding workers can start
    while the real model loads. None when that fails; the caller then loads the model first."""
    import open_clip
    import torch

    try:
        check_spec(spec)
    except ModelLoadError:
        return None
    pretrained = None if spec.local_dir is not None else spec.pretrained
    overrides = {}
    if pretrained and spec.checkpoint_file is None:  # a tag: its preprocessing, without touching the network
        tag = open_clip.get_pretrained_cfg(spec.name, pretrained)
        keys = ("mean", "std", "interpolation", "resize_mode")
        overrides = {f"image_{key}": tag[key] for key in keys if tag.get(key) is not None}
        pretrained = None
    silenced = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "initialized randomly": true only of this weightless copy
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name, pretrained=pretrained, load_weights=False, device="meta",
                force_quick_gelu=_needs_quick_gelu(spec), **overrides,
            )  # fmt: skip
    except Exception:  # noqa: BLE001  (any failure: the caller loads the model first, which reports it properly)
        return None
    finally:
        logging.disable(silenced)
    return preprocess, dict(getattr(model.visual, "preprocess_cfg", {}) or {})


def _weights_file(spec: ModelSpec) -> Path | None:
    """The checkpoint a spec loads from, without downloading anything."""
    if spec.local_dir is not None or spec.checkpoint_file is not None:
        return weights_path(spec)
    if not spec.pretrained:
        return None
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
    if not cfg or not _weights_cached(cfg):
        return None
    try:
        return Path(open_clip.download_pretrained(cfg))  # a cache hit: returns the local path
    except Exception:  # noqa: BLE001  (any failure: build the whole model the usual way)
        return None


def _read_tensors(path: Path, keys: set[str]) -> dict[str, Any] | None:
    """Only ``keys`` from a checkpoint (safetensors reads just those; torch files are memory-mapped)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                available = set(f.keys())
                return {key: f.get_tensor(key) for key in keys & available}
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001
        return None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        return None
    state = {key.removeprefix("module."): value for key, value in state.items()}
    return {key: value for key, value in state.items() if key in keys}


def model_identity(spec: ModelSpec, model: Any) -> ModelIdentity:
    weights = weights_path(spec)
    image_size = model.visual.image_size
    if isinstance(image_size, (tuple, list)):
        image_size = int(image_size[0])
    name, pretrained = recorded_names(spec)
    return ModelIdentity(
        name=name,
        pretrained=pretrained,
        weights_digest=file_digest(weights) if weights is not None else None,
        embed_dim=int(model.text_projection.shape[1])
        if getattr(model, "text_projection", None) is not None and hasattr(model.text_projection, "shape")
        else int(model.visual.output_dim),
        image_size=int(image_size),
        preprocess=dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
    )


def save_model_dir(model: Any, model_cfg: dict[str, Any], out_dir: Path | str, half: bool = False) -> Path:
    """Write a ``local-dir:`` model folder (config with preprocessing + safetensors weights); ``half`` stores
    floating-point weights as float16 (half the size; open_clip loads them into a float32 model)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    dtype = torch.float16 if half else torch.float32
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_FILE))
    return out
