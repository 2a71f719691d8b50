"""The write side of clipsearch: scan folders, decode images, encode them, update the catalog and the index."""

import retrieval  # noqa: F401  (sets OMP_WAIT_POLICY before FAISS or torch loads: see retrieval/__init__.py)
