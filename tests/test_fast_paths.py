"""The speed-ups must not change answers: trimmed text encoding, skipped initialisation, the text-only encoder,
the weights-digest cache; and the int8 image encoder stays close to fp32."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import retrieval.model.build as build_module
import retrieval.model.spec as spec_module
from retrieval.model.build import build_model
from retrieval.model.device import CPU
from retrieval.model.encoder import Encoder
from retrieval.model.spec import file_digest
from retrieval.model.text_features import text_features
from retrieval.search.engine import SearchEngine
from tests.conftest import make_images, write_image

TEXTS = ["a dog", "a photo of a red car parked at night in the rain", "x", ""]


@pytest.fixture
def fresh_encoders():
    """Encoder.load shares one model per process: start and end each test without one."""
    Encoder.unload_all()
    yield
    Encoder.unload_all()


def test_trimmed_text_encoding_equals_the_full_77_tokens(tiny_spec):
    model, _ = build_model(tiny_spec)
    import open_clip

    tokens = open_clip.get_tokenizer(tiny_spec.name)(TEXTS)
    with torch.inference_mode():
        full = model.encode_text(tokens, normalize=True)
        trimmed = text_features(model, tokens)
        one = text_features(model, tokens[:1])
    np.testing.assert_allclose(trimmed.numpy(), full.numpy(), atol=1e-6)
    np.testing.assert_allclose(one.numpy(), full[:1].numpy(), atol=1e-6)


def test_skipping_random_init_loads_the_same_weights(tiny_spec, monkeypatch):
    fast, _ = build_model(tiny_spec)
    monkeypatch.setattr(build_module, "skip_weight_init", contextlib.nullcontext)
    slow, _ = build_model(tiny_spec)
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state.keys() == slow_state.keys()
    assert all(torch.equal(fast_state[key], slow_state[key]) for key in fast_state)


def test_text_only_encoder_matches_the_full_one_and_refuses_images(tiny_spec, fresh_encoders):
    text_only = Encoder.load_text_only(tiny_spec)
    assert text_only.text_only
    assert all(p.device.type == "meta" for p in text_only.model.visual.parameters())
    vectors = text_only.encode_texts(TEXTS)
    with pytest.raises(RuntimeError, match="text tower"):
        text_only.encode_images(torch.zeros(1, 3, 64, 64))
    full = Encoder.load(tiny_spec, CPU)
    assert not full.text_only and full.identity == text_only.identity
    np.testing.assert_allclose(vectors, full.encode_texts(TEXTS), atol=1e-6)
    assert Encoder.load_text_only(tiny_spec) is full  # a loaded full encoder is reused for text


def test_text_search_loads_only_the_text_tower_then_image_search_the_rest(tmp_path, settings, fresh_encoders):
    from indexer.pipeline import index_paths

    make_images(tmp_path / "photos", 6, seed=9)
    index_paths(tmp_path / "index", [tmp_path / "photos"], settings, progress=False)
    Encoder.unload_all()
    with SearchEngine(tmp_path / "index", device="cpu") as engine:
        by_text = engine.search_text("a dog", k=3)
        assert engine.text_encoder.text_only
        by_image = engine.search_image(write_image(tmp_path / "query.jpg", seed=99), k=3)  # not indexed: encoded
        assert len(by_text) == 3 and len(by_image) == 3
        assert not engine.text_encoder.text_only  # the full encoder, once loaded, serves text too


def test_int8_image_encoder_stays_close_to_fp32(tiny_spec, fresh_encoders):
    pixels = torch.randn(4, 3, 64, 64)
    reference = Encoder.load(tiny_spec, CPU).encode_images(pixels)
    quantized = Encoder.load(tiny_spec, CPU, int8=True).encode_images(pixels)
    assert np.all(np.sum(reference * quantized, axis=1) > 0.98)


def test_weights_digest_is_remembered_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(spec_module, "DIGEST_CACHE_MIN_BYTES", 0)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"weights" * 1000)
    first = file_digest(weights)
    spec_module._file_digest.cache_clear()
    monkeypatch.setattr(spec_module, "_file_digest", lambda *a: pytest.fail("hashed again"))
    assert file_digest(weights) == first
    weights.write_bytes(b"other weights" * 1000)  # changed file: new size/mtime, hashed afresh
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert file_digest(weights) != first
