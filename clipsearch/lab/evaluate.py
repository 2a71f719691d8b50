"""Run a retrieval eval: the reference protocol (clip_benchmark's), the engine as indexed, or both.

``reference`` (the default) embeds the set as LAION clip_benchmark does (``clipsearch.lab.reference``: Pillow at
full resolution, the model's own transform, float32) and scores it with clip_benchmark's own rule
(``metrics.reference_recall``): its figures are clip_benchmark's.

``as-indexed`` measures what the search engine returns. Image embeddings come from ``indexer.pipeline.index_paths``
(the draft JPEG decode, EXIF rotation and float16 storage of ``clipsearch index``) into an eval index folder; the
set's images are staged there first (hard links, copies across file systems), so the index holds exactly the
evaluated images. Captions are embedded by the engine's encoder. The figures use the same rule as the reference,
and text→image recall is computed a second time from the engine's FAISS search (``search_vectors``): the two must
agree except where two scores tie to within float32 rounding. Anything else is reported.

Both protocols cache what they encode: a second run with the same model encodes nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.lab.datasets import CaptionedSet, DatasetError, flickr30k_test_problems, load_captioned_set
from clipsearch.lab.metrics import (
    DEFAULT_KS,
    RetrievalMetrics,
    TieReport,
    recall_from_ranks,
    reference_recall,
    text_to_image_ranks,
)
from retrieval.atomic import atomic_write
from retrieval.errors import UsageError
from retrieval.model.device import Device, resolve_device
from retrieval.model.spec import ModelSpec
from retrieval.unit import unit_rows

STAGE_FOLDER = "eval-images"
TEXT_CACHE_FOLDER = "eval-texts"
REFERENCE_CACHE_FOLDER = "reference"
# FAISS scores in float32; a ranking decided by less than this is a tie, not a disagreement.
TIE_TOLERANCE = 1e-5
BENCHMARKS = ("flickr30k",)
REFERENCE = "reference"
AS_INDEXED = "as-indexed"
PROTOCOLS = (REFERENCE, AS_INDEXED)


@dataclass(frozen=True)
class EvalSettings:
    """How to run an eval; ``index_dir`` None means a cache folder keyed by images, model and image set.

    ``protocols``: which measurements, in order; the first is the headline (``metrics`` in the JSON).
    ``batch_size`` 64 is clip_benchmark's default: the reference's float32 vectors depend on the batching.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    ks: tuple[int, ...] = DEFAULT_KS
    prompt: str = ""
    batch_size: int = 64
    workers: int | None = None
    device: Device | str = "auto"  # a string is resolved once, by evaluate
    index_dir: Path | None = None
    allow_missing: bool = False
    protocols: tuple[str, ...] = (REFERENCE,)
    rerank: int | None = None  # also re-rank each caption's top N with the ITM re-ranker (as-indexed runs)
    rerank_model: Path | None = None  # its folder; None: FOLDER-itm beside a local-dir:FOLDER model
    hard_negatives: Path | None = None  # annotations with binding hard negatives: both scorers' accuracy on them


@dataclass(frozen=True)
class FaissCheck:
    """Text→image recall@k from the engine's FAISS search, and where it differs from the exact matrix."""

    t2i: dict[int, float]
    disagreements: int  # captions whose hit/miss differs at some k by more than a float32 tie
    float_ties: int  # captions whose hit/miss differs only because two scores tie within TIE_TOLERANCE
    examples: tuple[str, ...] = ()

    @property
    def agrees(self) -> bool:
        return self.disagreements == 0

    def as_dict(self) -> dict:
        return {
            "agrees": self.agrees,
            **{f"image_retrieval_recall@{k}": v for k, v in self.t2i.items()},
            "disagreements": self.disagreements,
            "float_ties": self.float_ties,
            "examples": list(self.examples),
        }


@dataclass(frozen=True)
class ProtocolRun:
    """One protocol's figures, its exact ties, and what it encoded (``encoded`` 0: everything was cached)."""

    protocol: str
    metrics: RetrievalMetrics
    ties: TieReport
    images_encoded: int
    image_seconds: float
    text_seconds: float
    texts_cached: bool
    faiss: FaissCheck | None = None  # as-indexed only
    itm: Any = None  # clipsearch.lab.itm_eval.ItmEvalReport: as-indexed, when re-ranking or hard negatives are asked

    def as_dict(self) -> dict:
        out = {
            "metrics": self.metrics.as_dict(),
            "ties": self.ties.as_dict(),
            "encode": {
                "images_encoded": self.images_encoded,
                "image_seconds": round(self.image_seconds, 3),
                "text_seconds": round(self.text_seconds, 3),
                "texts_cached": self.texts_cached,
            },
        }
        if self.faiss is not None:
            out["faiss_check"] = self.faiss.as_dict()
        if self.itm is not None:
            out["itm"] = self.itm.as_dict()
        return out


@dataclass(frozen=True)
class EvalReport:
    runs: tuple[ProtocolRun, ...]
    model: str
    source_format: str
    split: str | None
    prompt: str
    index_dir: Path
    problems: tuple[str, ...] = ()

    @property
    def headline(self) -> ProtocolRun:
        return self.runs[0]

    @property
    def metrics(self) -> RetrievalMetrics:
        """The first protocol's figures (the reference unless only ``as-indexed`` was asked for)."""
        return self.runs[0].metrics

    def run(self, protocol: str) -> ProtocolRun | None:
        return next((run for run in self.runs if run.protocol == protocol), None)

    def as_dict(self) -> dict:
        """clip_benchmark's layout (``metrics`` under its names, and ours) for the first protocol; every protocol
        under ``protocols``; plus what this run did."""
        return {
            "task": "zeroshot_retrieval",
            "dataset": self.source_format,
            "split": self.split,
            "model": self.model,
            "prompt": self.prompt,
            "protocol": self.headline.protocol,
            **self.headline.as_dict(),
            "protocols": {run.protocol: run.as_dict() for run in self.runs},
            "index_dir": str(self.index_dir),
            "problems": list(self.problems),
        }


def evaluate_annotations(
    annotations: Path,
    images_dir: Path,
    settings: EvalSettings,
    split: str | None = None,
    split_file: Path | None = None,
    benchmark: str | None = None,
    progress: bool = True,
) -> EvalReport:
    """Load a captioned set, check it against ``benchmark`` (``flickr30k``: the 1K test split), evaluate it."""
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {benchmark!r}: use one of {', '.join(BENCHMARKS)}")
    captioned = load_captioned_set(annotations, images_dir, split, split_file, settings.allow_missing)
    problems: list[str] = []
    if benchmark == "flickr30k" and split in (None, "all", "test"):
        problems = flickr30k_test_problems(captioned)
        if problems and not settings.allow_missing:
            raise DatasetError(
                f"this is not the Flickr30K 1K test split: {'; '.join(problems)}. Its numbers would not compare "
                f"with published ones: check --annotations/--split, pass --allow-missing to evaluate anyway, or "
                f"use `clipsearch eval captions` for a set of your own"
            )
    report = evaluate(captioned, settings, progress)
    return replace(report, split=split, problems=tuple(problems) + report.problems)


def evaluate(captioned: CaptionedSet, settings: EvalSettings, progress: bool = True) -> EvalReport:
    """Run each of ``settings.protocols`` on the set (each cached) and report them in that order."""
    if not captioned.items:
        raise DatasetError("the captioned set is empty")
    unknown = [p for p in settings.protocols if p not in PROTOCOLS]
    if unknown or not settings.protocols:
        raise UsageError(f"unknown eval protocol {unknown[:1]}: use {' or '.join(PROTOCOLS)}")
    index_dir = (settings.index_dir or default_eval_dir(captioned, settings.model)).expanduser().resolve()
    settings = replace(settings, device=resolve_device(settings.device))  # the public entry: resolved here once
    if (settings.rerank or settings.hard_negatives) and AS_INDEXED not in settings.protocols:
        settings = replace(settings, protocols=settings.protocols + (AS_INDEXED,))  # re-ranking reads the index
    runs, problems, model = [], [], settings.model.describe()
    for protocol in settings.protocols:
        if protocol == REFERENCE:
            run, model, dropped = _reference_run(captioned, settings, index_dir, progress)
        else:
            run, model, dropped = _as_indexed_run(captioned, settings, index_dir, progress)
        runs.append(run)
        problems += [note for note in dropped if note not in problems]
    return EvalReport(
        runs=tuple(runs),
        model=model,
        source_format=captioned.source_format,
        split=None,
        prompt=settings.prompt,
        index_dir=index_dir,
        problems=tuple(problems),
    )


def _reference_run(captioned: CaptionedSet, settings: EvalSettings, index_dir: Path, progress: bool):
    """clip_benchmark's protocol; undecodable images are an error, or (``allow_missing``) left out of the set."""
    from clipsearch.lab.reference import reference_embeddings

    def embed(subset: CaptionedSet):
        return reference_embeddings(
            subset,
            settings.model,
            index_dir / REFERENCE_CACHE_FOLDER,
            settings.prompt,
            settings.batch_size,
            _reference_workers(settings),
            settings.device,
            progress,
        )

    embedded, dropped = embed(captioned), []
    if embedded.failed:
        reasons = [f"{captioned.items[i].path.name} ({reason})" for i, reason in embedded.failed[:3]]
        note = f"{len(embedded.failed):,} images could not be decoded, e.g. {', '.join(reasons)}"
        if not settings.allow_missing:
            raise DatasetError(f"{note}: pass --allow-missing to evaluate without them")
        bad = {i for i, _ in embedded.failed}
        kept = tuple(item for i, item in enumerate(captioned.items) if i not in bad)
        if not kept:
            raise DatasetError(f"{note}: nothing left to evaluate")
        # clip_benchmark on the kept images batches them afresh: so do we
        embedded, dropped = embed(CaptionedSet(kept, captioned.source_format, captioned.missing)), [note]
    metrics, ties = reference_recall(
        embedded.texts, embedded.images, embedded.owners, settings.ks, settings.batch_size, settings.device.torch_name
    )
    encoded = 0 if embedded.cached else len(embedded.images)
    run = ProtocolRun(REFERENCE, metrics, ties, encoded, embedded.seconds, 0.0, embedded.cached)
    return run, embedded.model, dropped


def _reference_workers(settings: EvalSettings) -> int:
    from indexer.pipeline import default_workers

    return default_workers(settings.device) if settings.workers is None else settings.workers


def _as_indexed_run(captioned: CaptionedSet, settings: EvalSettings, index_dir: Path, progress: bool):
    """Index the set's images (cached), embed its captions (cached), score them, and check the FAISS search."""
    from indexer.pipeline import IndexSettings, index_paths
    from retrieval.search.engine import SearchEngine

    _refuse_foreign_index(index_dir)
    staged = stage_images(captioned, index_dir / STAGE_FOLDER)
    index_settings = IndexSettings(  # eval measures the torch text tower (the export has its own check)
        model=settings.model,
        batch_size=settings.batch_size,
        workers=settings.workers,
        device=settings.device,
        export_text=False,
    )
    summary = index_paths(index_dir, [index_dir / STAGE_FOLDER], index_settings, progress=progress)
    with SearchEngine(
        index_dir, device=settings.device, model=settings.model, rerank_model=settings.rerank_model
    ) as engine:
        captioned, staged, dropped = _drop_undecodable(engine, captioned, staged, settings.allow_missing)
        texts, owners = captioned.captions_and_owners(settings.prompt)
        image_emb = engine.vectors_for_paths(staged)
        started = time.perf_counter()
        text_emb, cached = _text_embeddings(engine, texts, index_dir / TEXT_CACHE_FOLDER)
        text_seconds = time.perf_counter() - started
        owners_array = np.asarray(owners, dtype=np.int64)
        metrics, ties = reference_recall(
            text_emb, unit_rows(image_emb), owners_array, settings.ks, settings.batch_size, settings.device.torch_name
        )
        image_ids = _ids_of(engine, staged)
        faiss = check_faiss_search(engine, text_emb, image_emb, owners_array, image_ids, settings.ks, texts)
        model = engine.identity.describe() if engine.identity else settings.model.describe()
        itm = None
        if settings.rerank or settings.hard_negatives:
            from clipsearch.lab.itm_eval import evaluate_itm

            itm = evaluate_itm(
                engine, captioned, staged, text_emb, image_emb, owners_array, settings.ks, settings.rerank,
                settings.hard_negatives,
            )  # fmt: skip
    run = ProtocolRun(AS_INDEXED, metrics, ties, summary.encoded, summary.seconds, text_seconds, cached, faiss, itm)
    return run, model, dropped


def check_faiss_search(
    engine,
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    owners: np.ndarray,
    image_ids: np.ndarray,
    ks=DEFAULT_KS,
    texts: list[str] | None = None,
    batch: int = 1024,
) -> FaissCheck:
    """Text→image recall@k from ``engine.search_vectors``, compared caption by caption with the exact ranks."""
    depth = max(ks)
    faiss_rank = np.full(len(text_emb), depth, dtype=np.int64)  # depth = not found in the top `depth`
    for start in range(0, len(text_emb), batch):
        results = engine.search_vectors(text_emb[start : start + batch], depth)
        for offset, hits in enumerate(results):
            wanted = image_ids[owners[start + offset]]
            faiss_rank[start + offset] = next((r.rank - 1 for r in hits if r.image_id == wanted), depth)
    exact_rank = text_to_image_ranks(text_emb, image_emb, owners)
    ties, real, examples = 0, 0, []
    for caption in np.flatnonzero(np.minimum(faiss_rank, depth) != np.minimum(exact_rank, depth)):
        differs = [k for k in ks if (faiss_rank[caption] < k) != (exact_rank[caption] < k)]
        if not differs:
            continue
        if all(_is_float_tie(text_emb, image_emb, owners, caption, k) for k in differs):
            ties += 1
            continue
        real += 1
        if len(examples) < 3:
            label = repr(texts[caption][:60]) if texts else f"caption #{caption}"
            examples.append(f"{label}: exact rank {exact_rank[caption] + 1}, FAISS rank {faiss_rank[caption] + 1}")
    return FaissCheck(recall_from_ranks(faiss_rank, ks), real, ties, tuple(examples))


def _is_float_tie(text_emb, image_emb, owners, caption: int, k: int) -> bool:
    """Whether the caption's image and the k-th best other image score the same to within float32 rounding."""
    scores = unit_rows(image_emb, np.float64) @ unit_rows(text_emb[caption : caption + 1], np.float64)[0]
    own = scores[owners[caption]]
    others = np.sort(np.delete(scores, owners[caption]))[::-1]
    return k <= len(others) and abs(own - others[k - 1]) <= TIE_TOLERANCE


# --- the eval folder ---------------------------------------------------------------------------------------


def eval_cache_root() -> Path:
    """``$XDG_CACHE_HOME/clipsearch/eval`` (``~/.cache/clipsearch/eval`` when unset)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "clipsearch" / "eval"


def default_eval_dir(captioned: CaptionedSet, model: ModelSpec) -> Path:
    """One folder per (images folder, model, image set): another split or model never evicts this one."""
    from retrieval.model.spec import spec_key

    root = _images_root(captioned)
    digest = hashlib.sha256(f"{root}\n{spec_key(model)}\n".encode())
    for item in captioned.items:
        digest.update(f"{item.path.relative_to(root)}\n".encode())
    return eval_cache_root() / f"{root.name or 'images'}-{digest.hexdigest()[:16]}"


def stage_images(captioned: CaptionedSet, stage_dir: Path) -> list[Path]:
    """Make ``stage_dir`` hold exactly the set's images (hard links, else copies); their staged paths, in order."""
    root = _images_root(captioned)
    stage_dir.mkdir(parents=True, exist_ok=True)
    staged = [stage_dir / item.path.relative_to(root) for item in captioned.items]
    wanted = {str(path) for path in staged}
    for current, _, files in os.walk(stage_dir):
        for name in files:
            if os.path.join(current, name) not in wanted:
                os.remove(os.path.join(current, name))
    for item, target in zip(captioned.items, staged):
        _link_or_copy(item.path, target)
    return staged


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        same = os.path.samefile(source, target)
        source_stat, target_stat = source.stat(), target.stat()
        if same or (source_stat.st_size, source_stat.st_mtime_ns) == (target_stat.st_size, target_stat.st_mtime_ns):
            return
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _images_root(captioned: CaptionedSet) -> Path:
    return Path(os.path.commonpath([str(item.path.parent) for item in captioned.items]))


def _refuse_foreign_index(index_dir: Path) -> None:
    """An eval index holds only its staged images: never add them to (or measure against) a photo index."""
    from retrieval.store.catalog import Catalog
    from retrieval.store.layout import IndexLayout

    layout = IndexLayout(index_dir)
    if not layout.exists():
        return
    catalog = Catalog(layout.catalog, create=False)
    try:
        others = [root for root in catalog.roots() if Path(root) != index_dir / STAGE_FOLDER]
    finally:
        catalog.close()
    if others:
        raise UsageError(
            f"{index_dir} already indexes other folders ({others[0]}): give the eval an --index folder of its own"
        )


def _drop_undecodable(engine, captioned: CaptionedSet, staged: list[Path], allow_missing: bool):
    """Images the indexer could not decode: an error, or (``allow_missing``) dropped with a note."""
    from retrieval.store.catalog import STATUS_OK

    rows = engine.catalog.rows_by_paths([str(path) for path in staged])
    bad = [i for i, path in enumerate(staged) if str(path) not in rows or rows[str(path)].status != STATUS_OK]
    if not bad:
        return captioned, staged, []
    reasons = [f"{captioned.items[i].path.name} ({_reason(rows.get(str(staged[i])))})" for i in bad[:3]]
    note = f"{len(bad):,} images could not be decoded, e.g. {', '.join(reasons)}"
    if not allow_missing:
        raise DatasetError(f"{note}: pass --allow-missing to evaluate without them")
    keep = [i for i in range(len(staged)) if i not in set(bad)]
    kept = CaptionedSet(tuple(captioned.items[i] for i in keep), captioned.source_format, captioned.missing)
    return kept, [staged[i] for i in keep], [note]


def _reason(row) -> str:
    return (row.error or "failed") if row is not None else "not indexed"


def _ids_of(engine, staged: list[Path]) -> np.ndarray:
    rows = engine.catalog.rows_by_paths([str(path) for path in staged])
    return np.array([rows[str(path)].id for path in staged], dtype=np.int64)


def _text_embeddings(engine, texts: list[str], cache_dir: Path) -> tuple[np.ndarray, bool]:
    """Caption embeddings, cached per (model, captions): a repeated eval need not load the model at all."""
    identity = engine.identity
    digest = hashlib.sha256(identity.key().encode() if identity else b"")
    for text in texts:
        digest.update(text.encode() + b"\0")
    path = cache_dir / f"{digest.hexdigest()[:24]}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape[0] == len(texts):
            return cached, True
    embeddings = engine.encoder.encode_texts(texts).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, embeddings), durable=False)
    return embeddings, False
