"""The one device rule, for encoders and vector search alike: ``auto`` is CUDA when present, else the CPU; an
explicit ``cuda`` on a machine without CUDA is an error, never a silent fall-back.

``resolve_device`` runs once, at the top (the CLI, or a public entry such as ``SearchEngine`` and ``index_paths``
given a string), and turns ``--device`` into a ``Device``; everything below takes that value and never resolves
again.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cached_property

from retrieval.errors import UsageError


@dataclass(frozen=True)
class Device:
    """A resolved device. Build it with ``resolve_device`` (``CPU`` is the one constant).

    ``auto`` on a machine with an NVIDIA driver is the one case torch must answer: it is asked the first time
    ``torch_name`` (or ``is_cuda``, ``precision``) is read, once per value, so a refresh with nothing to encode still
    never imports torch. Every other case is known when the value is built."""

    requested: str  # "cpu", "cuda", "cuda:N"; "auto" only where torch decides on first use

    @cached_property
    def torch_name(self) -> str:
        """What torch calls it: ``cpu``, ``cuda`` or ``cuda:N``."""
        if self.requested != "auto":
            return self.requested
        return "cuda" if _torch_sees_cuda() else "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.torch_name == "cuda" or self.torch_name.startswith("cuda:")

    @property
    def precision(self) -> str:
        """open_clip precision: mixed fp16 on CUDA (tensor cores), float32 on the CPU."""
        return "fp16" if self.is_cuda else "fp32"

    def __str__(self) -> str:
        return self.torch_name


CPU = Device("cpu")


def resolve_device(device: Device | str = "auto") -> Device:
    """``--device`` (auto, cpu, cuda, cuda:N) as a ``Device``; a ``Device`` is returned as it is."""
    if isinstance(device, Device):
        return device
    if device == "cpu":
        return CPU  # without importing torch: a CPU-only query path need not load it
    if device != "auto" and device != "cuda" and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "auto":
        # no driver: known without importing torch (over a second; a text query needs well under one)
        return CPU if _cuda_impossible() else Device("auto")
    if not _torch_sees_cuda():
        raise UsageError(f"--device {device} was asked for, but CUDA is not available on this machine")
    return Device(device)


def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _cuda_impossible() -> bool:
    """No NVIDIA driver (Linux: /proc/driver/nvidia, or WSL's /dev/dxg) or macOS: CUDA cannot be available."""
    if sys.platform == "darwin":
        return True
    if sys.platform.startswith("linux"):
        return not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/dxg"))
    return False
