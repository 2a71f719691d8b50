"""clipsearch: cross-modal image search over your photo folders.

The read side and the shared core. Import what you need from the submodules, e.g.
``from retrieval.search.engine import SearchEngine``; nothing heavy is imported here so the CLI starts fast.
"""

__version__ = "0.1.0"
