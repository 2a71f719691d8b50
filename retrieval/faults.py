"""Fault injection for the crash tests: die, fail or pause at named points of a write. Inert unless asked for.

``CLIPSEARCH_FAULT="POINT:N[:ACTION],..."`` acts the N-th time the process reaches ``POINT``. Actions: ``kill``
(SIGKILL to itself, the default: no cleanup, no flush, exactly like ``kill -9``), ``enospc`` (raise
``OSError(ENOSPC)``, a disk that fills up), ``sigint`` (Ctrl-C) and ``sleep=SECONDS`` (hold whatever is held
there, e.g. the write lock).
``CLIPSEARCH_FAULT_AFTER_COMMITS=N`` is short for ``commit_end:N``.

Points: ``planned`` (scan and diff done, nothing written), ``commit_begin`` (rows flushed inside the chunk's
transaction, not committed), ``commit_end`` (chunk committed, FAISS not updated), ``vectors_tmp_written`` (new FAISS
file written under a temporary name), ``vectors_replaced`` (FAISS file renamed into place, its generation not yet
recorded), ``migrate`` (schema migration done inside its transaction, not committed), ``repair`` (check --repair
about to write), ``encode_batch`` (a Ray encoder actor about to encode a batch; ``indexer.ray_runner`` forwards
``CLIPSEARCH_FAULT`` to its actors), ``ocr_commit_begin`` / ``ocr_commit_end`` (a batch of the OCR pass written
inside its transaction, not committed / committed).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

FAULT_ENV = "CLIPSEARCH_FAULT"
AFTER_COMMITS_ENV = "CLIPSEARCH_FAULT_AFTER_COMMITS"
POINTS = (
    "planned",
    "commit_begin",
    "commit_end",
    "vectors_tmp_written",
    "vectors_replaced",
    "migrate",
    "repair",
    "encode_batch",
    "ocr_commit_begin",
    "ocr_commit_end",
)

_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Count a pass through ``name`` and act when a configured fault matches; a no-op in normal runs."""
    spec = os.environ.get(FAULT_ENV, "")
    after_commits = os.environ.get(AFTER_COMMITS_ENV, "")
    if not spec and not after_commits:
        return
    _reached[name] += 1
    for point, count, action in _parse(spec, after_commits):
        if point == name and count == _reached[name]:
            _act(action, name)


def reset_faults() -> None:
    """Forget how often each point was reached (for tests that run several faulty writes in one process)."""
    _reached.clear()


def _parse(spec: str, after_commits: str) -> list[tuple[str, int, str]]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, count, *rest = part.split(":")
        faults.append((point, int(count), rest[0] if rest else "kill"))
    if after_commits:
        faults.append(("commit_end", int(after_commits), "kill"))
    return faults


def _act(action: str, name: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # the signal is asynchronous; never run on past the point
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})")
    elif action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Python raises KeyboardInterrupt here, in the main thread
        time.sleep(5)
    elif action.startswith("sleep="):
        time.sleep(float(action.split("=", 1)[1]))
    else:
        raise ValueError(f"unknown fault action {action!r} in ${FAULT_ENV}")
