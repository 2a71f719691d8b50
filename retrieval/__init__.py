"""clipsearch: cross-modal image search over your photo folders.

The read side and the shared core. Import what you need from the submodules, e.g.
``from retrieval.search.engine import SearchEngine``; nothing heavy is imported here so the CLI starts fast.

Importing this package (every part of the library does, ``indexer`` too) makes idle OpenMP threads sleep instead
of spinning, for a program that uses the library as much as for the ``clipsearch`` command: on a busy machine,
or beside the indexer's decoding workers, FAISS's and torch's spinning threads steal the cores the work needs (a
one-query search was 5-8x slower with 2 spinning threads under load; docs/benchmarks.md). OpenMP reads the
setting once, when its runtime loads, so it must be set before the first ``import faiss`` or ``import torch``:
a program that imported either before clipsearch keeps whatever it had. A user's own ``OMP_WAIT_POLICY`` wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
