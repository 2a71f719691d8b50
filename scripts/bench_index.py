"""Indexing throughput against the encoder's own, on realistic 12-megapixel JPEGs, plus search latency.

    python scripts/bench_index.py --images 200            # the lead's figures: ~3 minutes on 2 cores
    python scripts/bench_index.py --images 200 --int8     # adds the dynamic-int8 image encoder and its cost

Measured in one run, on ViT-B-32 (seeded random weights: the same arithmetic as trained ones):
  encoder-only    images/s of Encoder.encode_images on pre-decoded, preprocessed tensors (the physical limit)
  decode-only     images/s of one worker reading, hashing, draft-decoding and preprocessing the photos
  end to end      images/s of the indexing pipeline on a fresh index (scan, decode in worker processes, encode,
                  commit); "steady" leaves out the one-off model load, "command" is `clipsearch index` itself
  search          warm latency of one text query through SearchEngine, and `clipsearch search` cold, from process
                  start to printed results
The photos (4000x3000 JPEG, quality 92, 4:2:0, ~4.4 MB like a phone's) have natural-image statistics: a 1/f
spectrum in luminance with weaker chroma, sharp-edged occluders, fine texture and sensor noise. They are made
once into --photos and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the clipsearch command does (see docs/benchmarks.md)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH, HEIGHT = 4000, 3000
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipsearch-bench"
QUERIES = ["a dog on the beach", "a red car at night", "mountains in the snow", "a birthday cake", "a cat"]


# --- photos -------------------------------------------------------------------------------------------------------


def spectral_field(rng: np.random.Generator, height: int, width: int, alpha: float, channels: int) -> np.ndarray:
    """Gaussian noise with a 1/f^alpha amplitude spectrum (alpha ~1 is the statistics of natural images)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    amplitude = radius**-alpha
    amplitude[0, 0] = 0.0
    fields = []
    for _ in range(channels):
        phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
        field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
        fields.append(field / field.std())
    return np.stack(fields, axis=-1).astype(np.float32)


def make_photo(path: Path, seed: int, detail: np.ndarray, width: int = WIDTH, height: int = HEIGHT) -> None:
    from PIL import Image, ImageDraw

    WIDTH, HEIGHT = width, height  # noqa: N806  (the 12-MP code below, at any size)
    scale = WIDTH / 4000
    rng = np.random.default_rng(seed)
    coarse = spectral_field(rng, max(8, HEIGHT // 8), max(8, WIDTH // 8), 1.0, 3)
    luma, chroma = coarse[..., :1], coarse[..., 1:] * 0.35
    yuv_to_rgb = np.array([[1, 0, 1.4], [1, -0.34, -0.71], [1, 1.77, 0]], dtype=np.float32)
    rgb = np.concatenate([luma, chroma], axis=-1) @ yuv_to_rgb.T * rng.uniform(35, 55) + rng.uniform(60, 180, 3)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):  # occluders: the sharp edges natural scenes are full of
        x, y = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        size = max(4, int(rng.integers(150, 1200) * scale))
        colour = tuple(int(c) for c in rng.integers(20, 235, 3))
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + size, y + int(size * rng.uniform(0.4, 1.5))], fill=colour)
        else:
            corners = rng.integers(-size, size, (int(rng.integers(3, 6)), 2)) + (x, y)
            draw.polygon([(int(cx), int(cy)) for cx, cy in corners], fill=colour)
    pixels = np.asarray(image, dtype=np.float32)
    texture = np.roll(detail, (int(rng.integers(0, HEIGHT // 2)), int(rng.integers(0, WIDTH // 2))), axis=(0, 1))
    texture = np.repeat(np.repeat(texture, 2, axis=0), 2, axis=1)[:HEIGHT, :WIDTH]
    pixels += (12.0 * texture)[..., None] + rng.normal(0, 2.5, (HEIGHT, WIDTH, 1)).astype(np.float32)
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "clipsearch-bench", "synthetic 12MP" if scale == 1 else "synthetic"
    exif[0x0112] = 6 if seed % 5 == 0 else 1  # every fifth photo is taken in portrait (rotated by EXIF)
    tmp = path.with_suffix(".tmp")
    photo.save(tmp, "JPEG", quality=92, subsampling=2, exif=exif.tobytes())
    os.replace(tmp, path)


SETS = {"photos": (4000, 3000, "photos-12mp"), "small": (500, 375, "jpegs-500x375")}  # --set: 12 MP, or web-sized


def _make_photo_job(job: tuple[str, int, str, int, int]) -> None:
    path, seed, detail_file, width, height = job
    make_photo(Path(path), seed, np.load(detail_file), width, height)


def ensure_photos(folder: Path, count: int, width: int = WIDTH, height: int = HEIGHT) -> list[Path]:
    """The first ``count`` photos of ``folder``, generated (in parallel) when missing."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:05d}.jpg" for i in range(count)]
    missing = [(str(p), i) for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        detail_file = folder / "detail.npy"
        if not detail_file.is_file():
            detail = spectral_field(np.random.default_rng(7), (height + 1) // 2, (width + 1) // 2, 0.8, 1)[..., 0]
            np.save(detail_file, detail)
        started = time.perf_counter()
        with Pool(os.cpu_count() or 1) as pool:
            jobs = [(p, i, str(detail_file), width, height) for p, i in missing]
            pool.map(_make_photo_job, jobs, chunksize=max(1, len(jobs) // (8 * (os.cpu_count() or 1))))
        print(f"generated {len(missing)} photos in {time.perf_counter() - started:.0f} s", flush=True, file=sys.stderr)
    return paths


# --- measurements -----------------------------------------------------------------------------------------------


def ensure_model(spec: str | None) -> str:
    if spec:
        return spec
    import open_clip

    from retrieval.testing import make_random_model_dir

    folder = CACHE / "vit-b-32"
    if not (folder / "open_clip_model.safetensors").is_file():
        make_random_model_dir(folder, model_cfg=open_clip.get_model_config("ViT-B-32"), seed=0)
    return f"local-dir:{folder}"


def decode_rate(paths: list[Path], encoder) -> tuple[float, list]:
    """Images/s of one process doing a worker's job (read, hash, draft-decode, EXIF, preprocess) on one thread,
    as DataLoader workers run."""
    import torch

    from retrieval.images import ImageFileDataset

    dataset = ImageFileDataset([str(p) for p in paths], encoder.preprocess, encoder.identity.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        items = [dataset[i] for i in range(len(paths))]
        return len(paths) / (time.perf_counter() - started), [item.pixels for item in items]
    finally:
        torch.set_num_threads(threads)


def encoder_rate(encoder, tensors: list, batch_size: int, images: int) -> float:
    """Images/s of the encoder alone on pre-decoded tensors (batches cycled from ``tensors``)."""
    import torch

    batch = torch.stack([tensors[i % len(tensors)] for i in range(batch_size)])
    encoder.encode_images(batch)  # warm-up
    started, done = time.perf_counter(), 0
    while done < images:
        encoder.encode_images(batch)
        done += batch_size
    return done / (time.perf_counter() - started)


def index_rate(folder: Path, model: str, args, int8: bool = False) -> dict:
    """The pipeline on a fresh index, in this process (worker processes fork from it, as from the command)."""
    from indexer.pipeline import IndexSettings, index_paths
    from retrieval.model.spec import ModelSpec

    index_dir = Path(tempfile.mkdtemp(prefix="bench-index-", dir=args.scratch))
    options = {"int8": True} if int8 else {}  # (keeps the script runnable on versions before int8, for comparisons)
    if "export_text" in IndexSettings.__dataclass_fields__:  # the in-process figure is indexing alone
        options["export_text"] = False
    settings = IndexSettings(
        model=ModelSpec(model, None), batch_size=args.batch_size, workers=args.workers, device=args.device, **options
    )
    summary = index_paths(index_dir, [folder], settings, progress=False)
    assert summary.failed == 0 and summary.encoded == args.images, summary.line()
    return {
        "index_dir": index_dir,
        "images_per_s": summary.encoded / summary.seconds,
        "steady_images_per_s": summary.encoded / (getattr(summary, "encode_seconds", 0) or summary.seconds),
        "seconds": summary.seconds,
    }


def clipsearch(*arguments: str) -> list[str]:
    """The `clipsearch` command line run from this checkout (installed or not)."""
    return [sys.executable, "-m", "clipsearch", *arguments]


def command_rate(folder: Path, model: str, args) -> float:
    index_dir = Path(tempfile.mkdtemp(prefix="bench-cli-", dir=args.scratch))
    command = clipsearch("index", str(folder), "--index", str(index_dir), "--model", model, "-q")
    command += ["--batch-size", str(args.batch_size)]
    started = time.perf_counter()
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    wall = time.perf_counter() - started
    match = re.search(r"added (\d+)", output)
    assert match and int(match.group(1)) == args.images, output
    return args.images / wall


def search_latency(index_dir: Path) -> dict:
    from retrieval.search.engine import SearchEngine

    with SearchEngine(index_dir, device="cpu") as engine:
        engine.search_text("warm up", k=10)
        times = []
        for i in range(20):
            started = time.perf_counter()
            engine.search_text(f"{QUERIES[i % len(QUERIES)]} {i}", k=10)
            times.append(time.perf_counter() - started)
    return {"p50_ms": round(float(np.median(times)) * 1000, 1), "max_ms": round(max(times) * 1000, 1)}


def cold_search(index_dir: Path, runs: int = 3, device: str | None = None) -> float:
    """`clipsearch search` wall time, process start to printed results (median of ``runs``)."""
    times = []
    for i in range(runs):
        command = clipsearch("search", QUERIES[i % len(QUERIES)], "--index", str(index_dir), "-k", "5")
        command += ["--device", device] if device else []
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)), 2)


def int8_cost(model: str, tensors: list) -> dict:
    """How far int8 image vectors move from fp32 ones, and what that does to text-query top-10s."""
    import torch

    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec
    from retrieval.store.topk import top_k
    from retrieval.store.tuning import probe_texts, recall_at_k

    spec = ModelSpec(model, None)
    pixels = torch.stack(tensors)
    full = Encoder.load(spec, CPU)
    reference, texts = full.encode_images(pixels), full.encode_texts(probe_texts())
    quantized = Encoder.load(spec, CPU, int8=True).encode_images(pixels)
    exact = top_k(texts @ reference.T, 10)[1]
    approx = top_k(texts @ quantized.T, 10)[1]
    return {
        "mean_cosine_int8_vs_fp32": round(float(np.mean(np.sum(reference * quantized, axis=1))), 5),
        "text_recall_at_10": round(recall_at_k(approx, exact), 4),
        "images": len(tensors),
    }


def encoder_only_pinned(model: str, device, batch_size: int, seconds: float = 3.0) -> dict:
    """Images/s of the encoder alone on a host batch (pinned on CUDA, as the pipeline feeds it)."""
    import torch

    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec

    encoder = Encoder.load(ModelSpec(model, None), device)
    size = encoder.identity.image_size
    batch = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    if device.is_cuda:
        batch = batch.pin_memory()
    for _ in range(2):
        encoder.encode_images(batch)  # warm-up (cuDNN / kernel selection)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 2 * batch_size:
        encoder.encode_images(batch)  # returns host numpy: every batch is synchronised
        done += batch_size
    return {"images_per_s": round(done / (time.perf_counter() - started), 1), "batch": batch_size}


def clipsearch_in(checkout: Path, *arguments: str) -> tuple[list[str], dict]:
    """The `clipsearch` command of another checkout (e.g. an older commit exported to a folder), and its env."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return [sys.executable, "-m", "clipsearch", *arguments], env


def timed_index_command(
    checkout: Path, folder: Path, model: str, scratch: Path | None, *extra: str, env_extra: dict | None = None
) -> float:
    """Seconds of `clipsearch index` on a fresh index, from process start to exit."""
    index_dir = Path(tempfile.mkdtemp(prefix="bench-cli-", dir=scratch))
    command, env = clipsearch_in(checkout, "index", str(folder), "--index", str(index_dir), "--model", model, "-q")
    env.update(env_extra or {})
    started = time.perf_counter()
    done = subprocess.run([*command, *extra], capture_output=True, text=True, cwd=checkout, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"clipsearch index failed in {checkout}:\n{done.stderr}")
    return wall


def decode_bound(folder: Path, model: str, count: int) -> dict:
    """The decode+encode bound of this machine: every image costs the encoder C / E core-seconds (E: encoder-only
    images/s on all C cores) and its decoding 1 / D (D: one worker's images/s on one core), so no schedule of both
    on C cores beats C / (C / E + 1 / D) images/s."""
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec

    encoder = Encoder.load(ModelSpec(model, None), CPU)
    paths = sorted(folder.glob("photo_*.jpg"))[:count]
    decode, tensors = decode_rate(paths, encoder)
    encode = encoder_rate(encoder, tensors, 32, 64)
    cores = os.cpu_count() or 1
    bound = cores / (cores / encode + 1 / decode)
    return {"encoder_only": round(encode, 2), "decode_one_core": round(decode, 1), "bound": round(bound, 2)}


def compare(args) -> None:
    """`clipsearch index` of --compare CHECKOUT and of this checkout, interleaved, process start to exit."""
    folder = args.photos
    model = ensure_model(args.model)
    sides = [("before", args.compare, {}), ("after", ROOT, {})]
    if args.without_export:  # the ONNX text-tower export `clipsearch index` runs after encoding (issue 13)
        sides.append(("after_without_text_export", ROOT, {"CLIPSEARCH_EXPORT_TEXT": "0"}))
    runs: dict[str, list[float]] = {side: [] for side, _, _ in sides}
    load = [os.getloadavg()[0]]
    bound = [decode_bound(folder, model, min(32, args.images))]
    for round_ in range(args.rounds):
        for side, checkout, env in sides:
            wall = timed_index_command(checkout, folder, model, args.scratch, env_extra=env)
            runs[side].append(args.images / wall)
            line = {"round": round_, "side": side, "seconds": round(wall, 2), "images_per_s": args.images / wall}
            print(json.dumps(line | {"load": os.getloadavg()[0]}), flush=True)
    bound.append(decode_bound(folder, model, min(32, args.images)))
    load.append(os.getloadavg()[0])
    summary = {
        "set": args.set,
        "images": args.images,
        **{f"{side}_images_per_s": [round(x, 2) for x in rates] for side, rates in runs.items()},
        "bound_before_and_after_runs": bound,
        "load": load,
    }
    print(json.dumps(summary))


def _exactly(folder: Path, count: int) -> Path:
    """A folder holding only the first ``count`` photos (links), so a run indexes exactly that many."""
    exact = folder / f".first-{count}"
    if not exact.is_dir():
        exact.mkdir()
        for path in sorted(folder.glob("photo_*.jpg"))[:count]:
            (exact / path.name).symlink_to(path)
    return exact


NO_EXPORT = {"CLIPSEARCH_EXPORT_TEXT": "0"}  # the ONNX text-tower export after indexing: timed apart, not here


def figures(args) -> None:
    """One JSON line per figure, on --device (default auto: the GPU where there is one). For scripts/gpu_check.sh."""
    from indexer.pipeline import IndexSettings, default_batch_size, index_paths
    from retrieval.model.device import resolve_device
    from retrieval.model.spec import ModelSpec

    device = resolve_device(args.device)
    model = ensure_model(args.model)
    batch = args.batch_size or default_batch_size(device)
    common = {"device": device.torch_name, "cores": os.cpu_count(), "model": "ViT-B-32 (seeded random weights)"}

    def emit(figure: str, **values) -> None:
        print(json.dumps({"figure": figure, **values, **common, "load": round(os.getloadavg()[0], 2)}), flush=True)

    emit("encoder_only_pinned", **encoder_only_pinned(model, device, batch))
    index_dir = None
    for set_name, count in (("small", args.small_images), ("photos", args.photo_images)):
        width, height, name = SETS[set_name]
        folder = CACHE / name
        ensure_photos(folder, count, width, height)
        folder = _exactly(folder, count)
        index_dir = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=args.scratch))
        settings = IndexSettings(
            model=ModelSpec(model, None), batch_size=args.batch_size, device=device, export_text=False
        )
        summary = index_paths(index_dir, [folder], settings, progress=False)
        assert summary.encoded == count and summary.failed == 0, summary.line()
        emit(
            f"end_to_end_{width}x{height}",
            images=count,
            images_per_s=round(count / summary.seconds, 1),
            steady_images_per_s=round(count / (summary.encode_seconds or summary.seconds), 1),
        )
        if set_name == "small":
            small_index = index_dir
            wall = timed_index_command(
                ROOT, folder, model, args.scratch, "--device", device.torch_name, env_extra=NO_EXPORT
            )
            emit(
                f"cli_index_{width}x{height}", images=count, images_per_s=round(count / wall, 1), seconds=round(wall, 2)
            )
    ensure_photos(CACHE / SETS["small"][2], batch, *SETS["small"][:2])
    one_batch = _exactly(CACHE / SETS["small"][2], batch)
    wall = timed_index_command(ROOT, one_batch, model, args.scratch, "--device", device.torch_name, env_extra=NO_EXPORT)
    emit("cli_start_to_first_batch", seconds=round(wall, 2), images=batch, note="process start to exit, one batch")
    emit("query_warm", **warm_queries(small_index, device))
    emit("query_cold", seconds=cold_search(small_index, device=device.torch_name))


def warm_queries(index_dir: Path, device, count: int = 100) -> dict:
    """Text queries of every length through one SearchEngine: p50, p99 and max (an outlier shows in max)."""
    from retrieval.search.engine import SearchEngine

    words = ["a", "photo", "of", "the", "big", "red", "dog", "running", "on", "a", "sunny", "beach", "near", "blue"]
    words += ["water", "at", "sunset", "with", "friends"]
    with SearchEngine(index_dir, device=device) as engine:
        engine.search_text("warm up", k=10)
        times = []
        for i in range(count):
            query = " ".join(words[: 1 + i % len(words)]) + f" {i}"
            started = time.perf_counter()
            engine.search_text(query, k=10)
            times.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "queries": count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--photos", type=Path, default=CACHE / "photos-12mp", help="where the photos are kept")
    parser.add_argument("--model", default=None, help="default: ViT-B-32 with seeded random weights")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's (32 CPU, 256 CUDA)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: the pipeline's)")
    parser.add_argument("--device", default=None, help="default: cpu; with --figures: auto")
    parser.add_argument("--encoder-images", type=int, default=96, help="images timed for encoder-only")
    parser.add_argument("--int8", action="store_true", help="also measure the dynamic-int8 image encoder")
    parser.add_argument("--no-command", action="store_true", help="skip the `clipsearch index` subprocess run")
    parser.add_argument("--scratch", type=Path, default=None, help="where the benchmark indexes go")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--set", choices=sorted(SETS), default="photos", help="12-MP photos or 500x375 JPEGs")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout: interleaved CLI runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--without-export", action="store_true", help="--compare: also without the text export")
    parser.add_argument("--figures", action="store_true", help="one JSON line per figure (scripts/gpu_check.sh)")
    parser.add_argument("--small-images", type=int, default=64, help="--figures: 500x375 JPEGs")
    parser.add_argument("--photo-images", type=int, default=32, help="--figures: 12-MP photos")
    args = parser.parse_args()
    if args.figures:
        args.device = args.device or "auto"
        return figures(args)
    args.device = args.device or "cpu"
    args.batch_size = args.batch_size or 32
    width, height, name = SETS[args.set]
    args.photos = args.photos if args.set == "photos" else CACHE / name
    ensure_photos(args.photos, args.images, width, height)
    args.photos = _exactly(args.photos, args.images)
    if args.compare:
        return compare(args)

    import torch

    from retrieval.model.device import resolve_device
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec

    args.device = resolve_device(args.device)  # once, here: the script's top
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}")
    paths = sorted(args.photos.glob("photo_*.jpg"))
    size_mb = np.mean([p.stat().st_size for p in paths]) / 1e6
    model = ensure_model(args.model)
    results: dict = {"images": args.images, "photo_mb": round(size_mb, 2), "batch_size": args.batch_size}
    results["load_before"] = os.getloadavg()[0]
    encoder = Encoder.load(ModelSpec(model, None), args.device)
    rate, tensors = decode_rate(paths[: min(48, len(paths))], encoder)
    results["decode_only_images_per_s_one_process"] = round(rate, 1)
    results["encoder_only_images_per_s"] = round(
        encoder_rate(encoder, tensors, args.batch_size, args.encoder_images), 2
    )
    run = index_rate(args.photos, model, args)
    results["index_images_per_s"] = round(run["images_per_s"], 2)
    results["index_steady_images_per_s"] = round(run["steady_images_per_s"], 2)
    again = encoder_rate(encoder, tensors, args.batch_size, args.encoder_images)  # before and after: load drifts
    results["encoder_only_again_images_per_s"] = round(again, 2)
    encoder_only = (results["encoder_only_images_per_s"] + again) / 2
    results["ratio_steady"] = round(run["steady_images_per_s"] / encoder_only, 3)
    results["ratio_whole_run"] = round(run["images_per_s"] / encoder_only, 3)
    if not args.no_command:
        results["command_images_per_s"] = round(command_rate(args.photos, model, args), 2)
    results["search_warm_ms"] = search_latency(run["index_dir"])
    results["search_cold_s"] = cold_search(run["index_dir"])
    if args.int8:
        quantized = Encoder.load(ModelSpec(model, None), args.device, int8=True)
        int8_rate = encoder_rate(quantized, tensors, args.batch_size, args.encoder_images)
        results["int8_encoder_only_images_per_s"] = round(int8_rate, 2)
        int8_run = index_rate(args.photos, model, args, int8=True)
        results["int8_index_steady_images_per_s"] = round(int8_run["steady_images_per_s"], 2)
        results["int8_ratio_steady"] = round(int8_run["steady_images_per_s"] / int8_rate, 3)
        results["int8_cost"] = int8_cost(model, tensors)
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    r = results
    lines = [
        f"{args.images} photos of {size_mb:.1f} MB, ViT-B-32, batch {args.batch_size}:",
        f"  encoder only      {encoder_only:6.2f} images/s (pre-decoded tensors, mean of before and after)",
        f"  indexing, steady  {r['index_steady_images_per_s']:6.2f} images/s  ratio {r['ratio_steady']:.2f}"
        " (goal >= 0.9)",
        f"  indexing, whole   {r['index_images_per_s']:6.2f} images/s  ratio {r['ratio_whole_run']:.2f}"
        " (with model load)",
    ]
    if "command_images_per_s" in r:
        lines.append(f"  clipsearch index  {r['command_images_per_s']:6.2f} images/s (process start to exit)")
    lines.append(
        f"  one text query    {r['search_warm_ms']['p50_ms']} ms warm (p50); "
        f"`clipsearch search` cold {r['search_cold_s']} s"
    )
    if args.int8:
        lines.append(
            f"  int8 encoder      {r['int8_encoder_only_images_per_s']:6.2f} images/s; indexing steady "
            f"{r['int8_index_steady_images_per_s']:.2f} (ratio {r['int8_ratio_steady']:.2f}); cost {r['int8_cost']}"
        )
    lines.append(f"  load average      {r['load_before']:.2f} before, {r['load_after']:.2f} after")
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
