"""The image tower exported to ONNX once per model: checked against torch, cached, recorded in the catalog, and
usable without torch (issue 27)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.image_export import export_image_tower, probe_pixels, refresh_image_tower
from indexer.pipeline import index_paths
from retrieval.model.device import CPU
from retrieval.model.encoder import Encoder
from retrieval.model.image_onnx import RECORD_FILE, cached_image_tower, image_tower_cache
from retrieval.model.spec import ModelSpec
from retrieval.store.catalog import Catalog, MetaKey
from retrieval.store.layout import IndexLayout
from retrieval.unit import unit_rows

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ModelSpec(f"local-dir:{ROOT / 'data' / 'models' / 'shapes-clip'}", None)


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    """A cache of our own: exports of other tests and of the user are not seen."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.delenv("CLIPSEARCH_EXPORT_IMAGE", raising=False)
    return home


def _index(tmp_path: Path, folder: Path, settings, name: str = "index") -> Path:
    index_paths(tmp_path / name, [folder], settings, progress=False)
    return tmp_path / name


def _recorded(index_dir: Path) -> dict:
    catalog = Catalog(IndexLayout(index_dir).catalog, create=False)
    try:
        return json.loads(catalog.get_meta(MetaKey.IMAGE_TOWER) or "{}")
    finally:
        catalog.close()


@pytest.mark.slow
@pytest.mark.parametrize("spec_name", ["tiny", "shapes"])
def test_onnx_image_vectors_match_torch(spec_name, tiny_spec, settings, photo_folder, tmp_path, cache_home):
    """The exported tower encodes as torch does (cosine >= 0.9999) on pixels it was not checked on; shapes-clip
    is stored in fp16 and exported from its float32 load."""
    from dataclasses import replace

    spec = tiny_spec if spec_name == "tiny" else SHAPES
    index_dir = _index(tmp_path, photo_folder, replace(settings, model=spec, export_image=False))
    report = export_image_tower(index_dir)
    assert report.exported and report.record.min_cosine >= 0.9999 and report.record.top10_same
    assert report.record.graph == ("vit-lean-1" if spec_name == "tiny" else "as-written-1")  # shapes: a ResNet
    tower = cached_image_tower(report.record.model_key)
    assert tower.current
    torch_encoder = Encoder.load(spec, CPU)
    side = int(tower.open().session.get_inputs()[0].shape[-1])
    pixels = np.random.default_rng(5).standard_normal((12, 3, side, side)).astype(np.float32)
    cosines = np.sum(torch_encoder.encode_images(pixels) * tower.open().encode_images(pixels), axis=1)
    assert cosines.min() >= 0.9999


@pytest.mark.slow
def test_second_index_of_the_same_model_reuses_the_cache(settings, photo_folder, tmp_path, cache_home):
    """One export per model: a second index finds it in the cache and records it without exporting."""
    from dataclasses import replace

    first = _index(tmp_path, photo_folder, replace(settings, export_image=True), "first")
    record = _recorded(first)
    assert record["model_key"] and Path(record["folder"]).is_dir()
    assert Path(record["folder"]).parent == cache_home / "clipsearch" / "image-towers"
    stamp = (Path(record["folder"]) / RECORD_FILE).stat().st_mtime_ns
    second = _index(tmp_path, photo_folder, replace(settings, export_image=True), "second")
    assert _recorded(second) == record
    assert (Path(record["folder"]) / RECORD_FILE).stat().st_mtime_ns == stamp  # not written again
    assert refresh_image_tower(second) is None  # current: nothing to say


def test_switched_off_by_the_environment(settings, photo_folder, tmp_path, cache_home, monkeypatch):
    from dataclasses import replace

    monkeypatch.setenv("CLIPSEARCH_EXPORT_IMAGE", "0")
    index_dir = _index(tmp_path, photo_folder, replace(settings, export_image=True))
    assert _recorded(index_dir) == {}
    assert not (cache_home / "clipsearch" / "image-towers").exists()


@pytest.mark.slow
def test_a_changed_graph_is_not_used(settings, photo_folder, tmp_path, cache_home):
    index_dir = _index(tmp_path, photo_folder, settings)  # exports (the CPU's default)
    report = export_image_tower(index_dir)
    graph = report.folder / "image.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    assert not cached_image_tower(report.record.model_key).current
    again = export_image_tower(index_dir)  # made again, not trusted
    assert again.exported and cached_image_tower(again.record.model_key).current


ENCODE_WITHOUT_TORCH = """
import sys
from retrieval.model.image_onnx import cached_image_tower
tower = cached_image_tower(sys.argv[1])
assert tower.current, tower.problem
from indexer.image_export import probe_pixels
side = int(tower.open().session.get_inputs()[0].shape[-1])
vectors = tower.open().encode_images(probe_pixels(side, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
assert vectors.shape[0] == 64
heavy = sorted(name for name in ("torch", "open_clip") if name in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.slow
def test_cached_tower_encodes_without_torch(settings, photo_folder, tmp_path, cache_home):
    index_dir = _index(tmp_path, photo_folder, settings)
    key = export_image_tower(index_dir).record.model_key
    done = subprocess.run(
        [sys.executable, "-c", ENCODE_WITHOUT_TORCH, key],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_probe_pixels_are_fixed():
    a, b = probe_pixels(32, (0.5,) * 3, (0.25,) * 3), probe_pixels(32, (0.5,) * 3, (0.25,) * 3)
    assert a.shape == (64, 3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b)
    assert image_tower_cache("a") != image_tower_cache("b")


def _vectors_by_name(index_dir: Path, folder: Path) -> dict[str, np.ndarray]:
    catalog = Catalog(IndexLayout(index_dir).catalog, create=False)
    try:
        with catalog.session() as session:
            rows = catalog.rows_under(session, str(folder))
            return {Path(row.path).name: unit_rows(row.vector()[None])[0] for row in rows}  # stored as float16
    finally:
        catalog.close()


@pytest.mark.slow
def test_cpu_indexing_encodes_with_the_cached_tower_as_torch_does(settings, photo_folder, tmp_path, cache_home):
    """The first CPU run encodes with torch and exports the tower; a new index of the same model then encodes with
    ONNX Runtime, through decode workers that hand over uint8 crops, and stores the same vectors (cosine >=
    0.9999); `info` says which backend encodes. `--int8` encodes with the int8 graph the export kept."""
    from dataclasses import replace

    from retrieval.model.device import CPU
    from retrieval.search.info import index_info

    first = _index(tmp_path, photo_folder, settings, "torch")
    assert cached_image_tower(_recorded(first)["model_key"]).current
    second = _index(tmp_path, photo_folder, replace(settings, workers=1), "onnx")
    assert index_info(second, device=CPU).image_encoding == (
        "ONNX float32 image tower (exported, current; lean ViT graph)"
    )
    by_torch, by_onnx = _vectors_by_name(first, photo_folder), _vectors_by_name(second, photo_folder)
    assert sorted(by_onnx) == sorted(by_torch) and len(by_onnx) == 16
    cosines = [float(np.dot(by_torch[name], by_onnx[name])) for name in by_torch]
    assert min(cosines) >= 0.9999
    assert Catalog(IndexLayout(second).catalog, create=False).model_identity().key() == _recorded(first)["model_key"]
    assert _recorded(first)["int8_overlap"] >= 0.9  # the int8 graph was kept: `--int8` encodes with it
    third = _index(tmp_path, photo_folder, replace(settings, int8=True), "int8")
    by_int8 = _vectors_by_name(third, photo_folder)
    assert min(float(np.dot(by_onnx[name], by_int8[name])) for name in by_onnx) >= 0.99


CLI_WITHOUT_TORCH = """
import sys
from clipsearch.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted(name for name in ("torch", "open_clip", "torchvision") if name in sys.modules)
    print("heavy:", heavy)
"""


@pytest.mark.slow
def test_indexing_with_an_existing_export_never_imports_torch(settings, photo_folder, tmp_path, cache_home):
    """With the model's tower in the cache, `clipsearch index` of a new index, a refresh that encodes 2 new photos
    and `similar` with a file outside the index: no process imports torch or open_clip."""
    from tests.conftest import make_images, write_image

    _index(tmp_path, photo_folder, settings, "first")  # torch, then the export

    def clipsearch(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", CLI_WITHOUT_TORCH, *args, "--index", str(tmp_path / "new")],
            env={**os.environ, "PYTHONPATH": str(ROOT), "CLIPSEARCH_EXPORT_TEXT": "0"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    model = ["--model", settings.model.name, "--workers", "1"]
    out = clipsearch("index", str(photo_folder), *model)
    assert "added 16" in out and "heavy: []" in out
    make_images(photo_folder / "new", 2, seed=9)
    out = clipsearch("index", str(photo_folder), *model)
    assert "added 2" in out and "heavy: []" in out
    outside = write_image(tmp_path / "outside.jpg", 9000)
    out = clipsearch("similar", str(outside), "-k", "3", "--format", "paths")
    assert len([line for line in out.splitlines() if line.endswith((".jpg", ".png"))]) == 3 and "heavy: []" in out


def test_a_new_index_opens_its_encoder_while_the_indexer_imports(settings, photo_folder, tmp_path, cache_home):
    """`clipsearch index` into a new index starts building the session first (indexer.early_encoder); the run then
    encodes with that very session, and stores what a run that opened its own stores. A refresh starts nothing."""
    import threading
    from dataclasses import replace

    from indexer.early_encoder import THREAD_NAME, open_encoder_early
    from retrieval.model import image_onnx

    _index(tmp_path, photo_folder, settings, "first")  # torch, then the export: later runs encode with ONNX
    own = _vectors_by_name(_index(tmp_path, photo_folder, replace(settings, workers=2), "own"), photo_folder)
    image_onnx._OPEN.clear()
    assert open_encoder_early(tmp_path / "early", settings.model, CPU)
    for thread in [t for t in threading.enumerate() if t.name == THREAD_NAME]:
        thread.join()
    (opened,) = image_onnx._OPEN.values()
    early = _vectors_by_name(_index(tmp_path, photo_folder, replace(settings, workers=2), "early"), photo_folder)
    assert list(image_onnx._OPEN.values()) == [opened]  # the run's own open found it
    assert sorted(early) == sorted(own) and min(float(np.dot(own[n], early[n])) for n in own) >= 0.99999
    assert not open_encoder_early(tmp_path / "early", settings.model, CPU)  # it exists now: maybe nothing to encode


def test_the_command_opens_a_new_index_encoder_before_its_own_imports(
    settings, photo_folder, tmp_path, cache_home, monkeypatch
):
    """`clipsearch index FOLDER --index NEW --model M`: ``clipsearch.launch`` starts building the session before
    the command line is imported, and the command's run encodes with that very session."""
    import threading

    from typer.testing import CliRunner

    from clipsearch.cli import app
    from clipsearch.launch import open_encoder_first, plain_index_request
    from indexer import early_encoder
    from indexer.early_encoder import THREAD_NAME, open_encoder_early
    from retrieval.model import image_onnx
    from retrieval.store.recorded_model import model_for_index

    monkeypatch.setenv("CLIPSEARCH_EXPORT_TEXT", "0")
    _index(tmp_path, photo_folder, settings, "first")  # torch, then the export: later runs encode with ONNX
    image_onnx._OPEN.clear()
    argv = ["index", str(photo_folder), "--index", str(tmp_path / "new"), "--model", settings.model.name, "-q"]
    assert open_encoder_first(plain_index_request(argv, {}))
    for thread in [t for t in threading.enumerate() if t.name == THREAD_NAME]:
        thread.join()
    (opened,) = image_onnx._OPEN.values()
    spec = model_for_index(None, settings.model.name, None)  # as the command reads the same arguments
    looked_up = []
    with monkeypatch.context() as patch:  # the command's own start finds it under way: nothing looked up again
        patch.setattr(early_encoder, "cached_image_tower", lambda key: looked_up.append(key))
        assert open_encoder_early(tmp_path / "new", spec, CPU) and not looked_up
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert list(image_onnx._OPEN.values()) == [opened]  # the run's own open found it
    assert len(_vectors_by_name(tmp_path / "new", photo_folder)) == 16
    assert not open_encoder_first(plain_index_request(argv, {}))  # it exists now: maybe nothing to encode
    missing = ["index", str(tmp_path / "no such folder"), "--index", str(tmp_path / "other")]
    assert not open_encoder_first(plain_index_request(missing, {}))  # a typo exits at once, nothing to wait for


def test_a_batch_split_over_lanes_gives_the_same_vectors(settings, photo_folder, tmp_path, cache_home):
    """Indexing runs a part of each batch per core at once (``lanes``): every image's vector is the one a single
    run of the whole batch gives."""
    index_dir = _index(tmp_path, photo_folder, settings)
    tower = cached_image_tower(export_image_tower(index_dir).record.model_key)
    pixels = probe_pixels(tower.open().side, (0.5,) * 3, (0.25,) * 3)
    whole = tower.open(threads=1).encode_images(pixels)
    split = tower.open(threads=1, lanes=2).encode_images(pixels)
    assert split.shape == whole.shape
    assert np.min(np.sum(whole * split, axis=1)) >= 1 - 1e-6
    crops = np.random.default_rng(4).integers(0, 256, (7, tower.open().side, tower.open().side, 3), dtype=np.uint8)
    whole, split = tower.open(threads=1).encode_crops(crops), tower.open(threads=1, lanes=2).encode_crops(crops)
    assert split.shape == whole.shape and np.min(np.sum(whole * split, axis=1)) >= 1 - 1e-6  # each lane normalises


def _tiny_clip(**vision: object):
    """A seeded tiny open_clip CLIP whose vision config is ``TINY_MODEL_CFG``'s with ``vision`` changed."""
    import open_clip
    import torch

    from retrieval.testing import TINY_MODEL_CFG

    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    cfg["vision_cfg"].update(vision)
    torch.manual_seed(3)
    return open_clip.CLIP(**cfg).eval()


def _onnx_matches_torch(model, graph: Path) -> float:
    """The smallest cosine between the graph's and torch's unit vectors on 6 random batches of pixels."""
    import onnxruntime
    import torch

    side = model.visual.image_size[0]
    pixels = np.random.default_rng(8).standard_normal((6, 3, side, side)).astype(np.float32)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1).numpy()
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"pixels": pixels})
    return float(np.min(np.sum(reference * unit_rows(features), axis=1)))


@pytest.mark.parametrize(
    ("vision", "form"),
    [
        ({}, "vit-lean-1"),  # class-token pooling: the last block computes the class token alone
        ({"pool_type": "avg"}, "vit-lean-1"),  # every token pooled: the last block computes them all
        ({"final_ln_after_pool": True}, "vit-lean-1"),
        ({"ls_init_value": 0.5}, "as-written-1"),  # layer scale: not repeated by the lean rewrite
        ({"attentional_pool": True}, "as-written-1"),
    ],
)
def test_a_vit_exports_lean_where_it_fits_and_as_written_elsewhere(vision, form, tmp_path):
    """Both forms give torch's vectors; the lean one has no patch Conv and far fewer Transposes (work per image)."""
    import onnx

    from retrieval.model.image_export import export_image_onnx

    model = _tiny_clip(**vision)
    assert export_image_onnx(model, tmp_path / "image.onnx") == form
    assert _onnx_matches_torch(model, tmp_path / "image.onnx") >= 0.9999
    ops = [node.op_type for node in onnx.load(str(tmp_path / "image.onnx")).graph.node]
    if form == "vit-lean-1":
        assert export_image_onnx(model, tmp_path / "as-written.onnx", lean=False) == "as-written-1"
        as_written = [node.op_type for node in onnx.load(str(tmp_path / "as-written.onnx")).graph.node]
        assert "Conv" not in ops and "Conv" in as_written
        assert ops.count("Transpose") < as_written.count("Transpose") and len(ops) < len(as_written)


def _info_encode_line(index_dir: Path) -> str:
    """The line `clipsearch info` prints for the image tower."""
    from tests.test_cli import invoke

    result = invoke("info", "--index", index_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("encode:")]
    return line


def test_an_export_of_an_older_exporter_encodes_and_is_made_again(settings, photo_folder, tmp_path, cache_home):
    """An export recorded before the lean form (no ``graph`` in its record) is still used, then made again by the
    next export run, in the lean form; `clipsearch info` names the form on its image tower line."""
    from retrieval.model.text_onnx import TextTowerRecord

    index_dir = _index(tmp_path, photo_folder, settings)
    report = export_image_tower(index_dir)
    assert report.record.graph == "vit-lean-1"
    assert _info_encode_line(index_dir) == "encode:  ONNX float32 image tower (exported, current; lean ViT graph)"
    old = {key: value for key, value in json.loads(report.record.to_json()).items() if key != "graph"}
    (report.folder / RECORD_FILE).write_text(json.dumps(old))
    tower = cached_image_tower(report.record.model_key)
    assert tower.current and tower.outdated and TextTowerRecord.from_json(json.dumps(old)).graph == ""
    assert _info_encode_line(index_dir) == (
        "encode:  ONNX float32 image tower (exported, current; older export: re-made at the next index run)"
    )
    again = export_image_tower(index_dir)
    assert again.exported and again.record.graph == "vit-lean-1" and _recorded(index_dir)["graph"] == "vit-lean-1"
    assert not cached_image_tower(report.record.model_key).outdated
    assert _info_encode_line(index_dir).endswith("(exported, current; lean ViT graph)")


def test_a_lean_graph_that_misses_its_check_falls_back_to_the_tower_as_written(
    settings, photo_folder, tmp_path, cache_home, monkeypatch
):
    """When the lean graph does not match torch (here: its patch weights negated), the index run exports the
    tower as written instead: current, recorded as such, encoding as torch does, and named so by `info`."""
    import torch

    from retrieval.model import vit_export

    lean = vit_export.lean_image_tower

    def wrong_lean_tower(model):
        tower = lean(model)
        with torch.no_grad():
            tower.patch_weight.neg_()  # its own copy: the model's weights stay as they are
        return tower

    monkeypatch.setattr(vit_export, "lean_image_tower", wrong_lean_tower)
    index_dir = _index(tmp_path, photo_folder, settings)  # torch encodes, then the export (the CPU's default)
    record = _recorded(index_dir)
    assert record["graph"] == "as-written-1" and record["min_cosine"] >= 0.9999 and record["top10_same"]
    tower = cached_image_tower(record["model_key"])
    assert tower.current and not tower.outdated and tower.record.graph == "as-written-1"
    assert _info_encode_line(index_dir) == "encode:  ONNX float32 image tower (exported, current; graph as written)"
    pixels = np.random.default_rng(5).standard_normal((12, 3, tower.open().side, tower.open().side))
    pixels = pixels.astype(np.float32)
    encoder = Encoder.load(settings.model, CPU)
    assert np.min(np.sum(encoder.encode_images(pixels) * tower.open().encode_images(pixels), axis=1)) >= 0.9999

    from retrieval.model.image_export import export_image_onnx

    assert export_image_onnx(encoder.model, tmp_path / "wrong.onnx") == "vit-lean-1"  # the wrong graph exports...
    assert _onnx_matches_torch(encoder.model, tmp_path / "wrong.onnx") < 0.9999  # ... and misses the check


def test_an_export_keeps_its_weights_in_one_recorded_side_file(settings, photo_folder, tmp_path, cache_home):
    """Each graph's weights sit in one side file beside it (a session builds in half the time): recorded with the
    graph, so a missing or altered side file makes the export not current until it is made again."""
    from retrieval.model.text_onnx import side_file

    index_dir = _index(tmp_path, photo_folder, settings)
    report = export_image_tower(index_dir)
    graphs = [name for name in report.record.files if name.endswith(".onnx")]
    assert "image.onnx" in graphs
    for graph in graphs:
        side = report.folder / side_file(graph)
        assert side.name in report.record.files and side.stat().st_size > (report.folder / graph).stat().st_size
    tower = cached_image_tower(report.record.model_key)
    pixels = probe_pixels(int(tower.open().session.get_inputs()[0].shape[-1]), (0.5,) * 3, (0.25,) * 3)[:4]
    vectors = tower.open().encode_images(pixels)

    side = report.folder / side_file("image.onnx")
    weights = side.read_bytes()
    side.write_bytes(weights[:-4] + bytes(4))  # same size, other weights
    assert cached_image_tower(report.record.model_key).problem == "the cached image tower's files changed"
    side.unlink()
    assert not cached_image_tower(report.record.model_key).current
    again = export_image_tower(index_dir)
    assert again.exported and cached_image_tower(again.record.model_key).current
    np.testing.assert_allclose(cached_image_tower(again.record.model_key).open().encode_images(pixels), vectors,
                               atol=1e-6)  # fmt: skip


def test_an_export_with_its_weights_inside_keeps_working(settings, photo_folder, tmp_path, cache_home):
    """An export made before side files (weights inside the graph, none recorded) is current and encodes the
    same; it is not made again."""
    from dataclasses import replace

    import onnx

    from retrieval.model.text_onnx import side_file, stamp_files

    index_dir = _index(tmp_path, photo_folder, settings)
    report = export_image_tower(index_dir)
    tower = cached_image_tower(report.record.model_key)
    pixels = probe_pixels(int(tower.open().session.get_inputs()[0].shape[-1]), (0.5,) * 3, (0.25,) * 3)[:4]
    vectors = tower.open().encode_images(pixels)
    graphs = [name for name in report.record.files if name.endswith(".onnx")]
    for graph in graphs:
        onnx.save_model(onnx.load(str(report.folder / graph)), str(report.folder / graph))  # weights inside
        (report.folder / side_file(graph)).unlink()
    files, digest = stamp_files(report.folder, [*graphs, "identity.json"])
    (report.folder / RECORD_FILE).write_text(replace(report.record, files=files, digest=digest).to_json())

    tower = cached_image_tower(report.record.model_key)
    assert tower.current and not tower.outdated and not list(report.folder.glob("*.data"))
    np.testing.assert_allclose(tower.open().encode_images(pixels), vectors, atol=1e-6)
    assert not export_image_tower(index_dir).exported


def test_towers_whose_weights_would_not_fit_in_one_protobuf_still_export(tmp_path, monkeypatch):
    """Protobuf holds at most 2 GB (ViT-H-14's image tower is ~2.5 GB in float32): no step of an export writes the
    weights inside one graph. Here the limit is made small, below the tiny towers' weights, and refused where onnx
    meets it; both towers still export, with their weights in the side file, and encode as torch does."""
    import onnx
    import torch
    from onnx.serialization import _ProtobufSerializer

    from retrieval.model.image_export import export_image_onnx
    from retrieval.model.text_export import export_onnx
    from retrieval.model.text_onnx import cpu_session, side_file

    limit = 400_000
    serialize = _ProtobufSerializer.serialize_proto

    def within_limit(self, proto):
        if proto.ByteSize() > limit:
            raise ValueError(f"The proto size is larger than the limit ({limit:,} bytes here, 2 GB in protobuf)")
        return serialize(self, proto)

    model = _tiny_clip()
    assert sum(p.numel() * 4 for p in model.visual.parameters()) > limit
    monkeypatch.setattr(_ProtobufSerializer, "serialize_proto", within_limit)
    for lean, form in ((True, "vit-lean-1"), (False, "as-written-1")):
        graph = tmp_path / f"{form}.onnx"
        assert export_image_onnx(model, graph, lean=lean) == form
        assert (tmp_path / side_file(graph.name)).stat().st_size > limit
        assert _onnx_matches_torch(model, graph) >= 0.9999
    with pytest.raises(ValueError, match="larger than the limit"):  # the same weights inside the graph: refused
        onnx.save_model(onnx.load(str(graph)), str(tmp_path / "inline.onnx"))

    export_onnx(model, tmp_path / "text.onnx")
    tokens = np.random.default_rng(4).integers(1, 1000, (3, 32))  # the whole context: what encode_text takes
    tokens[:, -1] = 49407  # end of text: the highest id, where the tower pools
    with torch.no_grad():
        reference = torch.nn.functional.normalize(model.encode_text(torch.from_numpy(tokens)), dim=-1).numpy()
    (features,) = cpu_session(tmp_path / "text.onnx", 1).run(None, {"tokens": tokens})
    assert np.min(np.sum(reference * unit_rows(features), axis=1)) >= 0.9999
