"""A generated folder of hostile and odd files, each with what indexing it must produce.

``make_hostile_corpus(folder)`` writes the files and returns ``{path: Expect}``. Every entry is one input the
indexer must survive: indexed correctly (``ok``, with the upright size when it matters), recorded as failed with a
reason (``failed``, matched by substring), or either (``handled``: corrupt bytes that a lenient decoder may still
read) — but never a crash, a hang or a duplicate.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF"}


@dataclass(frozen=True)
class Expect:
    outcome: str  # "ok", "failed" or "handled"
    reason: str = ""  # substring of the recorded error when failed
    size: tuple[int, int] | None = None  # (width, height) recorded when ok

    def __str__(self) -> str:
        return f"{self.outcome} {self.reason or self.size or ''}".strip()


def picture(seed: int, size: tuple[int, int] = (80, 60), mode: str = "RGB") -> Image.Image:
    """Smooth colours plus noise, so each seed looks different to an encoder."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = (np.stack(channels, axis=-1) * 100 + 128 + rng.normal(0, 20, (height, width, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid little PNG whose header declares ``width`` x ``height``: a decompression bomb in 70 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A real JPEG with its SOF0 dimensions rewritten (65000 x 65000 = 4.2 gigapixels)."""
    data = bytearray(encoded(picture(1), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif(frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def palette_with_transparency(fmt: str) -> bytes:
    """16 colours, the top-left corner in palette entry 0, which is transparent."""
    image = picture(5).quantize(16)
    image.paste(0, (0, 0, 20, 20))
    return encoded(image, fmt, transparency=0)


def sixteen_bit(fmt: str) -> bytes:
    gray = np.array(picture(6).convert("L"), dtype=np.uint16) * 257
    image = Image.fromarray(gray)  # mode I;16
    assert image.mode == "I;16"
    return encoded(image, fmt)


def ztxt_bomb_png() -> bytes:
    """A PNG whose compressed text chunk inflates to 64 MB."""
    data = encoded(picture(7), "PNG")
    payload = b"Comment\0\0" + zlib.compress(b"A" * (64 << 20), 9)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + payload) & 0xFFFFFFFF)
    return data[:33] + chunk + data[33:]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_hostile_corpus(folder: Path) -> dict[str, Expect]:
    """Write the corpus into ``folder``; return ``{absolute path (as os.fsdecode gives it): Expect}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, Expect] = {}

    def add(name: str | bytes, data: bytes | None, outcome: Expect) -> None:
        path = os.path.join(os.fsencode(folder), os.fsencode(name))
        if data is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as file:
                file.write(data)
        expect[os.fsdecode(path)] = outcome

    base = picture(1)
    for ext, fmt in FORMATS.items():
        data = encoded(base, fmt)
        add(f"truncated_half.{ext}", data[: len(data) // 2], Expect("failed", "corrupt or truncated"))
        add(f"header_only.{ext}", data[:20], Expect("failed"))
        zeroed = bytearray(data)
        zeroed[len(data) // 2 : len(data) // 2 + 40] = bytes(40)
        add(f"zeroed_middle.{ext}", bytes(zeroed), Expect("handled"))
        add(f"valid.{ext}", data, Expect("ok", size=(80, 60)))

    add("empty.jpg", b"", Expect("failed", "empty file"))
    add("notes.jpg", b"shopping list: milk, eggs\n" * 20, Expect("failed", "not an image"))
    add("error_page.png", b"<html><body>404 Not Found</body></html>", Expect("failed", "not an image"))
    add("bomb.png", png_with_header_size(100_000, 100_000), Expect("failed", "decompression bomb"))
    add("bomb.jpg", jpeg_with_header_size(65_000, 65_000), Expect("failed", "decompression bomb"))
    add("text_bomb.png", ztxt_bomb_png(), Expect("handled"))
    add("cmyk.jpg", encoded(picture(2).convert("CMYK"), "JPEG"), Expect("ok", size=(80, 60)))
    add("gray16.png", sixteen_bit("PNG"), Expect("ok", size=(80, 60)))
    add("gray16.tif", sixteen_bit("TIFF"), Expect("ok", size=(80, 60)))
    add("palette_transparent.png", palette_with_transparency("PNG"), Expect("ok", size=(80, 60)))
    add("palette_transparent.gif", palette_with_transparency("GIF"), Expect("ok", size=(80, 60)))
    add("rgba.webp", encoded(picture(3, mode="RGBA"), "WEBP"), Expect("ok", size=(80, 60)))
    add("gray_alpha.png", encoded(picture(3, mode="LA"), "PNG"), Expect("ok", size=(80, 60)))
    add("bilevel.png", encoded(picture(4, mode="1"), "PNG"), Expect("ok", size=(80, 60)))
    add("animated.gif", animated_gif([picture(10), picture(11), picture(12)]), Expect("ok", size=(80, 60)))
    add("exif_rotated.jpg", exif_rotated_jpeg(picture(8)), Expect("ok", size=(60, 80)))
    add("progressive.jpg", encoded(picture(9), "JPEG", progressive=True), Expect("ok", size=(80, 60)))
    add("thin.png", encoded(Image.new("RGB", (1, 100_000), (30, 160, 90)), "PNG"), Expect("ok", size=(1, 100_000)))
    add("one_pixel.png", encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), Expect("ok", size=(1, 1)))
    add("jpeg_inside.png", encoded(picture(13), "JPEG"), Expect("ok", size=(80, 60)))
    add(b"caf\xe9 latin-1.jpg", encoded(picture(14), "JPEG"), Expect("ok", size=(80, 60)))
    add(b"f\xf6lder/inside.jpg", encoded(picture(15), "JPEG"), Expect("ok", size=(80, 60)))
    add("emoji \U0001f4f7 name.jpg", encoded(picture(16), "JPEG"), Expect("ok", size=(80, 60)))
    add("new\nline.jpg", encoded(picture(17), "JPEG"), Expect("ok", size=(80, 60)))
    add("folder.jpg/inside.png", encoded(picture(18), "PNG"), Expect("ok", size=(80, 60)))

    loop = os.path.join(os.fsencode(folder), b"loop.jpg")
    os.symlink(b"loop.jpg", loop)
    expect[os.fsdecode(loop)] = Expect("failed", "symbolic links")
    dangling = folder / "dangling.jpg"
    os.symlink("nowhere.jpg", dangling)
    expect[str(dangling)] = Expect("failed", "broken symbolic link")
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "back")  # a folder loop: never followed
    os.symlink("valid.jpg", folder / "link_to_valid.jpg")  # no row of its own: valid.jpg is indexed once
    fifo = folder / "pipe.jpg"
    os.mkfifo(fifo)
    expect[str(fifo)] = Expect("failed", "not a regular file")
    big = folder / "huge_sparse.jpg"
    with open(big, "wb") as file:
        file.truncate(3 << 30)  # 3 GiB that take no disk space
    expect[str(big)] = Expect("failed", "too large")
    _write(folder / ".hidden.jpg", encoded(picture(19), "JPEG"))  # hidden: never indexed, no row
    return expect
