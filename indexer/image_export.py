"""Export the image tower of the index's model to ONNX once per model, check it against torch, record it.

Run after an index run that encoded images on the CPU (``IndexSettings.export_image``: None follows the device;
``CLIPSEARCH_EXPORT_IMAGE=0`` turns it off whatever the settings say), so that later runs encode with ONNX Runtime
without importing torch (``indexer.pipeline``, ``retrieval.model.image_onnx.choose_image_backend``). The graph
goes to the per-user cache of that model (``retrieval.model.image_onnx.image_tower_cache``): another index of the
same model finds it there and only records it. The float32 graph must match the torch tower on 64 fixed probe
images (cosine >= 0.9999 on every one, the same top-10 among them), and load and run in a fresh process, or
nothing is cached or recorded and the index keeps the torch path. Files are written to a work folder and renamed
into place once checked, so a reader sees one complete export or none.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.text_export import INT8_MIN_OVERLAP, MIN_COSINE, check_in_fresh_process, indexed_model, top_k_overlap
from retrieval.errors import ClipsearchError
from retrieval.model.image_onnx import (
    IDENTITY_FILE,
    INT8_FILE,
    RECORD_FILE,
    TOWER_FILE,
    OnnxImageEncoder,
    cached_image_tower,
    image_tower_cache,
)
from retrieval.model.text_onnx import TextTowerRecord, graph_files, stamp_files
from retrieval.store.catalog import Catalog, MetaKey
from retrieval.store.layout import IndexLayout
from retrieval.store.write_lock import write_lock

PROBE_IMAGES = 64


class ImageExportError(ClipsearchError):
    """The image tower could not be exported or did not match the torch tower; indexing keeps the torch path."""


@dataclass(frozen=True)
class ImageExportReport:
    folder: Path
    record: TextTowerRecord
    exported: bool  # False: the cache held a current export, only recorded

    def line(self) -> str:
        r = self.record
        verb = "exported to" if self.exported else "found in"
        int8 = "dropped" if r.int8_overlap is None else f"top-10 overlap with float32 {r.int8_overlap:.3f}"
        return (
            f"image tower {verb} {self.folder} (float32 vs torch: min cosine {r.min_cosine:.6f}, "
            f"same top-10 {'yes' if r.top10_same else 'no'}; int8: {int8})"
        )


def probe_pixels(side: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``PROBE_IMAGES`` fixed, smooth colour fields with noise, normalised as the model's preprocessing does:
    (N, 3, side, side) float32. The same for every run, so two exports are checked alike."""
    rng = np.random.default_rng(27)
    coarse = rng.random((PROBE_IMAGES, 3, 4, 4), dtype=np.float32)
    repeat = -(-side // 4)
    fields = coarse.repeat(repeat, axis=2).repeat(repeat, axis=3)[:, :, :side, :side]
    pixels = np.clip(fields + 0.15 * rng.standard_normal(fields.shape, dtype=np.float32), 0.0, 1.0)
    return ((pixels - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]).astype(
        np.float32
    )


def export_image_tower(
    index_dir: Path, force: bool = False, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> ImageExportReport:
    """Record the cached image tower of the index's model, exporting it first when the cache has none (or
    ``force``)."""
    layout = IndexLayout(Path(index_dir).expanduser())
    catalog = Catalog(layout.catalog, create=False)
    try:
        identity = indexed_model(catalog, layout)
        cached = cached_image_tower(identity.key())
        exported = force or not cached.current or cached.outdated
        if exported:
            cached = _export(catalog)
        with write_lock(layout, wait, on_wait):
            catalog.set_meta(MetaKey.IMAGE_TOWER, cached.record.to_json())
        return ImageExportReport(cached.folder, cached.record, exported)
    finally:
        catalog.close()


_LOAD_CHECK = """
import sys
from pathlib import Path
from indexer.image_export import load_graph, probe_pixels
encoder = load_graph(Path(sys.argv[1]), sys.argv[2])
side = int(encoder.session.get_inputs()[0].shape[-1])
vectors = encoder.encode_images(probe_pixels(side, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))[:4])
assert vectors.dtype.name == "float32" and vectors.shape[0] == 4
"""


def load_graph(folder: Path, name: str) -> OnnxImageEncoder:
    """An exported graph in a work folder, as an image encoder (not yet recorded anywhere)."""
    return OnnxImageEncoder(folder, TextTowerRecord(folder=folder.name, model_key="", precision="", digest=""), name)


def _export(catalog: Catalog):
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.image_export import image_side
    from retrieval.model.spec import spec_key

    identity = catalog.model_identity()
    spec = identity.spec()
    catalog.check_model(spec_key(spec), spec.describe())  # the weights on disk are the ones the index recorded
    encoder = Encoder.load(spec, CPU)  # float32 on the CPU (fp16 checkpoints too): the reference to match
    target = image_tower_cache(identity.key())
    work = target.with_name(f".{target.name}-tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        preprocess = identity.preprocess or {}
        pixels = probe_pixels(
            image_side(encoder.model),
            tuple(preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            tuple(preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))),
        )
        reference = encoder.encode_images(pixels)
        try:
            form, as_onnx, min_cosine, top10_same = _checked_graph(encoder.model, work, pixels, reference, lean=True)
        except ImageExportError:  # the lean graph missed the check: the tower as written must pass it alone
            form, as_onnx, min_cosine, top10_same = _checked_graph(encoder.model, work, pixels, reference, lean=False)
        int8_overlap = _int8_variant(work, pixels, as_onnx)
        (work / IDENTITY_FILE).write_text(identity.to_json())  # a new index of this model records it, torch-free
        graphs = [TOWER_FILE] + ([INT8_FILE] if int8_overlap is not None else [])
        names = [IDENTITY_FILE] + [name for graph in graphs for name in graph_files(work, graph)]
        files, digest = stamp_files(work, names)
        record = TextTowerRecord(
            folder=str(target),
            model_key=identity.key(),
            precision="float32",
            digest=digest,
            files=files,
            min_cosine=round(min_cosine, 7),
            top10_same=top10_same,
            int8_overlap=None if int8_overlap is None else round(int8_overlap, 4),
            graph=form,
        )
        (work / RECORD_FILE).write_text(record.to_json())
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cached_image_tower(identity.key())


def _checked_graph(
    model, work: Path, pixels: np.ndarray, reference: np.ndarray, lean: bool
) -> tuple[str, np.ndarray, float, bool]:
    """Export the float32 graph (``lean``: the lean form where the tower fits it) and check it against torch's
    ``reference`` vectors of the probes; returns (form, its vectors, min cosine, same top-10)."""
    from retrieval.model.image_export import export_image_onnx
    from retrieval.model.text_export import UnsupportedExport

    try:
        form = export_image_onnx(model, work / TOWER_FILE, lean=lean)
    except UnsupportedExport as error:
        raise ImageExportError(f"this model's image tower cannot be exported ({error}); indexing uses torch") from None
    check_in_fresh_process(
        work, TOWER_FILE, script=_LOAD_CHECK, what="image tower", fallback="indexing uses torch",
        error=ImageExportError,
    )  # fmt: skip
    as_onnx = load_graph(work, TOWER_FILE).encode_images(pixels)
    min_cosine = float(np.min(np.sum(reference * as_onnx, axis=1)))
    top10_same = top_k_overlap((np.arange(len(reference)), reference), reference, as_onnx) == 1.0
    if min_cosine < MIN_COSINE or not top10_same:
        raise ImageExportError(
            f"the exported image tower does not match torch (min cosine {min_cosine:.6f}, same top-10: "
            f"{'yes' if top10_same else 'no'}); indexing uses torch"
        )
    return form, as_onnx, min_cosine, top10_same


def _int8_variant(work: Path, pixels: np.ndarray, as_float: np.ndarray) -> float | None:
    """Quantise the checked float32 graph to int8 (dynamic, per channel) and keep it when its top-10 among the
    probes agrees with float32's (mean overlap >= ``INT8_MIN_OVERLAP``); returns that overlap, None when dropped
    or when quantisation fails (float32 alone is then exported)."""
    from retrieval.model.text_export import quantize_int8, remove_graph

    try:
        quantize_int8(work / TOWER_FILE, work / INT8_FILE, per_channel=True)
        as_int8 = load_graph(work, INT8_FILE).encode_images(pixels)
    except Exception:  # noqa: BLE001  (an int8 variant is optional: float32 stands on its own)
        remove_graph(work / INT8_FILE)
        return None
    overlap = top_k_overlap((np.arange(len(as_float)), as_float), as_float, as_int8)
    if overlap < INT8_MIN_OVERLAP:
        remove_graph(work / INT8_FILE)
        return None
    return overlap


def refresh_image_tower(index_dir: Path, on_wait: Callable[[str], None] | None = None) -> str | None:
    """After an index run that encoded images: record the model's cached image tower, exporting it when the cache
    has none. Returns a line for the user when something was exported or went wrong; never fails the index run.
    ``CLIPSEARCH_EXPORT_IMAGE=0`` turns it off."""
    if os.environ.get("CLIPSEARCH_EXPORT_IMAGE", "1") == "0":
        return None
    try:
        report = export_image_tower(index_dir, on_wait=on_wait)
    except ClipsearchError as error:
        return f"image tower not exported: {error}"
    except Exception as error:  # noqa: BLE001  (an exporter failure must not fail indexing that succeeded)
        return f"image tower not exported ({type(error).__name__}: {error}); indexing uses torch"
    return report.line() if report.exported else None
