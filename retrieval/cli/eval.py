"""`clipsearch eval flickr30k|captions`: recall@k of the model on a captioned image set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli.app import app, quiet_libraries, user_errors
from retrieval.cli.options import BatchOption, DeviceOption, ModelOption, PretrainedOption, WorkersOption
from retrieval.errors import ClipsearchError
from retrieval.model.spec import DEFAULT_MODEL, DEFAULT_PRETRAINED

eval_app = typer.Typer(
    help="Measure retrieval quality (recall@k) on Flickr30K or on a captioned set of your own.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")

ImagesOption = Annotated[Path, typer.Option("--images", help="Folder holding the image files.")]
AnnotationsOption = Annotated[
    Path,
    typer.Option(
        "--annotations",
        help="Captions: Karpathy dataset_*.json, results_20130124.token, Kaggle results.csv, a CSV with JSON "
        "caption lists, or an image,caption CSV/JSONL (detected by content).",
    ),
]
SplitFileOption = Annotated[
    Path | None,
    typer.Option("--split-file", help="Where the split comes from when the annotations have none (Karpathy JSON)."),
]
PromptOption = Annotated[str, typer.Option("--prompt", help='Text put before every caption, e.g. "a photo of ".')]
EvalIndexOption = Annotated[
    Path | None,
    typer.Option("--index", help="Eval index folder to build and reuse (default: one per set and model in the cache)."),
]
AllowMissingOption = Annotated[
    bool, typer.Option("--allow-missing", help="Evaluate without images that are missing or cannot be decoded.")
]
JsonFileOption = Annotated[
    Path | None, typer.Option("--json", help="Also write the results as JSON to FILE (-: stdout).")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@eval_app.command("flickr30k")
@user_errors
def flickr30k(
    images: ImagesOption,
    annotations: AnnotationsOption,
    split: Annotated[str, typer.Option("--split", help="test (the 1K test protocol), val, train, or all.")] = "test",
    split_file: SplitFileOption = None,
    prompt: PromptOption = "",
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    index_dir: EvalIndexOption = None,
    device: DeviceOption = "auto",
    batch_size: BatchOption = 32,
    workers: WorkersOption = None,
    allow_missing: AllowMissingOption = False,
    json_file: JsonFileOption = None,
    quiet: QuietOption = False,
) -> None:
    """Flickr30K retrieval, the published protocol: 1,000 test images x 5 raw captions, recall@1/5/10."""
    _run(locals(), benchmark="flickr30k")


@eval_app.command("captions")
@user_errors
def captions(
    images: ImagesOption,
    annotations: AnnotationsOption,
    split: Annotated[str | None, typer.Option("--split", help="Only this split (default: every image).")] = None,
    split_file: SplitFileOption = None,
    prompt: PromptOption = "",
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    index_dir: EvalIndexOption = None,
    device: DeviceOption = "auto",
    batch_size: BatchOption = 32,
    workers: WorkersOption = None,
    allow_missing: AllowMissingOption = False,
    json_file: JsonFileOption = None,
    quiet: QuietOption = False,
) -> None:
    """Any captioned image set (your own domain): every caption against every image, recall@1/5/10."""
    _run(locals(), benchmark=None)


def _run(options: dict, benchmark: str | None) -> None:
    quiet_libraries()
    from retrieval.lab.evaluate import EvalSettings, evaluate_annotations
    from retrieval.model.spec import ModelSpec

    settings = EvalSettings(
        model=ModelSpec(options["model"], options["pretrained"] or None),
        prompt=options["prompt"],
        batch_size=options["batch_size"],
        workers=options["workers"],
        device=options["device"],
        index_dir=options["index_dir"],
        allow_missing=options["allow_missing"],
    )
    report = evaluate_annotations(
        options["annotations"],
        options["images"],
        settings,
        split=options["split"],
        split_file=options["split_file"],
        benchmark=benchmark,
        progress=not options["quiet"],
    )
    json_file = options["json_file"]
    if json_file is not None and str(json_file) == "-":
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        typer.echo(report_table(report))
        if json_file is not None:
            json_file.expanduser().write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    for problem in report.problems:
        typer.echo(f"clipsearch: warning: {problem}", err=True)
    if not report.faiss.agrees:
        raise ClipsearchError(
            f"the index search disagrees with the exact similarity matrix on {report.faiss.disagreements} captions "
            f"(e.g. {report.faiss.examples[0]}): this is a bug, please report it"
        )


def report_table(report) -> str:
    """The eval as a small table, recall in percent."""
    metrics = report.metrics
    ks = list(metrics.t2i)
    split = f", split {report.split}" if report.split else ""
    prompt = f", prompt {report.prompt!r}" if report.prompt else ""
    images = f"{report.images_encoded:,} images encoded" if report.images_encoded else "images cached"
    texts = "captions cached" if report.texts_cached else f"captions {report.text_seconds:.1f} s"
    lines = [
        f"model        {report.model}",
        f"data         {report.source_format}{split}: {metrics.n_images:,} images, {metrics.n_captions:,} captions"
        f"{prompt}",
        f"encode       {images} in {report.image_seconds:.1f} s, {texts}",
        "",
        "recall %     " + "".join(f"{f'R@{k}':>8}" for k in ks),
        "text→image   " + "".join(f"{100 * metrics.t2i[k]:8.2f}" for k in ks),
        "image→text   " + "".join(f"{100 * metrics.i2t[k]:8.2f}" for k in ks),
        f"mean R@1 {100 * metrics.mean_r1:.2f}   RSUM {metrics.rsum:.1f}",
        "",
    ]
    faiss = report.faiss
    ties = f"; {faiss.float_ties} float32 ties" if faiss.float_ties else ""
    if faiss.agrees:
        lines.append(f"index check  FAISS text→image recall equals the exact matrix's{ties}")
    else:
        lines.append(f"index check  FAISS DISAGREES with the exact matrix on {faiss.disagreements} captions{ties}")
    return "\n".join(lines)
