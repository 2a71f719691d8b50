"""`clipsearch train-captioner`, `caption` and `ask`: the image-grounded decoder (captions and answers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipsearch.cli.app import app, quiet_libraries, user_errors
from clipsearch.cli.options import DeviceOption, IndexOption, ModelOption, PretrainedOption

CaptionerOption = Annotated[
    Path | None,
    typer.Option(
        "--captioner",
        help="Captioning model folder (default: FOLDER-cap beside the CLIP model local-dir:FOLDER).",
        show_default=False,
    ),
]
BeamsOption = Annotated[int, typer.Option("--beams", help="Beam width (1: greedy).")]


@app.command("train-captioner")
@user_errors
def train_captioner(
    images: Annotated[Path, typer.Option("--images", help="Folder holding the image files.")],
    annotations: Annotated[
        Path, typer.Option("--annotations", help="Captions as `clipsearch train` and `eval captions` read them.")
    ],
    clip: Annotated[str, typer.Option("--clip", help="The CLIP model whose image tokens it reads: local-dir:FOLDER.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Model folder to write (default: FOLDER-cap beside --clip local-dir:FOLDER)."),
    ] = None,
    questions: Annotated[
        Path | None,
        typer.Option(
            "--questions",
            help="Question-answer pairs (JSON, as scripts/make_scenes_dataset.py writes): the same decoder then "
            "answers questions, the question as its prefix.",
        ),
    ] = None,
    pretrained: Annotated[str, typer.Option("--pretrained", help="Pretrained tag of --clip, if any.")] = "",
    steps: Annotated[
        int, typer.Option("--steps", help="Most optimiser steps; the validation curve usually stops the run sooner.")
    ] = 12000,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validations.")] = 250,
    patience: Annotated[
        int,
        typer.Option(
            "--patience",
            help="Validations without a better one (the mean of the kinds' losses) before the learning rate is cut "
            "and training goes on from the best weights; after --lr-cuts cuts, before the run stops.",
        ),
    ] = 4,
    lr_cuts: Annotated[
        int, typer.Option("--lr-cuts", help="How many times the learning rate is cut (by 5) before a stall stops.")
    ] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Captions and questions per step.")] = 64,
    lr: Annotated[
        float, typer.Option("--lr", help="Learning rate after warm-up, held until validation stalls.")
    ] = 1e-3,
    width: Annotated[int, typer.Option("--width", help="Decoder width.")] = 128,
    layers: Annotated[int, typer.Option("--layers", help="Decoder layers (self- and cross-attention each).")] = 3,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Of the LM loss.")] = 0.1,
    image_stage: Annotated[
        int,
        typer.Option(
            "--image-stage",
            help="Which feature map of the image tower it reads, counted back from the last (1: the last, as the "
            "re-ranker; 2: the one before, twice as fine on a ResNet tower).",
        ),
    ] = 2,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[
        int, typer.Option("--threads", help="CPU threads for the training steps (the small decoder runs best on 1).")
    ] = 1,
    workers: Annotated[int, typer.Option("--workers", help="Image decoding processes.")] = 0,
    val_split: Annotated[str, typer.Option("--val-split", help="Split to validate on.")] = "val",
    init: Annotated[
        Path | None, typer.Option("--init", help="Continue from this decoder's weights (same sizes and words).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model already in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a BLIP-style captioning decoder on frozen CLIP image tokens (and, with --questions, to answer
    questions); validated every --eval-every steps, the best kept, stopped when validation stops improving."""
    quiet_libraries()
    from clipsearch.lab.caption_training import REPORT_FILE, CaptionTrainSettings
    from clipsearch.lab.caption_training import train_captioner as run
    from retrieval.model.caption_folder import caption_folder
    from retrieval.model.spec import ModelSpec

    spec = ModelSpec(clip, pretrained or None)
    folder = caption_folder(spec, out)
    settings = CaptionTrainSettings(
        clip=spec,
        steps=steps,
        eval_every=eval_every,
        patience=patience,
        lr_cuts=lr_cuts,
        batch_size=batch_size,
        lr=lr,
        width=width,
        layers=layers,
        label_smoothing=label_smoothing,
        image_stage=image_stage,
        seed=seed,
        threads=threads,
        workers=workers,
        val_split=val_split,
        init_from=init,
        overwrite=overwrite,
    )
    report = run(images, annotations, folder, settings, questions=questions, progress=not quiet)
    ran = report.curve[-1]["step"] if report.curve else 0
    typer.echo(
        f"kept step {report.best_step} of {ran} (stopped: {report.stopped}); {report.seconds:.0f} s "
        f"({report.cpu_seconds:.0f} s CPU)"
    )
    typer.echo(f"wrote {folder}; report in {folder / REPORT_FILE}")


def _open(index: Path | None, model: str | None, pretrained: str | None, captioner: Path | None, device: str):
    quiet_libraries()
    from retrieval.model.caption_writer import open_captioner
    from retrieval.model.device import resolve_device
    from retrieval.store.recorded_model import model_for_index

    return open_captioner(model_for_index(index, model, pretrained), captioner, resolve_device(device))


def _print(answers, as_json: bool, key: str) -> None:
    from retrieval.errors import ClipsearchError

    if as_json:
        typer.echo(json.dumps([{"path": a.path, key: a.text, "error": a.error} for a in answers], indent=2))
    else:
        for answer in answers:
            shown = answer.text if answer.error is None else f"(cannot read: {answer.error})"
            typer.echo(f"{answer.path}\t{shown}" if len(answers) > 1 else shown)
    if all(a.error is not None for a in answers):
        raise ClipsearchError("no photo could be read")


@app.command("caption")
@user_errors
def caption(
    photos: Annotated[list[Path], typer.Argument(help="Image files to describe.", show_default=False)],
    index: IndexOption = None,
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    captioner: CaptionerOption = None,
    beams: BeamsOption = 3,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (path, caption, error).")] = False,
) -> None:
    """Write a caption for each PHOTO with the captioning decoder (`clipsearch train-captioner`)."""
    from retrieval.model.beam_search import BeamSettings
    from retrieval.model.caption_writer import describe_files

    opened = _open(index, model, pretrained, captioner, device)
    _print(describe_files(opened, photos, settings=BeamSettings(beams=beams)), as_json, "caption")


@app.command("ask")
@user_errors
def ask(
    photo: Annotated[Path, typer.Argument(help="The image file the question is about.", show_default=False)],
    question: Annotated[str, typer.Argument(help='e.g. "what colour is the shape above the circle?"')],
    index: IndexOption = None,
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    captioner: CaptionerOption = None,
    beams: BeamsOption = 3,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (path, answer, error).")] = False,
) -> None:
    """Answer a question about PHOTO with the decoder trained with `train-captioner --questions`."""
    from retrieval.model.beam_search import BeamSettings
    from retrieval.model.caption_writer import describe_files

    opened = _open(index, model, pretrained, captioner, device)
    unknown = opened.vocab.unknown_words(question)
    if unknown:
        typer.echo(f"clipsearch: warning: words the model never saw: {', '.join(unknown)}", err=True)
    answers = describe_files(opened, [photo], question=question, settings=BeamSettings(beams=beams))
    _print(answers, as_json, "answer")
