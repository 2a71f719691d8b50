"""Export the index's text tower to ONNX, check it against torch, and record it in the catalog.

Run by `clipsearch export-text`, and after a `clipsearch index` run that encoded images (when the export is
missing or stale). The float32 graph must match the torch tower on the probe captions (cosine >= 0.9999 on
every one, the same top-10 over this index's vectors) or nothing is recorded and queries keep the torch path.
The int8 graph is then made from it and used when its top-10 overlap with float32 on the probes is high enough
(``precision="auto"``). Files go to a new ``text-tower-<digest>`` folder; the catalog's record switches to it in
one write, then older folders are removed, so a reader sees one complete export or none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from retrieval.errors import ClipsearchError, EmptyIndexError, UsageError
from retrieval.model.spec import ModelIdentity
from retrieval.model.text_onnx import (
    FOLDER_PREFIX,
    TOWER_FILE,
    OnnxTextEncoder,
    TextTowerRecord,
    cpu_session,
    stamp_files,
)
from retrieval.store.catalog import Catalog, MetaKey
from retrieval.store.layout import IndexLayout
from retrieval.store.text_tower import current_text_tower
from retrieval.store.tuning import exact_top_k, probe_texts, recall_at_k
from retrieval.store.write_lock import write_lock

MIN_COSINE = 0.9999  # float32 graph against torch, every probe
INT8_MIN_OVERLAP = 0.9  # auto: int8 when its mean top-10 overlap with float32 is at least this
CHECK_VECTORS = 200_000  # the top-10 checks search at most this many of the index's vectors
PRECISIONS = ("auto", "int8", "float32")
FLOAT_FILE, INT8_FILE = "text-float32.onnx", "text-int8.onnx"
TMP_PREFIX = ".text-tower-tmp-"  # an export's work folder, renamed into place once checked


class TextExportError(ClipsearchError):
    """The text tower could not be exported or did not match the torch tower; queries keep the torch path."""


@dataclass(frozen=True)
class TextExportReport:
    record: TextTowerRecord
    exported: bool  # False: the recorded export was current and kept

    def line(self) -> str:
        r = self.record
        overlap = f", int8 top-10 overlap with float32 {r.int8_overlap:.3f}" if r.int8_overlap is not None else ""
        verb = "exported" if self.exported else "is current:"
        return (
            f"text tower {verb} {r.folder} ({r.precision}; float32 vs torch: min cosine {r.min_cosine:.6f}, "
            f"same top-10 {'yes' if r.top10_same else 'no'}{overlap})"
        )


def probe_captions() -> list[str]:
    """200 fixed captions: the 120 everyday ones of the recall probes, plus long, odd and non-English ones
    (truncation at the context length, non-ASCII through the tokenizer)."""
    extra = [
        "un chien sur la plage au coucher du soleil",
        "ein Hund am Strand bei Sonnenuntergang, Zürich, Straße",
        "海辺の犬 夕焼け 東京の夜景",
        "собака на пляже на закате",
        "a café in São Paulo with naïve art & crème brûlée",
        "🐶 dog 🌅 sunset 🏖️ beach",
        "IMG_0412.JPG DSC-2023-07-14",
        "a photo of " + " and ".join(["a red car", "a blue bicycle", "a green tree", "a yellow house"] * 6),
    ]
    subjects = ("a dog", "two cats", "a red car", "my grandmother", "the Eiffel tower", "a bowl of ramen",
                "a snowy mountain", "a wedding", "a goal in football", "an old photograph")  # fmt: skip
    styles = ("close-up", "blurry", "from above", "on film", "with flash", "in the fog", "at dawn", "indoors")
    generated = [f"{style} {subject}" for subject in subjects for style in styles]
    captions = probe_texts() + extra + generated
    return captions[:200]


def tower_current(catalog: Catalog, layout: IndexLayout) -> bool:
    """Whether the catalog records an export of its own model whose files are all in place."""
    return current_text_tower(catalog, layout) is not None


def export_text_tower(
    index_dir: Path,
    precision: str = "auto",
    force: bool = False,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    on_export: Callable[[], None] | None = None,
) -> TextExportReport:
    """Export (or keep a current export of) the text tower of the index's model; ``force`` exports again.
    ``on_export`` is told just before an export starts (it takes a while for a large model)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    layout = IndexLayout(Path(index_dir).expanduser())
    catalog = Catalog(layout.catalog, create=False)
    try:
        indexed_model(catalog, layout)
        with write_lock(layout, wait, on_wait):
            current = catalog.get_meta(MetaKey.TEXT_TOWER)
            if not force and tower_current(catalog, layout):
                record = TextTowerRecord.from_json(current or "")
                if precision in ("auto", record.precision):
                    return TextExportReport(record, exported=False)
            if on_export is not None:
                on_export()
            record = _export(catalog, layout, precision)
            catalog.set_meta(MetaKey.TEXT_TOWER, record.to_json())
            _remove_old_folders(layout, keep=record.folder)
            return TextExportReport(record, exported=True)
    finally:
        catalog.close()


def indexed_model(catalog: Catalog, layout: IndexLayout) -> ModelIdentity:
    """The model the index records; an index that never encoded an image is a one-line error."""
    identity = catalog.model_identity()
    if identity is None:
        raise EmptyIndexError(f"the index at {layout.root} is empty: run `clipsearch index FOLDER` first")
    return identity


def _export(catalog: Catalog, layout: IndexLayout, precision: str) -> TextTowerRecord:
    from retrieval.model.clip_tokenizer import UnsupportedTokenizer, save_tokenizer
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import spec_key
    from retrieval.model.text_export import UnsupportedExport, export_onnx, move_graph, quantize_int8, remove_graph

    identity = catalog.model_identity()
    spec = identity.spec()
    catalog.check_model(spec_key(spec), spec.describe())  # the weights on disk are the ones the index recorded
    encoder = Encoder.load_text_only(spec)  # float32 on the CPU: the reference the graph must match
    for stray in stray_exports(layout):  # left by a killed export (we hold the write lock: none is running)
        shutil.rmtree(stray, ignore_errors=True)
    work = layout.root / f"{TMP_PREFIX}{os.getpid()}"
    work.mkdir(parents=True)
    try:
        try:
            save_tokenizer(encoder.tokenizer, work, context_length=int(encoder.model.attn_mask.shape[0]))
            export_onnx(encoder.model, work / FLOAT_FILE)
        except (UnsupportedTokenizer, UnsupportedExport) as error:
            raise TextExportError(
                f"this model's text tower cannot be exported ({error}); text queries use torch"
            ) from None
        check_in_fresh_process(work, FLOAT_FILE)
        captions = probe_captions()
        reference = encoder.encode_texts(captions)
        as_float = load_graph(work, FLOAT_FILE).encode_texts(captions)
        min_cosine = float(np.min(np.sum(reference * as_float, axis=1)))
        database = _database(catalog)
        top10_same = top_k_overlap(database, reference, as_float) == 1.0
        if min_cosine < MIN_COSINE or not top10_same:
            raise TextExportError(
                f"the exported text tower does not match torch (min cosine {min_cosine:.6f}, same top-10: "
                f"{'yes' if top10_same else 'no'}); text queries use torch"
            )
        overlap = None
        chosen = FLOAT_FILE
        if precision != "float32":
            quantize_int8(work / FLOAT_FILE, work / INT8_FILE)
            check_in_fresh_process(work, INT8_FILE)
            overlap = top_k_overlap(database, as_float, load_graph(work, INT8_FILE).encode_texts(captions))
            if precision == "int8" or overlap >= INT8_MIN_OVERLAP:
                chosen = INT8_FILE
        move_graph(work / chosen, work / TOWER_FILE)
        for leftover in (FLOAT_FILE, INT8_FILE):
            remove_graph(work / leftover)
        names = sorted(p.name for p in work.iterdir())
        files, digest = stamp_files(work, names)
        folder = f"{FOLDER_PREFIX}{digest[:16]}"
        shutil.rmtree(layout.root / folder, ignore_errors=True)
        os.replace(work, layout.root / folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # ONNX Runtime's optimised graph beside the export, so the first query loads it too (not recorded); a failure
    # costs only that: the first query makes it, or loads the graph
    with contextlib.suppress(Exception):
        cpu_session(layout.root / folder / TOWER_FILE, keep_optimized=True)
    return TextTowerRecord(
        folder=folder,
        model_key=identity.key(),
        precision="int8" if chosen == INT8_FILE else "float32",
        digest=digest,
        files=files,
        min_cosine=round(min_cosine, 7),
        top10_same=top10_same,
        int8_overlap=None if overlap is None else round(overlap, 4),
    )


def stray_exports(layout: IndexLayout) -> list[Path]:
    """Work folders of exports that never finished (a crash or kill -9 skips their clean-up)."""
    return sorted(path for path in layout.root.glob(f"{TMP_PREFIX}*") if path.is_dir())


_LOAD_CHECK = """
import sys
from pathlib import Path
from indexer.text_export import load_graph, probe_captions
vectors = load_graph(Path(sys.argv[1]), sys.argv[2]).encode_texts(probe_captions()[:8])
assert vectors.dtype.name == "float32" and vectors.shape[0] == 8
"""


def check_in_fresh_process(
    folder: Path,
    name: str,
    timeout: float = 300.0,
    script: str = _LOAD_CHECK,
    what: str = "text tower",
    fallback: str = "text queries use torch",
    error: type[ClipsearchError] = TextExportError,
) -> None:
    """Load and run a graph in a new process before this one touches it: a graph onnxruntime cannot run (fp16
    weights in a "float32" file once crashed it with a segfault) then costs a message, not the run. ``script`` runs
    with the folder and the file name as its arguments; ``what``, ``fallback`` and ``error`` word the failure."""
    import subprocess
    import sys

    import retrieval

    root = str(Path(retrieval.__file__).resolve().parents[1])  # where this checkout or installation lives
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, str(folder), name],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise error(f"the exported {what} did not answer within {timeout:.0f} s; {fallback}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise error(f"onnxruntime cannot run the exported {what} ({last}); {fallback}")


def load_graph(folder: Path, name: str) -> OnnxTextEncoder:
    """An exported graph in a work folder, as a text encoder (not yet recorded in any catalog)."""
    record = TextTowerRecord(folder=folder.name, model_key="", precision="", digest="")
    return OnnxTextEncoder(folder, record, graph_file=name)


def _database(catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of up to ``CHECK_VECTORS`` indexed images: what the top-10 checks search."""
    batches = list(islice(catalog.iter_embeddings(batch=20_000), max(1, CHECK_VECTORS // 20_000)))
    if not batches:
        return np.zeros(0, np.int64), np.zeros((0, 1), np.float32)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def top_k_overlap(database: tuple[np.ndarray, np.ndarray], a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of query ``a``'s top-k found in query ``b``'s (sets: the order of near-ties may swap)."""
    ids, vectors = database
    if not len(ids):
        return 1.0
    return recall_at_k(exact_top_k([(ids, vectors)], b, k), exact_top_k([(ids, vectors)], a, k))


def _remove_old_folders(layout: IndexLayout, keep: str) -> None:
    for path in layout.root.glob(f"{FOLDER_PREFIX}*"):
        if path.name != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def refresh_text_tower(
    index_dir: Path, on_wait: Callable[[str], None] | None = None, on_export: Callable[[], None] | None = None
) -> str | None:
    """After an index run that encoded images: export the text tower when it is missing or stale. Returns a line
    for the user when something was exported or went wrong; never fails the index run (queries then use torch).
    ``CLIPSEARCH_EXPORT_TEXT=0`` turns it off."""
    if os.environ.get("CLIPSEARCH_EXPORT_TEXT", "1") == "0":
        return None
    try:
        report = export_text_tower(index_dir, on_wait=on_wait, on_export=on_export)
    except ClipsearchError as error:
        return f"text tower not exported: {error}"
    except Exception as error:  # noqa: BLE001  (an exporter failure must not fail indexing that succeeded)
        return f"text tower not exported ({type(error).__name__}: {error}); text queries use torch"
    return report.line() if report.exported else None
