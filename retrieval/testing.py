"""Real things made small, for tests and benchmarks only (the library never imports this module): a seeded
random-weight open_clip model folder, a server running in a background thread, and synthetic CLIP-like vectors.

Synthetic embeddings: clustered, anisotropic image vectors, and text queries that sit apart from them (the
modality gap), so approximate indexes are measured where they are weakest. Real CLIP ViT-B-32 embeddings share
these traits: a common offset per modality (image-image cosines ~0.5, text-image cosines of good matches ~0.3),
most variance in a few directions, and clusters of similar photos.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from retrieval.model.build import save_model_dir
from retrieval.unit import unit_rows


@dataclass(frozen=True)
class EmbeddingSpace:
    dim: int
    image_offset: np.ndarray
    text_offset: np.ndarray
    basis: np.ndarray  # rotation applied to anisotropic noise
    scales: np.ndarray  # per-direction spread, decaying
    centres: np.ndarray  # cluster centres (unscaled latent directions)
    weights: np.ndarray  # how often each cluster is photographed (Zipf-like)

    @classmethod
    def make(cls, dim: int = 512, clusters: int = 2000, seed: int = 0) -> EmbeddingSpace:
        rng = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        gap = 0.35  # cosine between the two modality offsets
        text_offset = gap * basis[:, 0] + np.sqrt(1 - gap**2) * basis[:, 1]
        scales = (np.arange(1, dim - 1) ** -0.3).astype(np.float32)  # content lives beside the two offsets
        scales /= np.linalg.norm(scales)
        centres = rng.standard_normal((clusters, dim - 2)).astype(np.float32)
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.7
        return cls(
            dim,
            basis[:, 0].astype(np.float32),
            text_offset.astype(np.float32),
            basis[:, 2:].astype(np.float32),
            scales,
            centres,
            weights / weights.sum(),
        )

    def _latent(self, rng: np.random.Generator, clusters: np.ndarray, spread: float) -> np.ndarray:
        noise = rng.standard_normal((len(clusters), self.dim - 2), dtype=np.float32)
        return ((self.centres[clusters] + spread * noise) * self.scales) @ self.basis.T

    def images(self, n: int, seed: int = 1, chunk: int = 100_000) -> Iterator[np.ndarray]:
        """``n`` unit image vectors, in chunks."""
        rng = np.random.default_rng(seed)
        for start in range(0, n, chunk):
            clusters = rng.choice(len(self.centres), size=min(chunk, n - start), p=self.weights)
            yield unit_rows(0.75 * self.image_offset + unit_rows(self._latent(rng, clusters, 0.8)))

    def all_images(self, n: int, seed: int = 1) -> np.ndarray:
        return np.concatenate(list(self.images(n, seed))) if n else np.zeros((0, self.dim), np.float32)

    def text_queries(self, n: int, seed: int = 2, content: float = 0.25) -> np.ndarray:
        """Unit "text" vectors: about a cluster, offset by the text modality, so their best cosines are ~0.3.
        ``content``: weight of the cluster part against the offset; another value is another distribution of
        queries (benchmarks tune on one and measure on another)."""
        rng = np.random.default_rng(seed)
        clusters = rng.choice(len(self.centres), size=n, p=self.weights)
        return unit_rows(self.text_offset + content * unit_rows(self._latent(rng, clusters, 1.0)))


TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_random_model_dir(out_dir: Path | str, model_cfg: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A seeded random-weight model folder: the offline stand-in for real weights in tests and benchmarks."""
    import open_clip
    import torch

    cfg = json.loads(json.dumps(model_cfg or TINY_MODEL_CFG))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    model.visual.preprocess_cfg = asdict(open_clip.transform.PreprocessCfg(size=cfg["vision_cfg"]["image_size"]))
    return save_model_dir(model, cfg, out_dir)


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` from a background thread (port 0: any free one) and yield its base URL; for tests, benchmarks
    and scripts that talk to a real server."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="clipsearch-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


def race_against_a_link(
    victim: Path, secret: Path, seconds: float, ask: Callable[[threading.Event, int], None], sizes=(256, 1024) * 2
) -> None:
    """For ``seconds``, swap ``victim`` back and forth with a symbolic link to ``secret`` (the photo keeps its
    inode, size and mtime) while ``ask(stop, size)`` runs in one thread per entry of ``sizes`` until ``stop`` is
    set; ``victim`` is whole again after. The attack on the file routes in tests and scripts/bench_hostile.py."""
    original, link = victim.with_name(f".{victim.name}.keep"), victim.with_name(f".{victim.name}.link")
    os.link(victim, original)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.symlink(secret, link)
            os.replace(link, victim)
            os.link(original, link)
            os.replace(link, victim)

    threads = [threading.Thread(target=swap)] + [threading.Thread(target=ask, args=(stop, s)) for s in sizes]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    os.replace(original, victim)


SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """A generator in ``scripts/`` (``make_shapes_dataset``...) as a module, loaded once per process and registered
    under its name: its dataclasses look their module up, and two loads would make two sets of classes."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


FONT_FOLDERS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")


def machine_fonts() -> list[Path]:
    """The DejaVu and Liberation TrueType fonts this machine has (regular, bold, serif, mono ...)."""
    return sorted(p for folder in FONT_FOLDERS for p in Path(folder).glob("*.ttf") if "Math" not in p.name)


def cluttered_background(size: tuple[int, int], rng: np.random.Generator, noise: float = 8.0):
    """A photo-like backdrop without text: smooth colour fields, shapes and sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    width, height = size
    coarse = (rng.random((height // 40 + 2, width // 40 + 2, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(4))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    grain = rng.normal(0, noise, (height, width, 3))
    return Image.fromarray((np.asarray(image, dtype=np.float32) + grain).clip(0, 255).astype(np.uint8))


def printed_text_photo(
    lines: list[str],
    size: tuple[int, int] = (800, 600),
    seed: int = 0,
    font_px: int = 40,
    angle: float = 0.0,
    dark_panel: bool = False,
    font: Path | None = None,
    noise: float = 8.0,
):
    """A photo of a printed sign, label or receipt: ``lines`` on a light (or dark) panel, rotated by ``angle``
    degrees, pasted on a cluttered background. The text is real glyphs of a machine font, for a real OCR model."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    image = cluttered_background(size, rng, noise)
    typeface = ImageFont.truetype(str(font or machine_fonts()[0]), font_px)
    widths = [typeface.getbbox(text)[2] for text in lines]
    pad, step = font_px // 2, int(font_px * 1.4)
    panel = Image.new("RGBA", (max(widths) + 2 * pad, step * len(lines) + 2 * pad), (0, 0, 0, 0))
    ink, paper = ((235, 235, 225), (30, 32, 40)) if dark_panel else ((20, 20, 25), (240, 238, 228))
    draw = ImageDraw.Draw(panel)
    draw.rectangle((0, 0, *panel.size), fill=(*paper, 255))
    for row, text in enumerate(lines):
        draw.text((pad, pad + row * step), text, font=typeface, fill=ink)
    panel = panel.rotate(angle, expand=True, resample=Image.BICUBIC)
    room = (max(0, size[0] - panel.width), max(0, size[1] - panel.height))
    image.paste(panel, (int(rng.integers(0, room[0] + 1)), int(rng.integers(0, room[1] + 1))), panel)
    return image
