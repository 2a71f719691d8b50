"""`clipsearch train`: contrastive training or fine-tuning on captioned images, written as a local-dir: model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipsearch.cli.app import app, quiet_libraries, user_errors
from clipsearch.cli.options import DeviceOption
from retrieval.model.spec import DEFAULT_MODEL, DEFAULT_PRETRAINED


@app.command()
@user_errors
def train(
    images: Annotated[Path, typer.Option("--images", help="Folder holding the image files.")],
    annotations: Annotated[
        Path,
        typer.Option(
            "--annotations",
            help="Captions, in any format `clipsearch eval` reads (Karpathy JSON, .token, CSV, JSONL). "
            "Trains on train/restval (or every image), validates on --val-split (or a held-out 5%).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (use it as --model local-dir:OUT).")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Start from: an open_clip model name, local-dir:FOLDER, or (with --from-scratch) a config JSON.",
        ),
    ] = DEFAULT_MODEL,
    pretrained: Annotated[
        str, typer.Option("--pretrained", help="Pretrained tag or checkpoint file to start from.")
    ] = DEFAULT_PRETRAINED,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Random weights (seeded) of --model's architecture.")
    ] = False,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training images.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Image-caption pairs per contrastive batch.")] = 128,
    micro_batch_size: Annotated[
        int | None,
        typer.Option("--micro-batch", help="Pairs per forward pass; smaller than --batch-size accumulates gradients."),
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Peak learning rate (default 1e-5 fine-tuning, 5e-4 from scratch).")
    ] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.1,
    warmup_steps: Annotated[int | None, typer.Option("--warmup", help="Warm-up steps (default 5% of all).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOption = "auto",
    workers: Annotated[int, typer.Option("--workers", help="Image decoding processes.")] = 0,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads for torch (1 is fastest on a busy machine).")
    ] = None,
    val_split: Annotated[str, typer.Option("--val-split", help="Split to validate on after each epoch.")] = "val",
    save_fp16: Annotated[bool, typer.Option("--save-fp16", help="Store the weights in half precision.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model already in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train CLIP contrastively on your captioned images; the best epoch by validation recall is kept."""
    quiet_libraries()
    from clipsearch.lab.training import REPORT_FILE, TrainSettings, train_model
    from retrieval.model.device import resolve_device
    from retrieval.model.spec import ModelSpec

    settings = TrainSettings(
        model=ModelSpec(model, None if from_scratch else (pretrained or None)),
        from_scratch=from_scratch,
        epochs=epochs,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        seed=seed,
        device=resolve_device(device),  # once, here: training takes the Device
        workers=workers,
        threads=threads,
        val_split=val_split,
        save_fp16=save_fp16,
        overwrite=overwrite,
    )
    report = train_model(images, annotations, out, settings, progress=not quiet)
    best = report.best_val
    summary = f"best epoch {report.best_epoch} of {len(report.epochs)}"
    if best:  # the best epoch is the one with the highest rsum (every recall@k, both directions): show them all
        t2i = "/".join(f"{100 * best[f'text_to_image_recall@{k}']:.1f}" for k in settings.recall_ks)
        i2t = "/".join(f"{100 * best[f'image_to_text_recall@{k}']:.1f}" for k in settings.recall_ks)
        ks = "/".join(str(k) for k in settings.recall_ks)
        summary += f" by rsum {best['rsum']:.1f}: val text→image R@{ks} {t2i}, image→text R@{ks} {i2t}"
    typer.echo(f"{summary}; {report.seconds:.0f} s")
    typer.echo(f"wrote {out} (use --model local-dir:{out}); report in {out / REPORT_FILE}")
