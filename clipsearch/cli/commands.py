"""The core commands: index, search, similar, info. Each is one library call plus printing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipsearch.cli.app import app, quiet_libraries, user_errors
from clipsearch.cli.options import (
    AddOption,
    BF16TextOption,
    DeviceOption,
    IndexBatchOption,
    IndexOption,
    IndexTypeOption,
    KeywordsOption,
    KOption,
    MaxMemoryOption,
    MinScoreOption,
    ModelOption,
    NoWaitOption,
    PretrainedOption,
    ServerOption,
    SortOption,
    SubOption,
    TextMatchOption,
    WorkersOption,
    filter_options,
    output_options,
)
from clipsearch.cli.output import FOR_LISTS, FOR_REPORTS, Output, Report, emit, line, results_report
from retrieval.model.device import resolve_device
from retrieval.search.arguments import check_query
from retrieval.store.filters import Filters
from retrieval.store.layout import resolve_index_dir


@app.command()
@user_errors
def index(
    paths: Annotated[list[Path] | None, typer.Argument(help="Folders to index; none: refresh all known.")] = None,
    index_dir: IndexOption = None,
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    batch_size: IndexBatchOption = None,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    no_wait: NoWaitOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    index_type: IndexTypeOption = None,
    max_memory: MaxMemoryOption = None,
    int8: Annotated[
        bool,
        typer.Option("--int8", help="CPU only: dynamic int8 image encoder (faster; vectors differ slightly)."),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Keep running: index new, changed, moved and deleted photos within seconds."),
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Encode on a Ray cluster: auto (start a local one) or its ADDRESS. Needs clipsearch[ray] and the "
            "folders at the same path on every node (docs/scale.md).",
            show_default=False,
        ),
    ] = None,
    ray_gpus_per_worker: Annotated[
        float, typer.Option("--ray-gpus-per-worker", help="GPUs each Ray encoder actor holds (0: CPU actors).")
    ] = 0.0,
    ray_workers: Annotated[
        int | None,
        typer.Option("--ray-workers", help="Ray encoder actors (default: one per GPU, at least one).", min=1),
    ] = None,
    ocr: Annotated[
        bool | None,
        typer.Option(
            "--ocr/--no-ocr",
            help="Read the text printed in photos, so searches find it (kept for later runs; needs clipsearch[ocr]).",
            show_default=False,
        ),
    ] = None,
    captions: Annotated[
        bool | None,
        typer.Option(
            "--captions/--no-captions",
            help="Write a caption for each photo with the captioning decoder, so searches find it (kept for later "
            "runs; `clipsearch train-captioner` makes one).",
            show_default=False,
        ),
    ] = None,
    captioner: Annotated[
        Path | None,
        typer.Option(
            "--captioner",
            help="Captioning model folder for --captions (kept; default: FOLDER-cap beside --model local-dir:FOLDER).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Index folders of images (only what changed since the last run)."""
    from indexer.early_encoder import open_encoder_early
    from indexer.preflight import check_folders
    from retrieval.store.recorded_model import model_for_index

    device = resolve_device(device)  # once, here: everything below takes the Device
    index_dir = resolve_index_dir(index_dir)
    check_folders(index_dir, paths or [])  # before torch and the model load
    quiet_libraries()
    spec = model_for_index(index_dir, model, pretrained)
    if ray is None and paths:  # a new index: its session builds while the indexer imports (indexer.early_encoder)
        open_encoder_early(index_dir, spec, device, int8)
    from indexer.pipeline import IndexSettings, index_paths
    from indexer.ray_runner import RaySettings
    from retrieval.store.index_types import parse_memory

    settings = IndexSettings(
        model=spec,
        batch_size=batch_size,
        workers=workers,
        device=device,
        wait_for_lock=not no_wait,
        index_type=index_type,
        max_memory=parse_memory(max_memory),
        int8=int8,
        ray=RaySettings(ray, ray_gpus_per_worker, ray_workers) if ray else None,
        ocr=ocr,
        captions=captions,
        captioner=captioner,
    )
    if watch:
        _watch(index_dir, paths or [], settings, progress=not quiet)
        return
    summary = index_paths(
        index_dir,
        paths or [],
        settings,
        progress=not quiet,
        on_wait=lambda message: typer.echo(f"clipsearch: {message}", err=True),
        on_export=announce_export,
    )
    _report_run(summary)


def announce_export() -> None:
    typer.echo(
        "clipsearch: exporting the text tower for fast torch-free queries (once per model; "
        "CLIPSEARCH_EXPORT_TEXT=0 skips it)...",
        err=True,
    )


def _report_run(summary) -> None:
    for warning in summary.warnings:
        typer.echo(f"clipsearch: {warning}", err=True)
    typer.echo(summary.line())
    for note in (summary.vectors_note, summary.text_note, summary.caption_note):
        if note:
            typer.echo(note)
    for note in (summary.text_tower_note, summary.image_tower_note):
        if note:
            typer.echo(f"clipsearch: {note}", err=True)


def _watch(index_dir: Path, paths: list[Path], settings, progress: bool) -> None:
    """``index --watch``: a first run, then one run per debounced batch of file events, until Ctrl-C."""
    import threading

    from indexer.watch import FolderWatcher

    def on_batch(summary) -> None:
        if watcher.batches == 0 or summary.added + summary.updated + summary.moved + summary.removed + summary.failed:
            _report_run(summary)
        if watcher.batches == 0:
            typer.echo("clipsearch: watching for changes (Ctrl-C stops)", err=True)

    watcher = FolderWatcher(
        index_dir,
        paths,
        settings,
        on_batch=on_batch,
        on_error=lambda message: typer.echo(f"clipsearch: {message}", err=True),
    )
    try:
        watcher.run(threading.Event(), first_progress=progress)
    except KeyboardInterrupt:
        typer.echo("clipsearch: stopped watching; work committed so far is kept", err=True)


def _query(main, add, sub, sort, keywords, filters: Filters, text_match: bool | None = None):
    """The CLI's arguments as the one query model (retrieval.search.query)."""
    from retrieval.search.query import Query

    return Query.of(main, add or (), sub or (), filters, sort, keywords, text_match)


def _echo(base: dict, query, min_score: float | None = None) -> dict:
    """What --json repeats of the query: the main term and k, plus whatever else was asked."""
    full = query.to_dict()
    base = base | ({"min_score": min_score} if min_score is not None else {})
    extras = {"add": full["positive"][1:], "sub": full["negative"], "filters": full["filters"]}
    extras |= {"sort": query.sort} if query.sort != "relevance" else {}
    extras |= {"keywords": query.keywords} if query.keywords is not None else {}
    extras |= {"text_match": query.text_match} if query.text_match is not None else {}
    return base | {key: value for key, value in extras.items() if value}


@app.command()
@user_errors
@filter_options
@output_options(FOR_LISTS)
def search(
    text: Annotated[str, typer.Argument(help="What to look for, in words.")],
    index_dir: IndexOption = None,
    k: KOption = 10,
    min_score: MinScoreOption = None,
    add: AddOption = None,
    sub: SubOption = None,
    filters: Filters = Filters(),  # filter_options: one option per field
    sort: SortOption = "relevance",
    keywords: KeywordsOption = None,
    text_match: TextMatchOption = None,
    output: Output = Output(),  # output_options: --format and its aliases
    device: DeviceOption = "auto",
    server: ServerOption = None,
    bf16_text: BF16TextOption = False,
    rerank: Annotated[
        int | None,
        typer.Option(
            "--rerank",
            help="Re-order the best N with the ITM re-ranker (one text query; score becomes its match probability).",
        ),
    ] = None,
    rerank_model: Annotated[
        Path | None,
        typer.Option("--rerank-model", help="Re-ranker folder (default: FOLDER-itm beside a local-dir:FOLDER model)."),
    ] = None,
    force_rerank: Annotated[
        bool, typer.Option("--force-rerank", help="Use a re-ranker even if it validated worse than CLIP alone.")
    ] = False,
) -> None:
    """Find images matching a text description (plus --add, minus --sub), within the filters."""
    device = resolve_device(device)
    check_query(min_score, filters.under)  # before anything slow: the model, the index
    quiet_libraries()
    from retrieval.search.client import open_searcher

    query = _query(text, add, sub, sort, keywords, filters, text_match)
    with open_searcher(resolve_index_dir(index_dir), device, server, bf16_text, rerank_model, force_rerank) as searcher:
        results = searcher.search(query, k=k, min_score=min_score, rerank=rerank)
    echoed = {"text": text, "k": k} | ({"rerank": rerank} if rerank else {})
    emit(results_report(results, _echo(echoed, query, min_score)), output)


@app.command()
@user_errors
@filter_options
@output_options(FOR_LISTS)
def similar(
    image: Annotated[Path, typer.Argument(help="An image file (indexed or not).")],
    index_dir: IndexOption = None,
    k: KOption = 10,
    min_score: MinScoreOption = None,
    add: AddOption = None,
    sub: SubOption = None,
    filters: Filters = Filters(),  # filter_options: one option per field
    sort: SortOption = "relevance",
    output: Output = Output(),  # output_options: --format and its aliases
    device: DeviceOption = "auto",
    server: ServerOption = None,
) -> None:
    """Find images that look like IMAGE (plus --add, minus --sub); IMAGE itself is left out."""
    device = resolve_device(device)
    check_query(min_score, filters.under, image)  # before anything slow: the model, the index
    quiet_libraries()
    from retrieval.search.client import open_searcher
    from retrieval.search.query import Term

    query = _query(Term(path=str(image)), add, sub, sort, False, filters)
    with open_searcher(resolve_index_dir(index_dir), device, server) as searcher:
        results = searcher.search(query, k=k, min_score=min_score)
    emit(results_report(results, _echo({"image": str(image), "k": k}, query, min_score)), output)


@app.command()
@user_errors
@output_options(FOR_REPORTS)
def info(
    index_dir: IndexOption = None,
    failed: Annotated[bool, typer.Option("--failed", help="List files that could not be indexed.")] = False,
    output: Output = Output(),  # output_options: --format and its aliases
    device: DeviceOption = "auto",
) -> None:
    """Show the model, image count, folders, failures and size of an index, and what answers text queries."""
    from retrieval.search.info import index_info

    device = resolve_device(device)
    emit(info_report(index_info(resolve_index_dir(index_dir), with_failures=failed, device=device)), output)


@app.command(name="text")
@user_errors
@output_options(FOR_REPORTS)
def text_command(
    photo: Annotated[Path, typer.Argument(help="An indexed photo.")],
    index_dir: IndexOption = None,
    output: Output = Output(),  # output_options: --format and its aliases
) -> None:
    """Print the text read in PHOTO (index --ocr): each line, with its confidence."""
    from retrieval.search.info import photo_text

    found = photo_text(resolve_index_dir(index_dir), photo)
    table = [line("{:.2f}  {}", item["confidence"] or 0.0, item["text"]) for item in found.text.lines]
    if found.text.status is None:
        empty = "no text read yet: `clipsearch index --ocr` reads the text in photos"
    elif found.text.error:
        empty = f"could not read text: {found.text.error}"
    else:
        empty = "no text found in this photo"
    emit(Report(document=found.to_dict(), table=table, empty=empty), output)


def info_report(details) -> Report:
    state = "current" if details.vectors_current else "stale (rebuilt on next use)"
    table = [
        line("index:   {}", str(details.index_dir)),
        line("model:   {}", details.model or "(none yet)"),
        line("images:  {} indexed, {} failed", details.images, details.failed),
        line(
            "vectors: {} ({}), dim {}, {}", details.index_type, details.index_type_requested, details.embed_dim, state
        ),
    ]
    if details.recall_at_10 is not None:
        table.append(
            line(
                "recall:  {:.3f} recall@10 against exact search ({} {} queries, measured when built)",
                details.recall_at_10,
                details.recall_queries,
                details.recall_query_kind,
            )  # fmt: skip
        )
    table += [
        line("text:    {}", details.text_queries or "(no model yet)"),
        line("encode:  {}", details.image_encoding or "(no model yet)"),
        line(
            "ocr:     {}; {} photos with text, of {} read ({} failed)",
            "on" if details.ocr else "off",
            details.with_text,
            details.text_read,
            details.text_failed,
        ),
        line("size:    {:.1f} MB", details.size_bytes / 1e6),
        line("folders: {}", ", ".join(details.roots) or "(none)"),
    ]
    table += [line("failed:  {}: {}", path, reason) for path, reason in details.failures]
    return Report(document=details.to_dict(), table=table)
