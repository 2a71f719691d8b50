"""The one device rule, for encoders and vector search alike: ``auto`` is CUDA when present, else the CPU; an
explicit ``cuda`` on a machine without CUDA is an error, never a silent fall-back."""

from __future__ import annotations

import os
import sys

from retrieval.errors import UsageError


def resolve_device(device: str = "auto") -> str:
    if device == "cpu":
        return "cpu"  # without importing torch: a CPU-only query path need not load it
    if device != "auto" and device != "cuda" and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "auto" and _cuda_impossible():
        return "cpu"  # known without importing torch (over a second): a text query needs well under one
    try:
        import torch
    except ImportError:
        torch = None
    available = torch is not None and torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise UsageError(f"--device {device} was asked for, but CUDA is not available on this machine")
    return device


def is_cuda(device: str) -> bool:
    """Whether a resolved device string names a CUDA device (``cuda`` or ``cuda:N``)."""
    return device == "cuda" or device.startswith("cuda:")


def precision_for(device: str) -> str:
    """open_clip precision for a resolved device: mixed fp16 on CUDA (tensor cores), float32 on the CPU."""
    return "fp16" if is_cuda(device) else "fp32"


def _cuda_impossible() -> bool:
    """No NVIDIA driver (Linux: /proc/driver/nvidia, or WSL's /dev/dxg) or macOS: CUDA cannot be available."""
    if sys.platform == "darwin":
        return True
    if sys.platform.startswith("linux"):
        return not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/dxg"))
    return False
