"""`clipsearch eval flickr30k|captions`: recall@k of the model on a captioned image set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipsearch.cli.app import app, quiet_libraries, user_errors
from clipsearch.cli.options import DeviceOption, EvalModelOption, PretrainedOption, WorkersOption
from retrieval.errors import ClipsearchError

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
    typer.Option(
        "--index",
        help="Eval folder to reuse: cached embeddings, and the eval index of --as-indexed (default: one per set and "
        "model in the cache).",
    ),
]
AllowMissingOption = Annotated[
    bool, typer.Option("--allow-missing", help="Evaluate without images that are missing or cannot be decoded.")
]
JsonFileOption = Annotated[
    Path | None, typer.Option("--json", help="Also write the results as JSON to FILE (-: stdout).")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
AsIndexedOption = Annotated[
    bool,
    typer.Option(
        "--as-indexed",
        help="Measure what the search engine returns (draft JPEG decode, float16 catalog vectors, FAISS) instead "
        "of the reference protocol (clip_benchmark's: full-resolution Pillow decode, float32).",
    ),
]
BothOption = Annotated[
    bool, typer.Option("--both", help="Measure the reference protocol and --as-indexed, and print them side by side.")
]
EvalBatchOption = Annotated[
    int, typer.Option("--batch-size", help="Images per encoder batch (64: clip_benchmark's default).")
]


@eval_app.command("flickr30k")
@user_errors
def flickr30k(
    images: ImagesOption,
    annotations: AnnotationsOption,
    split: Annotated[str, typer.Option("--split", help="test (the 1K test protocol), val, train, or all.")] = "test",
    split_file: SplitFileOption = None,
    prompt: PromptOption = "",
    model: EvalModelOption = None,
    pretrained: PretrainedOption = None,
    index_dir: EvalIndexOption = None,
    device: DeviceOption = "auto",
    batch_size: EvalBatchOption = 64,
    workers: WorkersOption = None,
    allow_missing: AllowMissingOption = False,
    json_file: JsonFileOption = None,
    quiet: QuietOption = False,
    as_indexed: AsIndexedOption = False,
    both: BothOption = False,
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
    model: EvalModelOption = None,
    pretrained: PretrainedOption = None,
    index_dir: EvalIndexOption = None,
    device: DeviceOption = "auto",
    batch_size: EvalBatchOption = 64,
    workers: WorkersOption = None,
    allow_missing: AllowMissingOption = False,
    json_file: JsonFileOption = None,
    quiet: QuietOption = False,
    as_indexed: AsIndexedOption = False,
    both: BothOption = False,
    rerank: Annotated[
        int | None,
        typer.Option("--rerank", help="Also re-rank each caption's top N with the ITM re-ranker (as indexed)."),
    ] = None,
    rerank_model: Annotated[
        Path | None,
        typer.Option("--rerank-model", help="Re-ranker folder (default: FOLDER-itm beside --model local-dir:FOLDER)."),
    ] = None,
    hard_negatives: Annotated[
        bool,
        typer.Option(
            "--hard-negatives",
            help="Accuracy of each true caption over its binding variants, per scorer and kind: those in the "
            "annotations (sentences[].negatives) and those derived from captions that relate two things.",
        ),
    ] = False,
    captioning: Annotated[
        bool,
        typer.Option(
            "--captioning",
            help="Measure the captioning decoder instead of recall: BLEU-4 and CIDEr against the references, and on "
            "generated scenes the share of captions true of their image; with --questions, VQA accuracy per kind.",
        ),
    ] = False,
    captioner: Annotated[
        Path | None,
        typer.Option("--captioner", help="Captioning model (default: FOLDER-cap beside --model local-dir:FOLDER)."),
    ] = None,
    questions: Annotated[
        Path | None, typer.Option("--questions", help="With --captioning: question-answer pairs to answer.")
    ] = None,
    beams: Annotated[int, typer.Option("--beams", help="With --captioning: beam width (1: greedy).")] = 3,
) -> None:
    """Any captioned image set (your own domain): every caption against every image, recall@1/5/10 (or, with
    --captioning, how well the captioning decoder describes the images)."""
    if captioning:
        _run_captioning(locals())
        return
    _run(locals(), benchmark=None)


def _run_captioning(options: dict) -> None:
    quiet_libraries()
    from clipsearch.lab.caption_eval import evaluate_captioning, report_lines
    from retrieval.model.beam_search import BeamSettings
    from retrieval.model.caption_writer import open_captioner
    from retrieval.model.device import resolve_device
    from retrieval.store.recorded_model import model_for_index

    spec = model_for_index(options["index_dir"], options["model"], options["pretrained"])
    captioner = open_captioner(spec, options["captioner"], resolve_device(options["device"]))
    report = evaluate_captioning(
        options["annotations"],
        options["images"],
        captioner,
        split=options["split"],
        questions=options["questions"],
        settings=BeamSettings(beams=options["beams"]),
        workers=options["workers"] or 0,
    )
    json_file = options["json_file"]
    if json_file is not None and str(json_file) == "-":
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    typer.echo("\n".join(report_lines(report)))
    if json_file is not None:
        json_file.expanduser().write_text(json.dumps(report.as_dict(), indent=2) + "\n")


def protocols_from(options: dict) -> tuple[str, ...]:
    """Which protocols the flags ask for, headline first."""
    from clipsearch.lab.evaluate import AS_INDEXED, REFERENCE

    if options["both"]:
        return (REFERENCE, AS_INDEXED)
    return (AS_INDEXED,) if options["as_indexed"] else (REFERENCE,)


def _run(options: dict, benchmark: str | None) -> None:
    quiet_libraries()
    from clipsearch.lab.evaluate import EvalSettings, evaluate_annotations
    from retrieval.model.device import resolve_device
    from retrieval.store.recorded_model import model_for_index

    settings = EvalSettings(
        model=model_for_index(options["index_dir"], options["model"], options["pretrained"]),
        prompt=options["prompt"],
        batch_size=options["batch_size"],
        workers=options["workers"],
        device=resolve_device(options["device"]),  # once, here: evaluation takes the Device
        index_dir=options["index_dir"],
        allow_missing=options["allow_missing"],
        protocols=protocols_from(options),
        rerank=options.get("rerank"),
        rerank_model=options.get("rerank_model"),
        hard_negatives=options["annotations"] if options.get("hard_negatives") else None,
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
    faiss = next((run.faiss for run in report.runs if run.faiss is not None), None)
    if faiss is not None and not faiss.agrees:
        raise ClipsearchError(
            f"the index search disagrees with the exact similarity matrix on {faiss.disagreements} captions "
            f"(e.g. {faiss.examples[0]}): this is a bug, please report it"
        )


def report_table(report) -> str:
    """The eval as a small table, recall in percent, one row per direction and protocol."""
    metrics = report.metrics
    ks = list(metrics.t2i)
    split = f", split {report.split}" if report.split else ""
    prompt = f", prompt {report.prompt!r}" if report.prompt else ""
    lines = [
        f"model        {report.model}",
        f"data         {report.source_format}{split}: {metrics.n_images:,} images, {metrics.n_captions:,} captions"
        f"{prompt}",
    ]
    lines += [f"encode       {_encode_line(run)}" for run in report.runs]
    lines += ["", "recall %     protocol     " + "".join(f"{f'R@{k}':>8}" for k in ks)]
    for direction, name in (("t2i", "text→image"), ("i2t", "image→text")):
        for i, run in enumerate(report.runs):
            values = getattr(run.metrics, direction)
            label = name if i == 0 else ""
            lines.append(f"{label:<13}{run.protocol:<13}" + "".join(f"{100 * values[k]:8.2f}" for k in ks))
    for run in report.runs:
        lines.append(f"mean R@1 {100 * run.metrics.mean_r1:.2f}   RSUM {run.metrics.rsum:.1f}   ({run.protocol})")
    lines.append("")
    lines += [_ties_line(run, ks) for run in report.runs]
    for run in report.runs:
        if run.faiss is not None:
            lines.append(_faiss_line(run.faiss))
    for run in report.runs:
        if run.itm is not None:
            lines += [""] + itm_lines(run.itm, ks, run.metrics.t2i)
    return "\n".join(lines)


def itm_lines(itm, ks: list[int], dual_t2i: dict[int, float]) -> list[str]:
    """Re-ranked recall next to the dual encoder's (as indexed), and hard-negative accuracy of both scorers."""
    lines = []
    if itm.rerank_t2i is not None:
        lines += [
            f"re-ranked    the top {itm.depth} by the ITM re-ranker ({100 * itm.ceiling:.1f}% of captions have their "
            f"image there), {itm.rerank_seconds:.1f} s",
            "text→image   scorer       " + "".join(f"{f'R@{k}':>8}" for k in ks),
            "             dual encoder " + "".join(f"{100 * dual_t2i[k]:8.2f}" for k in ks),
            f"             +rerank {itm.depth:<5}" + "".join(f"{100 * itm.rerank_t2i[k]:8.2f}" for k in ks),
        ]
    if itm.hard_negatives is not None:
        kinds = [kind for kind in itm.hard_negatives["clip"] if kind != "all"]
        lines += [
            f"hard negatives: {itm.negative_trials:,} trials (true caption vs a binding variant), accuracy %",
            "             scorer       " + f"{'all':>8}" + "".join(f"{kind:>{len(kind) + 2}}" for kind in kinds),
        ]
        for scorer, accuracy in itm.hard_negatives.items():
            label = "dual encoder" if scorer == "clip" else "ITM"
            cells = f"{100 * accuracy['all']:8.2f}" + "".join(f"{100 * accuracy[k]:{len(k) + 2}.2f}" for k in kinds)
            lines.append(f"             {label:<13}" + cells)
    return lines


def _encode_line(run) -> str:
    if run.images_encoded:
        images = f"{run.images_encoded:,} images encoded in {run.image_seconds:.1f} s"
    else:
        images = "images cached"
    if run.protocol == "reference":
        return f"{run.protocol}: {images}, with their captions" if run.images_encoded else f"{run.protocol}: cached"
    texts = "captions cached" if run.texts_cached else f"captions {run.text_seconds:.1f} s"
    return f"{run.protocol}: {images}, {texts}"


def _ties_line(run, ks) -> str:
    """How many queries' outcome at k hangs on the order of exact ties (topk's, as in clip_benchmark)."""
    ties = run.ties
    if ties.total == 0:
        return f"ties         {run.protocol}: no exact score tie at any cut"
    counts = " ".join(f"{ties.t2i[k]}/{ties.i2t[k]}" for k in ks)
    strict = " ".join(f"{100 * ties.strict_t2i[k]:.2f}/{100 * ties.strict_i2t[k]:.2f}" for k in ks)
    return (
        f"ties         {run.protocol}: queries tied at the cut (text→image/image→text, k={','.join(map(str, ks))}) "
        f"{counts}; recall with ties counted as misses {strict}"
    )


def _faiss_line(faiss) -> str:
    ties = f"; {faiss.float_ties} float32 ties" if faiss.float_ties else ""
    if faiss.agrees:
        return f"index check  FAISS text→image recall equals the exact matrix's{ties}"
    return f"index check  FAISS DISAGREES with the exact matrix on {faiss.disagreements} captions{ties}"
