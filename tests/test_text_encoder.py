"""Which backend answers text queries, and why (``retrieval.model.text_encoder``): the chooser's decisions, the
fall-back when an export does not open, and the text-only loader's float32 weights from an fp16 checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.model.build import build_text_model, save_model_dir
from retrieval.model.device import CPU, Device
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.model.text_encoder import (
    LOADED,
    ONNX,
    TEXT_BF16,
    TEXT_TOWER,
    WHOLE,
    TextEncoder,
    choose_text_backend,
    open_text_encoder,
)
from retrieval.model.text_onnx import ExportedTower, TextTowerRecord, exported_tower
from retrieval.testing import TINY_MODEL_CFG

TEXTS = ["a dog on the beach", "a red car at night", ""]
RECORD = TextTowerRecord(folder="text-tower-x", model_key="key", precision="int8", digest="d")
CURRENT = ExportedTower(None, RECORD, None)
MISSING = ExportedTower(None, None, "no exported tower")


@pytest.fixture
def fresh_encoders():
    Encoder.unload_all()
    yield
    Encoder.unload_all()


def test_the_chooser_decides_and_says_why(tmp_path):
    cuda = Device("cuda")  # a value, as the CLI hands it down; nothing here touches a GPU
    assert choose_text_backend(CPU, CURRENT).backend == ONNX
    assert choose_text_backend(CPU, CURRENT).line() == "ONNX int8 text tower (exported, current)"
    none = choose_text_backend(CPU, exported_tower(tmp_path, None, "key"))
    assert none.backend == TEXT_TOWER
    assert none.line() == "torch text tower (no exported tower: run clipsearch export-text)"
    foreign = exported_tower(tmp_path, json.dumps(json.loads(RECORD.to_json()) | {"model_key": "other"}), "key")
    assert "another model" in choose_text_backend(CPU, foreign).reason
    assert choose_text_backend(CPU, CURRENT, bf16=True).backend == TEXT_BF16  # asked for: beats the export
    assert choose_text_backend(CPU, CURRENT, model_loaded=True).backend == LOADED  # image queries loaded it
    on_cuda = choose_text_backend(cuda, CURRENT)
    assert on_cuda.backend == WHOLE and "CPU only" in on_cuda.reason
    assert choose_text_backend(cuda, MISSING, bf16=True).backend == WHOLE  # bf16 is a CPU option


def test_an_export_that_does_not_open_falls_back_to_the_torch_text_tower(tmp_path, tiny_spec, fresh_encoders):
    broken = ExportedTower(tmp_path, RECORD, None)  # "current", but there is no graph to open
    encoder, choice = open_text_encoder(tiny_spec, CPU, broken)
    assert choice.backend == TEXT_TOWER and "does not open" in choice.reason
    assert isinstance(encoder, Encoder) and encoder.text_only and isinstance(encoder, TextEncoder)
    assert encoder.describe() == "torch text tower (cpu, float32)"


def test_every_backend_is_a_text_encoder(tiny_spec, fresh_encoders):
    for encoder in (Encoder.load_text_only(tiny_spec), Encoder.load(tiny_spec, CPU)):
        vectors = encoder.encode_texts(TEXTS)
        assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert isinstance(encoder, TextEncoder) and encoder.describe().startswith("torch ")


def test_the_text_only_loader_gives_float32_weights_from_an_fp16_checkpoint(tmp_path, fresh_encoders):
    """A model folder stored in fp16 (``train --save-fp16``, the bundled models): the text-only CPU encoder must
    compute in float32 like the whole model does, or the "float32" ONNX export would hold fp16 weights."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    spec = ModelSpec(f"local-dir:{save_model_dir(model, TINY_MODEL_CFG, tmp_path / 'half', half=True)}", None)
    text_model, _ = build_text_model(spec)
    dtypes = {p.dtype for name, p in text_model.named_parameters() if not name.startswith("visual.")}
    assert dtypes == {torch.float32}
    text_only = Encoder.load_text_only(spec).encode_texts(TEXTS)
    np.testing.assert_allclose(text_only, Encoder.load(spec, CPU).encode_texts(TEXTS), atol=1e-5)
