"""`clipsearch eval` against LAION clip_benchmark itself: the same figures to 1e-6, exact ties included.

clip_benchmark runs as its CLI runs it (``clip_benchmark.cli``: ``load_clip``, its Flickr dataset class over an
annotation file in its format, a ``DataLoader`` with its collate function, ``zeroshot_retrieval.evaluate``), with
``amp=False`` (``--no_amp``: float32, the reference protocol). The set has images smaller than the tiny model's
64-pixel input and larger than twice it (the indexer's draft decode fires on those), several batches, pictures
that appear twice, five captions per image, and duplicate captions within an image, across images in one batch
and across batches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.lab.datasets import load_captioned_set
from clipsearch.lab.evaluate import AS_INDEXED, REFERENCE, EvalSettings, evaluate
from clipsearch.lab.metrics import reference_recall

pytest.importorskip("clip_benchmark")

KS = (1, 5, 10)
BATCH = 5
SIZES = [(40, 30), (64, 64), (300, 200), (97, 131), (640, 480), (129, 129), (256, 400), (50, 90), (333, 222)]
SIZES += [(72, 72), (500, 375), (150, 90), (1024, 768), (64, 200)]
DUPLICATE_OF = {7: 6, 13: 2}
WORDS = ["red", "blue", "green", "small", "large", "circle", "square", "dog", "beach", "car", "tree", "night"]


@pytest.fixture(scope="module")
def parity_set(tmp_path_factory) -> tuple[Path, Path]:
    """JPEGs of several sizes and a clip_benchmark-format Flickr annotation file (``name.jpg,caption``)."""
    root = tmp_path_factory.mktemp("parity")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(7)
    lines = ["image,caption"]
    for n, (width, height) in enumerate(SIZES):
        y, x = np.mgrid[0:height, 0:width] / max(width, height)
        waves = [np.sin(x * rng.uniform(2, 12) + y * rng.uniform(2, 12) + rng.uniform(0, 6)) for _ in range(3)]
        noise = rng.normal(0, 25, (height, width, 3))
        pixels = (np.stack(waves, axis=-1) * 100 + 128 + noise).clip(0, 255).astype(np.uint8)
        if n in DUPLICATE_OF:  # the same file twice, in one batch and across batches: exact t2i ties
            shutil.copyfile(images / f"{DUPLICATE_OF[n]:03d}.jpg", images / f"{n:03d}.jpg")
        else:
            Image.fromarray(pixels).save(images / f"{n:03d}.jpg", quality=90)
        captions = [" ".join(rng.choice(WORDS, size=rng.integers(2, 6))) for _ in range(5)]
        if n % 3 == 0:
            captions[4] = captions[0]  # the same caption twice for one image
        if n in (1, 3, 6, 8, 12):
            captions[2] = "a photo"  # one caption for several images, in one batch and across batches
        if n in (2, 3):
            captions[1] = "the same thing"
        lines += [f"{n:03d}.jpg,{caption}" for caption in captions]
    annotations = root / "captions.csv"
    annotations.write_text("\n".join(lines) + "\n")
    return images, annotations


def clip_benchmark_figures(model_dir: Path, images: Path, annotations: Path) -> dict[str, float]:
    """clip_benchmark's own evaluation, set up the way ``clip_benchmark.cli`` sets it up."""
    import torch
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.datasets.flickr import Flickr
    from clip_benchmark.metrics import zeroshot_retrieval
    from clip_benchmark.models import load_clip

    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{model_dir}", None, None, device="cpu")
    model.eval()
    dataset = Flickr(root=str(images), ann_file=str(annotations), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=False, num_workers=0, collate_fn=image_captions_collate_fn
    )
    return zeroshot_retrieval.evaluate(model, loader, tokenizer, recall_k_list=list(KS), device="cpu", amp=False)


@pytest.fixture(scope="module")
def reference_figures(parity_set, tiny_model_dir) -> dict[str, float]:
    return clip_benchmark_figures(tiny_model_dir, *parity_set)


def assert_same_figures(ours: dict, theirs: dict) -> None:
    for k in KS:
        for name in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
            assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


@pytest.mark.slow  # clip_benchmark's import and run: ~15 s on a loaded 2-core machine
def test_the_default_protocol_gives_clip_benchmarks_figures(parity_set, reference_figures, tiny_spec, tmp_path):
    images, annotations = parity_set
    captioned = load_captioned_set(annotations, images)
    settings = EvalSettings(model=tiny_spec, workers=0, device="cpu", batch_size=BATCH, index_dir=tmp_path / "e")

    report = evaluate(captioned, settings, progress=False)

    assert [run.protocol for run in report.runs] == [REFERENCE]
    assert (report.metrics.n_images, report.metrics.n_captions) == (len(SIZES), 5 * len(SIZES))
    assert_same_figures(report.metrics.as_dict(), reference_figures)
    # The duplicated "a photo" captions tie exactly: which of them make a cut is topk's choice, and counted.
    assert report.headline.ties.total > 0


def test_the_metric_alone_ranks_ties_as_clip_benchmark_does():
    """Embeddings full of exact ties (repeated rows), scored by clip_benchmark's recall_at_k and by ours."""
    import torch
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 8)).astype(np.float32)
    images = torch.nn.functional.normalize(torch.from_numpy(base[rng.integers(0, 6, 40)]), dim=-1)
    owners = rng.integers(0, 40, 150)
    texts = torch.nn.functional.normalize(torch.from_numpy(base[rng.integers(0, 6, 150)]), dim=-1)
    scores = texts @ images.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(150), torch.from_numpy(owners)] = True

    ours, ties = reference_recall(texts, images, owners, KS, row_batch=7)

    for k in KS:
        t2i = (batchify(recall_at_k, scores, positive, 7, "cpu", k=k) > 0).float().mean().item()
        i2t = (batchify(recall_at_k, scores.T, positive.T, 7, "cpu", k=k) > 0).float().mean().item()
        assert ours.t2i[k] == pytest.approx(t2i, abs=1e-6) and ours.i2t[k] == pytest.approx(i2t, abs=1e-6)
        assert ties.t2i[k] > 0 and ties.strict_t2i[k] <= ours.t2i[k]


@pytest.mark.slow
def test_cli_json_equals_clip_benchmark_and_shows_the_engine_beside_it(parity_set, reference_figures, tiny_model_dir):
    images, annotations = parity_set
    args = ["eval", "captions", "--images", str(images), "--annotations", str(annotations)]
    args += ["--model", f"local-dir:{tiny_model_dir}", "--pretrained", "", "--device", "cpu", "--workers", "0"]
    args += ["--batch-size", str(BATCH), "--index", str(images.parent / "eval"), "-q"]

    result = CliRunner().invoke(app, [*args, "--both", "--json", "-"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["protocol"] == REFERENCE and set(report["protocols"]) == {REFERENCE, AS_INDEXED}
    assert_same_figures(report["metrics"], reference_figures)
    assert report["protocols"][AS_INDEXED]["faiss_check"]["agrees"] is True

    table = CliRunner().invoke(app, [*args, "--both"])
    assert table.exit_code == 0, table.output
    assert "reference" in table.output and "as-indexed" in table.output and "ties" in table.output
