"""Synthetic CLIP-like embeddings for benchmarks and tests: clustered, anisotropic image vectors, and text queries
that sit apart from them (the modality gap), so approximate indexes are measured where they are weakest.

Real CLIP ViT-B-32 embeddings share these traits: a common offset per modality (image-image cosines ~0.5,
text-image cosines of good matches ~0.3), most variance in a few directions, and clusters of similar photos.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


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
            yield _unit(0.75 * self.image_offset + _unit(self._latent(rng, clusters, 0.8)))

    def all_images(self, n: int, seed: int = 1) -> np.ndarray:
        return np.concatenate(list(self.images(n, seed))) if n else np.zeros((0, self.dim), np.float32)

    def text_queries(self, n: int, seed: int = 2) -> np.ndarray:
        """Unit "text" vectors: about a cluster, offset by the text modality, so their best cosines are ~0.3."""
        rng = np.random.default_rng(seed)
        clusters = rng.choice(len(self.centres), size=n, p=self.weights)
        return _unit(self.text_offset + 0.25 * _unit(self._latent(rng, clusters, 1.0)))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
