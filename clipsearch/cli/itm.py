"""`clipsearch train-itm`: train a fusion re-ranker (ITM) on a trained CLIP model, written as a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipsearch.cli.app import app, quiet_libraries, user_errors


@app.command("train-itm")
@user_errors
def train_itm(
    images: Annotated[Path, typer.Option("--images", help="Folder holding the image files.")],
    annotations: Annotated[
        Path,
        typer.Option(
            "--annotations",
            help="Captions as `clipsearch train` reads them. Binding negatives are derived from captions that relate "
            "two things; a Karpathy JSON may add its own (sentences[].negatives, as scripts/make_scenes_dataset.py "
            "writes).",
        ),
    ],
    clip: Annotated[str, typer.Option("--clip", help="The CLIP model it re-ranks for, e.g. local-dir:FOLDER.")],
    out: Annotated[Path, typer.Option("--out", help="Re-ranker folder to write (use it as --rerank-model OUT).")],
    pretrained: Annotated[str, typer.Option("--pretrained", help="Pretrained tag of --clip, if any.")] = "",
    steps: Annotated[
        int, typer.Option("--steps", help="Most optimiser steps; --patience usually stops sooner.")
    ] = 4000,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validations.")] = 250,
    patience: Annotated[
        int, typer.Option("--patience", help="Stop after this many validations without a better recall@1.")
    ] = 6,
    batch_size: Annotated[int, typer.Option("--batch-size", help="True pairs per step (each adds 4 negatives).")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (one-cycle schedule).")] = 5e-4,
    width: Annotated[int, typer.Option("--width", help="Fusion transformer width.")] = 128,
    layers: Annotated[int, typer.Option("--layers", help="Fusion layers (self- and cross-attention each).")] = 2,
    mine_top: Annotated[int, typer.Option("--mine-top", help="Mine negatives among the dual encoder's top M.")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Image decoding processes.")] = 0,
    val_split: Annotated[str, typer.Option("--val-split", help="Split to validate on after each epoch.")] = "val",
    init: Annotated[
        Path | None, typer.Option("--init", help="Continue from this re-ranker's weights (same sizes and CLIP).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a re-ranker already in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train an ALBEF-style image-text matching re-ranker on frozen CLIP tokens, from plain captions; validated
    every --eval-every steps, the best kept, stopped when validation stops improving."""
    quiet_libraries()
    from clipsearch.lab.itm_training import REPORT_FILE, ItmTrainSettings
    from clipsearch.lab.itm_training import train_itm as run
    from retrieval.model.spec import ModelSpec

    settings = ItmTrainSettings(
        clip=ModelSpec(clip, pretrained or None),
        steps=steps,
        eval_every=eval_every,
        patience=patience,
        batch_size=batch_size,
        lr=lr,
        width=width,
        layers=layers,
        mine_top=mine_top,
        seed=seed,
        threads=threads,
        workers=workers,
        val_split=val_split,
        init_from=init,
        overwrite=overwrite,
    )
    report = run(images, annotations, out, settings, progress=not quiet)
    ran = report.curve[-1]["step"] if report.curve else 0
    typer.echo(f"kept step {report.best_step} of {ran} (stopped: {report.stopped}); {report.seconds:.0f} s")
    if report.best_r1 is not None and report.dual_r1 is not None:
        typer.echo(f"validation R@1: dual encoder {100 * report.dual_r1:.1f}, re-ranked {100 * report.best_r1:.1f}")
    typer.echo(f"wrote {out}; report in {out / REPORT_FILE}")
    if report.worse_than_dual_encoder:
        typer.echo(
            "warning: the re-ranker is worse than the dual encoder alone on validation; `search --rerank` refuses "
            "it unless --force-rerank is given (more data or steps may help)",
            err=True,
        )
