"""`clipsearch train` and the training library: the loss falls, outputs load everywhere, runs are reproducible,
accumulation is exact, and the bundled shapes model beats random weights by a wide margin."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.lab.datasets import load_captioned_set
from clipsearch.lab.train_data import CaptionPairs, collate_pairs, epoch_pairs
from clipsearch.lab.training import (
    REPORT_FILE,
    StepRunner,
    TrainSettings,
    evaluate_recall,
    load_start_model,
    lr_at,
    make_optimizer,
    save_trained_model,
    train_model,
)
from retrieval.errors import UsageError
from retrieval.model.device import CPU
from retrieval.model.encoder import Encoder
from retrieval.model.spec import WEIGHTS_FILE, ModelSpec, file_digest
from retrieval.testing import TINY_MODEL_CFG, make_random_model_dir
from tests.test_shapes_dataset import shapes

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO / "data" / "models" / "shapes-clip"
SAMPLES = REPO / "data" / "samples"
runner = CliRunner()


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> Path:
    """48 training, 8 validation and 8 test images of coloured shapes, five captions each."""
    return shapes.generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=64, seed=4, n_val=8, n_test=8)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": {"size": 64}}))
    return path


def tiny_settings(config: Path, **overrides) -> TrainSettings:
    values = dict(
        model=ModelSpec(str(config), None),
        from_scratch=True,
        epochs=2,
        batch_size=16,
        lr=2e-3,
        warmup_steps=2,
        seed=1,
    )
    return TrainSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained(shapes_set: Path, tiny_config: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "model"
    train_model(shapes_set.parent / "images", shapes_set, out, tiny_settings(tiny_config), progress=False)
    return out


def test_a_few_steps_lower_the_loss(shapes_set: Path, tiny_config: Path) -> None:
    torch.manual_seed(0)
    start = load_start_model(tiny_settings(tiny_config), CPU)
    items = load_captioned_set(shapes_set, shapes_set.parent / "images", "train").items[:16]
    pairs = CaptionPairs(items, start.tokenizer, start.preprocess)
    pixels, tokens = collate_pairs([pairs[pair] for pair in epoch_pairs(pairs.caption_counts, seed=0, epoch=0)])
    step = StepRunner(start.model, CPU, "fp32", None)
    optimizer = make_optimizer(start.model, 2e-3, 0.1)

    losses = []
    for _ in range(12):
        losses.append(step.backward(pixels, tokens))
        step.optimizer_step(optimizer, 1.0)

    assert losses[-1] < 0.6 * losses[0], losses


def test_micro_batches_give_the_gradient_of_the_whole_batch(shapes_set: Path, tiny_config: Path) -> None:
    torch.manual_seed(0)
    start = load_start_model(tiny_settings(tiny_config), CPU)
    items = load_captioned_set(shapes_set, shapes_set.parent / "images", "train").items[:10]
    pairs = CaptionPairs(items, start.tokenizer, start.preprocess)
    pixels, tokens = collate_pairs([pairs[(i, 0)] for i in range(10)])

    def gradients(micro_batch_size: int | None) -> tuple[float, dict[str, torch.Tensor]]:
        start.model.zero_grad(set_to_none=True)
        loss = StepRunner(start.model, CPU, "fp32", micro_batch_size).backward(pixels, tokens)
        return loss, {n: p.grad.clone() for n, p in start.model.named_parameters() if p.grad is not None}

    whole_loss, whole = gradients(None)
    micro_loss, micro = gradients(3)

    assert micro_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == micro.keys()
    for name in whole:
        scale = whole[name].abs().max().item()  # float32 sums in another order: equal to ~1e-6 of the scale
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_warm_up_then_cosine_decay() -> None:
    rates = [lr_at(step, total_steps=100, warmup_steps=10, base_lr=1.0) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(rates[:10], rates[1:10], strict=False))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    assert rates[55] == pytest.approx(0.5, abs=0.02) and rates[-1] < 0.001


def test_each_epoch_draws_a_random_caption_per_image_reproducibly() -> None:
    counts = [5] * 200
    first, again, later = epoch_pairs(counts, 3, 1), epoch_pairs(counts, 3, 1), epoch_pairs(counts, 3, 2)
    assert first == again and first != later
    assert sorted(i for i, _ in first) == list(range(200))
    assert len({c for _, c in first}) == 5


def test_output_is_a_model_folder_every_command_loads(trained: Path) -> None:
    encoder = Encoder.load(ModelSpec(f"local-dir:{trained}", None), device=CPU)
    assert encoder.dim == TINY_MODEL_CFG["embed_dim"]
    vectors = encoder.encode_texts(["a small red circle on the left"])
    assert vectors.shape == (1, encoder.dim) and np.linalg.norm(vectors) == pytest.approx(1, abs=1e-5)


def test_report_records_data_hyper_parameters_loss_and_recall(trained: Path) -> None:
    report = json.loads((trained / REPORT_FILE).read_text())
    assert report["data"]["train_images"] == 48 and report["data"]["val_images"] == 8
    assert report["data"]["format"] == "karpathy-json"
    assert report["settings"]["lr"] == 2e-3 and report["settings"]["batch_size"] == 16
    assert report["settings"]["total_steps"] == 6
    assert [epoch["epoch"] for epoch in report["epochs"]] == [1, 2]
    for epoch in report["epochs"]:
        assert epoch["train_loss"] > 0 and epoch["images_per_second"] > 0
        assert 0 <= epoch["val"]["text_to_image_recall@5"] <= 1
        assert epoch["val"]["n_images"] == 8 and epoch["val"]["n_captions"] == 40
    assert report["best_epoch"] in (1, 2)
    assert report["initial_val"]["n_images"] == 8


def test_same_seed_gives_the_same_model_through_the_cli(
    trained: Path, shapes_set: Path, tiny_config: Path, tmp_path: Path
) -> None:
    args = ["train", "--images", str(shapes_set.parent / "images"), "--annotations", str(shapes_set)]
    args += ["--model", str(tiny_config), "--from-scratch", "--epochs", "2", "--batch-size", "16"]
    args += ["--lr", "2e-3", "--warmup", "2", "--seed", "1", "--quiet"]

    result = runner.invoke(app, [*args, "--out", str(tmp_path / "again")])

    assert result.exit_code == 0, result.output
    assert "best epoch" in result.output and f"local-dir:{tmp_path / 'again'}" in result.output
    assert "by rsum" in result.output and "image→text R@" in result.output  # what picked the epoch is shown
    assert file_digest(tmp_path / "again" / WEIGHTS_FILE) == file_digest(trained / WEIGHTS_FILE)

    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "again")])
    assert refused.exit_code == 2
    assert "already holds a model" in refused.output and "Traceback" not in refused.output


def test_a_config_json_needs_from_scratch(shapes_set: Path, tiny_config: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_config, from_scratch=False)
    with pytest.raises(UsageError, match="--from-scratch"):
        train_model(shapes_set.parent / "images", shapes_set, tmp_path / "out", settings, progress=False)


@pytest.mark.parametrize("fp16", [False, True])
def test_save_then_load_gives_the_same_embeddings(tiny_config: Path, tmp_path: Path, fp16: bool) -> None:
    torch.manual_seed(0)
    start = load_start_model(tiny_settings(tiny_config, seed=5), CPU)
    images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "navy", "gold")]
    texts = ["a big blue star at the top", "small green square, left"]
    with torch.no_grad():
        before_images = start.model.encode_image(torch.stack([start.preprocess(i) for i in images]), normalize=True)
        before_texts = start.model.encode_text(start.tokenizer(texts), normalize=True)

    save_trained_model(start.model, start.model_cfg, tmp_path / "saved", fp16=fp16)
    loaded = Encoder.load(ModelSpec(f"local-dir:{tmp_path / 'saved'}", None), device=CPU)

    if not fp16:  # the very same numbers, so embeddings differ only by float32 rounding of batched kernels
        saved, reloaded = start.model.state_dict(), loaded.model.state_dict()
        assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    tolerance = 2e-2 if fp16 else 1e-6
    np.testing.assert_allclose(loaded.encode_pil(images), before_images.numpy(), atol=tolerance)
    np.testing.assert_allclose(loaded.encode_texts(texts), before_texts.numpy(), atol=tolerance)


def bundled_test_split():
    return load_captioned_set(SAMPLES / "dataset.json", SAMPLES / "images", "test").items


def recall_of(spec_dir: Path, items) -> dict[str, float]:
    encoder = Encoder.load(ModelSpec(f"local-dir:{spec_dir}", None), device=CPU)
    return evaluate_recall(encoder.model, encoder.preprocess, encoder.tokenizer, items, CPU)


def test_bundled_model_beats_random_weights_by_a_wide_margin(tmp_path: Path) -> None:
    """Measured on the 200 held-out sample images x 1,000 captions (see data/models/shapes-clip/REPRODUCE.md)."""
    items = bundled_test_split()
    bundled = recall_of(BUNDLED_MODEL, items)
    config = json.loads((BUNDLED_MODEL / "open_clip_config.json").read_text())
    random = recall_of(make_random_model_dir(tmp_path / "random", config["model_cfg"], seed=0), items)

    assert bundled["n_images"] == 200 and bundled["n_captions"] == 1000
    # measured: bundled 98.6 / 100 / 100 (text→image R@1/5/10) and 99.0 / 100 / 100 (image→text);
    # random weights 0.6 / 3.3 / 5.6 and 0.5 / 2.0 / 3.5 (chance: 0.5 / 2.5 / 5.0)
    assert random["text_to_image_recall@5"] < 0.1 and random["image_to_text_recall@5"] < 0.1
    assert bundled["text_to_image_recall@1"] >= 0.9 and bundled["text_to_image_recall@5"] >= 0.97
    assert bundled["image_to_text_recall@1"] >= 0.9 and bundled["image_to_text_recall@5"] >= 0.97


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_training_on_cuda(shapes_set: Path, tiny_config: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_config, device="cuda", micro_batch_size=8)
    report = train_model(shapes_set.parent / "images", shapes_set, tmp_path / "gpu", settings, progress=False)

    assert all(math.isfinite(epoch.train_loss) for epoch in report.epochs)
    assert report.epochs[-1].train_loss < report.epochs[0].train_loss * 1.1
    assert Encoder.load(ModelSpec(f"local-dir:{tmp_path / 'gpu'}", None), device=CPU).dim == 32


def test_fine_tuning_starts_from_the_given_weights(shapes_set: Path, tiny_spec: ModelSpec, tmp_path: Path) -> None:
    settings = TrainSettings(model=tiny_spec, epochs=1, batch_size=16, seed=1)
    report = train_model(shapes_set.parent / "images", shapes_set, tmp_path / "tuned", settings, progress=False)

    assert report.start == {"model": tiny_spec.describe()} and report.settings["lr"] == 1e-5
    start = Encoder.load(tiny_spec, device=CPU)
    tuned = Encoder.load(ModelSpec(f"local-dir:{tmp_path / 'tuned'}", None), device=CPU)
    texts = ["a small red circle on the left", "big blue star, top right"]
    before, after = start.encode_texts(texts), tuned.encode_texts(texts)
    assert np.abs(after - before).max() > 1e-4  # trained ...
    assert (before * after).sum(axis=1).min() > 0.9  # ... a little, from the given weights, not from scratch
