"""CPU twins of the CUDA encoder: open_clip's mixed precision (``fp16``, ``bf16``) built on the CPU and run through
``Encoder``, so the dtype each tower is fed is checked in CI, not first on a GPU (where fp16 is the default)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from retrieval.errors import UsageError
from retrieval.model.build import build_model, model_identity
from retrieval.model.device import CPU, Device, resolve_device
from retrieval.model.encoder import Encoder, image_input_dtype

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_encoder(spec, precision: str) -> Encoder:
    model, preprocess = build_model(spec, device="cpu", precision=precision)
    return Encoder(model, preprocess, open_clip.get_tokenizer(spec.name), model_identity(spec, model), CPU)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_encoder_encodes_images_and_texts_on_the_cpu(tiny_spec, pixels, precision):
    reference = cpu_encoder(tiny_spec, "fp32")
    half = cpu_encoder(tiny_spec, precision)
    # mixed precision: some parameters stay float32, so "the first parameter's dtype" would feed the wrong one
    assert {p.dtype for p in half.model.parameters()} == {torch.float32, HALF[precision]}
    assert half.dtype == HALF[precision] == half.model.visual.conv1.weight.dtype

    images, expected = half.encode_images(pixels), reference.encode_images(pixels)
    assert images.dtype == np.float32 and images.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)  # normalised in float32
    assert np.all(np.sum(images * expected, axis=1) > 0.98)

    texts = ["a red square", "two blue circles on a white background"]
    got, want = half.encode_texts(texts), reference.encode_texts(texts)
    assert got.dtype == np.float32 and np.all(np.sum(got * want, axis=1) > 0.98)


def test_image_batches_are_cast_to_what_the_tower_computes_in(tiny_spec, pixels):
    encoder = cpu_encoder(tiny_spec, "fp16")
    assert image_input_dtype(encoder.model) == torch.float16
    for given in (torch.float32, torch.float64, torch.bfloat16):  # whatever preprocessing produced
        assert encoder.encode_images(pixels.to(given)).shape == (3, 32)


def test_one_device_rule():
    assert resolve_device("cpu") is CPU and CPU.precision == "fp32" and not CPU.is_cuda
    assert Device("cuda:1").precision == "fp16" and Device("cuda:1").is_cuda
    assert resolve_device("auto").torch_name == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(CPU) is CPU  # a Device passes through: resolved once, at the top
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):  # never a silent fall-back
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_encoder_agrees_with_the_cpu_one(tiny_spec, pixels):
    """On CUDA the encoder runs open_clip's mixed fp16 (the default there): same vectors as float32 on the CPU."""
    texts = ["a red square", "two blue circles"]
    cpu = Encoder.load(tiny_spec, CPU)
    want_images, want_texts = cpu.encode_images(pixels), cpu.encode_texts(texts)
    cuda = Encoder.load(tiny_spec, resolve_device("cuda"))
    assert cuda.dtype == torch.float16
    assert np.all(np.sum(cuda.encode_images(pixels) * want_images, axis=1) > 0.98)
    assert np.all(np.sum(cuda.encode_texts(texts) * want_texts, axis=1) > 0.98)
    Encoder.unload_all()


LAZY_AUTO = """
import sys
import retrieval.model.device as device_module
device_module._cuda_impossible = lambda: False  # as on a machine with an NVIDIA driver
device = device_module.resolve_device("auto")
assert "torch" not in sys.modules, "auto resolved eagerly"
assert device.torch_name in ("cpu", "cuda") and "torch" in sys.modules
print(device.torch_name, device.torch_name is device.torch_name)
"""


def test_auto_asks_torch_only_when_the_answer_is_needed():
    """With a driver present, ``auto`` needs torch to decide; the CLI resolves --device at the top, so the Device
    asks torch the first time ``torch_name`` is read (once), and a refresh with nothing to encode stays torch-free."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", LAZY_AUTO], capture_output=True, text=True, cwd=root, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cuda" if torch.cuda.is_available() else "cpu", "True"]
