"""The one unit-normalisation: rows scaled to length 1, so inner products are cosine similarities."""

from __future__ import annotations

import numpy as np


def unit_rows(matrix: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Rows of unit length, computed and returned in ``dtype`` (zero rows stay zero); also undoes the float16
    rounding of stored embeddings' norms."""
    rows = np.asarray(matrix, dtype=dtype)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.maximum(norms, np.finfo(dtype).tiny)).astype(dtype, copy=False)
