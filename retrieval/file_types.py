"""Which file names are images: the suffixes the indexer walks for, and the ones a query term is read as a file
by. One list, so a format the indexer learns is also recognised in ``--add``/``--sub``."""

from __future__ import annotations

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
HEIF_SUFFIXES = frozenset({".heic", ".heif"})  # decodable with pillow-heif only
ALL_IMAGE_SUFFIXES = IMAGE_SUFFIXES | HEIF_SUFFIXES
