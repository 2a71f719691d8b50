"""Index folders: scan, diff against the catalog, decode in workers, encode in batches, commit in chunks.

Each chunk is one SQLite transaction (rows + embeddings), so an interrupted run keeps what it committed and the
next run resumes where it stopped: committed files are unchanged on disk and are skipped.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from indexer.caption_pass import BATCH as CAPTION_BATCH
from indexer.caption_pass import run_caption_pass
from indexer.encoding import Chunk, ChunkSink, EncodedChunkSource
from indexer.ingest import insert_new_rows
from indexer.ocr_pass import COMMIT_EVERY, run_ocr_pass
from indexer.overlap import EncodeOptions, OverlappedSource
from indexer.plan import Plan, plan_changes
from indexer.ray_runner import RaySettings, RaySource
from indexer.reindex import apply_index_type, builds_at_end, rebuild_as
from indexer.scan import resolve_folder, scan_folder
from retrieval.errors import DiskFullError, Interrupted, ModelLoadError, UsageError
from retrieval.faults import fault_point
from retrieval.image_meta import read_image_meta
from retrieval.images import hash_file
from retrieval.model.caption_folder import caption_folder, require_captioner
from retrieval.model.device import Device, resolve_device
from retrieval.model.encoder import Encoder
from retrieval.model.image_onnx import (
    ONNX,
    TORCH,
    ExportedImageTower,
    ImageEncoder,
    cached_image_tower,
    choose_image_backend,
    indexing_encoder,
)
from retrieval.model.ocr import require_ocr
from retrieval.model.pixels import SquareCrop, crop_for
from retrieval.model.spec import ModelIdentity, ModelSpec, check_spec, spec_key
from retrieval.model.text_encoder import BackendChoice
from retrieval.store.catalog import STATUS_FAILED, STATUS_OK, Catalog, ImageRow, MetaKey, encode_embedding, is_under
from retrieval.store.index_types import check_index_type
from retrieval.store.keywords import fill_keywords
from retrieval.store.layout import IndexLayout
from retrieval.store.sync import faiss_file_current, open_vectors, recorded_type, save_vectors
from retrieval.store.vectors import VectorIndex
from retrieval.store.write_lock import write_lock
from retrieval.unit import unit_rows


@dataclass(frozen=True)
class IndexSettings:
    """How to index; the defaults suit a laptop CPU, and a GPU where one is used."""

    model: ModelSpec = field(default_factory=ModelSpec)
    batch_size: int | None = None  # None: 16 with the ONNX image tower, 32 with torch on the CPU, 256 on CUDA
    workers: int | None = None  # None: one per core, at most 4
    device: Device | str = "auto"  # a string (auto, cpu, cuda) is resolved once, by index_paths
    chunk_size: int = 256  # files per catalog transaction
    wait_for_lock: bool = True
    save_every_s: float = 120.0  # also save the FAISS file during long runs
    index_type: str | None = None  # auto, flat, ivf, ivfpq or hnsw; None keeps the index's own (new: auto)
    max_memory: int | None = None  # bytes auto may plan with; None keeps the recorded budget (default: RAM / 2)
    int8: bool = False  # CPU only: int8 image encoder, faster, slightly different vectors (opt-in): the cached ONNX
    # tower's int8 graph when the export kept one, else torch's dynamic int8
    ray: RaySettings | None = None  # encode on a Ray cluster (indexer.ray_runner); None: on this machine
    export_text: bool = True  # after a run that encoded images: export the text tower if missing or stale
    ocr: bool | None = None  # read the text in photos (indexer.ocr_pass); None keeps the index's own (new: off)
    captions: bool | None = None  # write a caption per image (indexer.caption_pass); None keeps the index's own
    captioner: Path | None = None  # the decoder folder (None: the recorded one, else FOLDER-cap beside the model)
    export_image: bool | None = None  # after a run that encoded images: export the image tower to the per-model
    # cache if missing (then record it), so later runs encode with ONNX Runtime; None: on the CPU only


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    encoded: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    vectors_note: str | None = None  # set when the run rebuilt the vector index as another type
    text_tower_note: str | None = None  # what the text-tower export after the run did, when it did something
    image_tower_note: str | None = None  # the same for the image tower (indexer.image_export)
    encode_seconds: float = 0.0  # decoding + encoding + committing, without the model load (steady throughput)
    unchanged_failed: int = 0  # of ``unchanged``: files that failed before and were not retried
    text_note: str | None = None  # set when the OCR pass read photos (indexer.ocr_pass)
    caption_note: str | None = None  # set when the caption pass wrote captions (indexer.caption_pass)

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """Failed counts every file that is failed now (what `clipsearch info` counts), new ones in brackets."""
        failed = f"{self.failed + self.unchanged_failed}"
        if self.unchanged_failed:
            failed += f" ({self.failed} new)"
        return (
            f"added {self.added}, updated {self.updated}, moved {self.moved}, removed {self.removed}, "
            f"unchanged {self.unchanged - self.unchanged_failed}, failed {failed} in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s)"
        )


def index_paths(
    index_dir: Path,
    paths: Sequence[Path],
    settings: IndexSettings,
    progress: bool = True,
    on_wait: Callable[[str], None] | None = None,
    on_export: Callable[[], None] | None = None,
) -> IndexSummary:
    """Bring the index in step with the folders (all known folders when ``paths`` is empty); after a run that
    encoded images, export the text tower for torch-free queries when it is missing or stale (the CLI and this
    API do the same; ``settings.export_text=False`` skips it).

    ``on_wait`` hears why the run pauses when another process holds the write lock; ``on_export``, that a text
    tower export is starting (it takes a while for a large model).
    """
    started = time.perf_counter()
    settings = replace(settings, device=resolve_device(settings.device))  # the public entry: resolved here once
    layout = IndexLayout(Path(index_dir))
    folders = [resolve_folder(Path(p)) for p in paths]
    if settings.batch_size is not None and settings.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if settings.index_type is not None:
        check_index_type(settings.index_type)
    if settings.ocr:
        require_ocr()  # one line on how to install it, before any work
    if settings.captions:
        require_captioner(caption_folder(settings.model, settings.captioner))  # the same, for the decoder
    try:
        with write_lock(layout, settings.wait_for_lock, on_wait):
            summary = _index_locked(layout, folders, settings, progress)
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(
            f"the disk holding {layout.root} is full: the index is intact up to the last committed chunk; "
            f"free some space and run `clipsearch index` again to continue"
        ) from None
    summary.seconds = time.perf_counter() - started  # the indexing itself; the export is reported on its own
    if summary.encoded and settings.export_text:
        from indexer.text_export import refresh_text_tower

        summary.text_tower_note = refresh_text_tower(layout.root, on_wait=on_wait, on_export=on_export)
    if summary.encoded and _exports_image(settings):
        from indexer.image_export import refresh_image_tower

        summary.image_tower_note = refresh_image_tower(layout.root, on_wait=on_wait)
    return summary


def _exports_image(settings: IndexSettings) -> bool:
    if settings.export_image is None:
        return not settings.device.is_cuda and settings.ray is None
    return settings.export_image


def preload_encoder(settings: IndexSettings) -> None:
    """Load the model a run with ``settings`` encodes with, now: `index --watch` and `serve --watch` call it after
    their first run, so the first photo copied in is searchable in the time it takes to encode, not to load a
    model (one load per process: ``Encoder.load``, ``shared_image_encoder``)."""
    if settings.model.random_weights:
        return  # random weights are refused by the run itself, with its message
    device = resolve_device(settings.device)
    ImageEncoding.choose(settings, device).load()


@dataclass(frozen=True)
class ImageEncoding:
    """Who encodes a run's images (``choose_image_backend``: ONNX Runtime on the CPU when the model's image tower
    is cached, else torch), with how many decode workers and encoder threads."""

    settings: IndexSettings
    device: Device
    choice: BackendChoice
    tower: ExportedImageTower
    workers: int

    @classmethod
    def choose(cls, settings: IndexSettings, device: Device) -> ImageEncoding:
        tower = cached_image_tower(spec_key(settings.model, check=False))
        if settings.ray is not None:
            choice = BackendChoice(TORCH, "--ray: the cluster encodes with torch", "torch on the cluster")
        else:
            choice = choose_image_backend(device, tower, settings.int8)
        onnx = choice.backend == ONNX
        workers = default_workers(device, onnx) if settings.workers is None else settings.workers
        return cls(settings, device, choice, tower, workers)

    @property
    def onnx(self) -> bool:
        return self.choice.backend == ONNX

    @property
    def crop(self) -> SquareCrop | None:
        """What decode workers hand over on the ONNX path (uint8 squares); None: torch's preprocessing."""
        identity = self.tower.identity
        return crop_for(identity.image_size, identity.preprocess) if self.onnx and identity else None

    def load(self) -> ImageEncoder:
        """The encoder: one ONNX Runtime session running a part of each batch per core (``indexing_encoder``), or
        the torch model, also when the session does not open."""
        if self.onnx:
            try:
                return indexing_encoder(self.tower, self.settings.int8)  # the CLI may have opened it already
            except Exception as error:  # noqa: BLE001  (torch encodes the same crops: the run goes on)
                warnings.warn(f"the ONNX image tower did not open ({error}); encoding with torch", stacklevel=2)
        return Encoder.load(self.settings.model, self.device, int8=self.settings.int8)

    def identity(self, encoder: ImageEncoder) -> ModelIdentity:
        """What a new index records: the loaded model's identity, as this run's spec names it."""
        return encoder.identity.named_as(self.settings.model)


def is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC / EDQUOT from Python, SQLITE_FULL from SQLite, anywhere in the exception's chain."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _index_locked(layout: IndexLayout, folders: list[str], settings: IndexSettings, progress: bool):
    catalog = Catalog(layout.catalog, create=True)
    try:
        _check_model(catalog, settings.model)
        if not folders:
            folders = catalog.roots()
            if not folders:
                raise UsageError("nothing indexed yet: run `clipsearch index FOLDER`")
        summary = IndexSummary()
        generation = catalog.vectors_generation()
        try:
            _plan_and_run(catalog, layout, folders, settings, summary, progress)
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise Interrupted(_interrupted(catalog.vectors_generation() != generation)) from None
        return summary
    finally:
        catalog.close()


def _interrupted(committed: bool) -> str:
    if committed:
        return "interrupted; the work committed so far is kept: run `clipsearch index` again to continue"
    return "interrupted before anything was committed: the index is as it was"


def _plan_and_run(catalog: Catalog, layout: IndexLayout, folders, settings: IndexSettings, summary, progress) -> None:
    present = [folder for folder in folders if os.path.isdir(folder)]
    missing = [root for root in catalog.roots() if not os.path.isdir(root)]
    with catalog.session() as session:
        roots = [*present, *catalog.roots()]  # a link to a file the walk of any of them finds is not indexed twice
        scans = {folder: scan_folder(folder, roots) for folder in present}
        orphans = [row for root in missing for row in catalog.rows_under(session, root)]
        plan = plan_changes(catalog, session, scans, hash_file, orphans)
    fault_point("planned")
    for folder, scan in scans.items():
        if not scan.files and not scan.unreadable and not plan.known_under(folder):
            raise UsageError(f"no images found in {folder}")
    catalog.add_roots(present)
    _run_plan(catalog, layout, plan, settings, summary, progress)
    for root in missing:  # renamed (every image found again elsewhere) or unmounted (its images stay)
        if catalog.ids_under(root, status=None).size == 0:
            catalog.remove_roots([root])
            summary.warnings.append(f"{root} is gone and its images were found elsewhere: it is no longer indexed")
        elif root in folders:
            summary.warnings.append(
                f"skipped {root}: folder not found (its images stay indexed; `clipsearch forget` removes them)"
            )
    rebuilt = apply_index_type(catalog, layout, settings.index_type, settings.max_memory, settings.device)
    if rebuilt is None and catalog.model_identity() and not faiss_file_current(catalog, layout):
        rebuilt = rebuild_as(catalog, layout, recorded_type(catalog), settings.device)  # built at the end after all
    summary.vectors_note = rebuilt.line() if rebuilt else None
    if ocr_in_force(catalog, settings.ocr):  # after the vectors are saved: search works while text is read
        workers = default_workers(settings.device) if settings.workers is None else settings.workers
        read = run_ocr_pass(catalog, settings.device, workers, progress, min(settings.chunk_size, COMMIT_EVERY))
        summary.text_note = read.line() if read.read else None
    captioner = captioner_in_force(catalog, settings.captions, settings.captioner)
    if captioner is not None:  # last: the vectors and the text read come first
        model = catalog.model_identity()
        spec = ModelSpec(model.name, model.pretrained) if model else settings.model
        written = run_caption_pass(
            catalog, spec, captioner or None, settings.device, progress, min(settings.chunk_size, CAPTION_BATCH)
        )
        summary.caption_note = written.line() if written.captioned or written.failed else None


def ocr_in_force(catalog: Catalog, asked: bool | None) -> bool:
    """Whether this index reads text in photos: what was asked (then recorded, so later runs and --watch keep
    it), else what the index records."""
    if asked is not None and catalog.get_meta(MetaKey.OCR) != ("on" if asked else "off"):
        catalog.set_meta(MetaKey.OCR, "on" if asked else "off")
    return catalog.get_meta(MetaKey.OCR) == "on"


def captioner_in_force(catalog: Catalog, asked: bool | None, folder: Path | None) -> str | None:
    """Whether this index writes captions, recorded as OCR is: None when off, else the decoder folder asked for
    ("" for the default beside the model). A folder given without --captions changes the recorded one only."""
    if asked is not None and catalog.get_meta(MetaKey.CAPTIONS) != ("on" if asked else "off"):
        catalog.set_meta(MetaKey.CAPTIONS, "on" if asked else "off")
    named = str(Path(folder).expanduser().resolve()) if folder is not None else None
    if named is not None and catalog.get_meta(MetaKey.CAPTIONER) != named:
        catalog.set_meta(MetaKey.CAPTIONER, named)
    if catalog.get_meta(MetaKey.CAPTIONS) != "on":
        return None
    return catalog.get_meta(MetaKey.CAPTIONER) or ""


def _check_model(catalog: Catalog, spec: ModelSpec) -> None:
    """Refuse another model than the index's. A spec whose key matches the recorded one is not checked again:
    checking a tag imports open_clip and torch, over a second that a run with nothing to encode does not need."""
    key = spec_key(spec, check=False)
    recorded = catalog.model_identity()
    if (recorded is None or recorded.key() != key) and not cached_image_tower(key).current:
        check_spec(spec)  # a spec that cannot load says so, before any mismatch (a cached export proves it loads)
    catalog.check_model(key, spec.describe())


class _Writer:
    """Applies decoded + encoded files to the catalog and the in-memory FAISS index, chunk by chunk.

    A chunk's FAISS work (removals, normalisation, the add) runs on one helper thread while the next chunk is
    written to SQLite: both release the GIL, so with a second free core the writer's wall time tends to the larger
    of the two, not their sum (``scripts/bench_ingest.py`` prints the writing thread's own rate). One thread keeps
    the FAISS steps in commit order; ``settle`` waits for them, and every save and the end of a run settle first,
    so the saved index always matches its generation.
    """

    def __init__(self, catalog: Catalog, layout: IndexLayout, vectors: VectorIndex | None, save_every_s: float):
        self.catalog = catalog
        self.layout = layout
        self.vectors = vectors
        self.generation = catalog.vectors_generation()
        self.saved_generation = self.generation
        self.save_every_s = save_every_s
        self.last_save = time.monotonic()
        self._faiss = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faiss-writer")
        self._pending: Future | None = None

    def commit(self, session_work) -> None:
        with self.catalog.session() as session, session.begin():
            removed_ids, added_ids, added_vectors = session_work(session)
            session.flush()
            generation = self.catalog.bump_generation(session)
            fault_point("commit_begin")
        self.generation = generation  # only once committed: a failed commit must not mark the FAISS file newer
        fault_point("commit_end")
        self.settle()
        if self.vectors is not None:
            self._pending = self._faiss.submit(_apply_to_faiss, self.vectors, removed_ids, added_ids, added_vectors)
        if time.monotonic() - self.last_save > self.save_every_s:
            self.save()

    def settle(self) -> None:
        """Wait for the last chunk's FAISS work (raising its error, if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def save(self) -> None:
        self.settle()
        if self.vectors is not None and self.saved_generation != self.generation:
            save_vectors(self.catalog, self.layout, self.vectors, self.generation)
            self.saved_generation = self.generation
            self.last_save = time.monotonic()

    def close(self) -> None:
        """Settle, save, and stop the helper thread (the end of every run, also an interrupted one)."""
        try:
            self.save()
        finally:
            self._faiss.shutdown(wait=True)


def _apply_to_faiss(vectors: VectorIndex, removed_ids, added_ids, added_vectors) -> None:
    vectors.remove(removed_ids)
    if len(added_ids):
        vectors.add(added_ids, unit_rows(added_vectors))


def ingest_encoded(
    catalog: Catalog,
    layout: IndexLayout,
    chunks: Iterable[Chunk],
    vectors: VectorIndex | None,
    save_every_s: float = 120.0,
) -> IndexSummary:
    """Commit chunks of rows that arrive already encoded, through the writer a run uses (``scripts/bench_ingest.py``
    measures it). The caller holds the write lock and has recorded the model; ``vectors``: the index to keep in
    step with the catalog (``open_vectors``), None for the catalog alone."""
    summary = IndexSummary()
    writer = _Writer(catalog, layout, vectors, save_every_s)
    try:
        for chunk in chunks:
            writer.commit(lambda session, chunk=chunk: _apply_chunk(session, chunk, summary))
    finally:
        writer.close()
    return summary


def _run_plan(
    catalog: Catalog,
    layout: IndexLayout,
    plan: Plan,
    settings: IndexSettings,
    summary: IndexSummary,
    progress: bool,
) -> None:
    summary.unchanged = plan.unchanged
    summary.unchanged_failed = plan.unchanged_failed
    identity = catalog.model_identity()

    def at_end() -> bool:  # another type after this run: built from the stored embeddings at the end instead
        return builds_at_end(catalog, len(plan.work), settings.index_type, settings.max_memory)

    vectors = open_vectors(catalog, layout, identity.embed_dim, persist=True) if identity and not at_end() else None
    writer = _Writer(catalog, layout, vectors, settings.save_every_s)
    try:
        if plan.moved or plan.gone or plan.unreadable:
            writer.commit(lambda session: _apply_moves_and_removals(session, plan, summary))
        if plan.work:  # only now: a run with nothing to encode never imports torch nor loads the model
            if settings.model.random_weights:
                raise ModelLoadError(
                    "random weights differ at every load: pass --pretrained TAG|FILE or a local-dir: model"
                )
            device = settings.device
            encoding = ImageEncoding.choose(settings, device)

            def on_encoder(encoder: ImageEncoder) -> None:
                if catalog.model_identity() is None:
                    catalog.set_model_identity(encoding.identity(encoder))
                if writer.vectors is None and not at_end():
                    writer.vectors = open_vectors(catalog, layout, encoder.dim, persist=False)

            def commit(chunk: Chunk) -> None:
                writer.commit(lambda session: _apply_chunk(session, chunk, summary))

            sink = ChunkSink(load=encoding.load, ready=on_encoder, write=commit)
            summary.encode_seconds = encoding_source(settings, encoding).run(plan.work, sink, progress)
    finally:
        writer.close()


def _apply_moves_and_removals(session: Session, plan: Plan, summary: IndexSummary):
    for row_id, facts in plan.moved:
        row = session.get(ImageRow, row_id)
        row.path, row.size, row.mtime_ns = facts.path, facts.size, facts.mtime_ns
        summary.moved += 1
    removed = []
    for row_id in plan.gone:
        row = session.get(ImageRow, row_id)
        if row.status == STATUS_OK:
            removed.append(row_id)
        session.delete(row)
        summary.removed += 1
    for path, reason, row_id in plan.unreadable:
        row = session.get(ImageRow, row_id) if row_id else None
        if row is None:
            row = ImageRow(path=path, size=-1, mtime_ns=-1, status=STATUS_FAILED)
            session.add(row)
            session.flush()
            fill_keywords(session, row.id, row.id)
        elif row.status == STATUS_OK:
            removed.append(row.id)
        row.status, row.error, row.embedding, row.indexed_at = STATUS_FAILED, reason, None, time.time()
        summary.failed += 1
    return removed, np.zeros(0, dtype=np.int64), None


def encoding_source(settings: IndexSettings, encoding: ImageEncoding) -> EncodedChunkSource:
    """Who decodes and encodes: a Ray cluster (``--ray``) or this machine's overlapped stages, with torch's
    preprocessing or, on the ONNX path, uint8 crops. The one place a run's shape depends on it
    (``indexer.encoding``)."""
    device = encoding.device
    batch_size = settings.batch_size or default_batch_size(device, encoding.onnx)
    if settings.ray is not None:
        return RaySource(settings.ray, settings.model, batch_size, settings.chunk_size, settings.int8)
    options = EncodeOptions(settings.model, device, batch_size, encoding.workers, settings.chunk_size, encoding.crop)
    return OverlappedSource(options)


def _apply_chunk(session: Session, chunk: Chunk, summary):
    """Returns removed ids, then the ids and vectors (as stored, so a rebuilt FAISS index answers identically)
    to add. New files take the executemany path (``indexer.ingest``); changed files are updated row by row."""
    new_ids, new_vectors, new_failed = insert_new_rows(session, [entry for entry in chunk if entry[0].row_id is None])
    summary.added += len(new_ids)
    summary.encoded += len(new_ids)
    summary.failed += new_failed
    removed: list[int] = []
    added: list[tuple[ImageRow, np.ndarray]] = []
    for item, decoded, vector in chunk:
        facts = item.facts
        if item.row_id is None:
            continue
        row = session.get(ImageRow, item.row_id)
        if row.status == STATUS_OK:
            removed.append(row.id)
        row.size, row.mtime_ns, row.content_hash = facts.size, facts.mtime_ns, decoded.content_hash
        row.indexed_at = time.time()
        if vector is None:
            row.status, row.error, row.embedding = STATUS_FAILED, decoded.error, None
            row.width = row.height = row.pixel_print = None
            summary.failed += 1
            continue
        row.status, row.error, row.embedding = STATUS_OK, None, encode_embedding(vector)
        row.width, row.height, row.pixel_print = decoded.width, decoded.height, decoded.pixel_print
        row.set_meta(decoded.meta or read_image_meta(facts.path, facts.mtime_ns))  # header: date, camera, GPS, type
        added.append((row, row.vector()))
        summary.encoded += 1
        summary.updated += 1
    if not added:
        return removed, new_ids, new_vectors
    ids = np.concatenate([new_ids, np.array([row.id for row, _ in added], dtype=np.int64)])
    vectors = np.stack([vector for _, vector in added])
    return removed, ids, np.concatenate([new_vectors.astype(np.float32), vectors]) if len(new_ids) else vectors


def default_batch_size(device: Device, onnx: bool = False) -> int:
    """CPU: 32 (larger batches gain nothing and delay the first commit); the ONNX image tower: 16, as fast per
    image with less session memory (ViT-B-32 float32, 2 threads: 24.7-27.7 against 24.0-24.7 images/s, peak
    537-674 against 800-810 MB; docs/benchmarks.md). CUDA: 256, where ViT-B-32 in fp16 runs near its peak images/s
    without holding much memory."""
    if device.is_cuda:
        return 256
    return 16 if onnx else 32


def default_workers(device: Device, onnx: bool = False) -> int:
    """CPU: one per core, at most 4 (the encoder needs the cores too). CUDA: decoding must keep up with the GPU,
    so every core, up to 16. The ONNX path: decode threads in the encoding process (``indexer.decode_pool``), one
    per core up to 16, as rclip 4 does: a thread waiting for its core costs nothing."""
    cores = os.cpu_count() or 1
    if onnx:
        return max(1, min(16, cores))
    return max(1, min(16 if device.is_cuda else 4, cores))


@dataclass
class ForgetSummary:
    folders: list[str]
    removed: int

    def line(self) -> str:
        return f"forgot {', '.join(self.folders)}: {self.removed} images removed from the index"


def forget_folders(index_dir: Path, paths: Sequence[Path], wait_for_lock: bool = True) -> ForgetSummary:
    """Remove folders and every image under them from the index (the files on disk are not touched).

    A folder inside an indexed folder that still exists is refused: the next refresh would index it again."""
    layout = IndexLayout(Path(index_dir))
    if not layout.catalog.is_file():
        raise UsageError(f"no index at {layout.root}")
    wanted = [os.path.abspath(Path(p).expanduser()) for p in paths]
    with write_lock(layout, wait_for_lock):
        catalog = Catalog(layout.catalog)
        try:
            return _forget_locked(catalog, layout, wanted)
        finally:
            catalog.close()


def _forget_locked(catalog: Catalog, layout: IndexLayout, folders: list[str]) -> ForgetSummary:
    roots = catalog.roots()
    for folder in folders:
        inside = [root for root in roots if folder != root and is_under(folder, root)]
        if inside and os.path.isdir(inside[0]):
            raise UsageError(
                f"{folder} is inside the indexed folder {inside[0]}: the next refresh would index it again "
                f"(forget {inside[0]}, or move the photos out)"
            )
        if not any(root == folder or is_under(root, folder) or is_under(folder, root) for root in roots):
            raise UsageError(f"{folder} is not an indexed folder (`clipsearch info` lists them)")
    identity = catalog.model_identity()
    vectors = open_vectors(catalog, layout, identity.embed_dim, persist=True) if identity else None
    writer = _Writer(catalog, layout, vectors, save_every_s=float("inf"))
    removed: list[int] = []

    def forget(session: Session):
        for folder in folders:
            for row in catalog.rows_under(session, folder):
                if row.status == STATUS_OK:
                    removed.append(row.id)
                session.delete(row)
        return np.asarray(removed, dtype=np.int64), np.zeros(0, dtype=np.int64), None

    try:
        writer.commit(forget)
    finally:
        writer.close()
    catalog.remove_roots([root for root in roots if any(root == f or is_under(root, f) for f in folders)])
    return ForgetSummary(folders, len(removed))
