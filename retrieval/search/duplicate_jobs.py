"""Near-duplicate groups for the server, within a cost bound: ``GET /api/duplicates`` is an exact pass over every
vector, so a request must not hold the query thread, start many passes at once, or ask for a threshold so low
that every pair of photos is one (12,000 images at 0.0002 took 44 s and 5.1 GB).

So: thresholds below ``SERVER_MIN_THRESHOLD`` are refused (``clipsearch duplicates`` still takes them, at the
user's own cost); the pass runs on its own thread, one at a time (a request for another threshold meanwhile is
answered 503 with Retry-After, a request for the same one waits for it); and the last ``KEPT_RESULTS`` results of
the current index generation are kept, so moving a slider back and forth costs one pass per distinct threshold.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from retrieval.errors import UsageError
from retrieval.search.duplicates import DuplicateGroup

SERVER_MIN_THRESHOLD = 0.8  # lower ones link unrelated photos, and the pairs grow with the square of the library
KEPT_RESULTS = 8
Result = tuple[list[DuplicateGroup], float]  # the groups, and the milliseconds their pass took


class DuplicatesBusy(Exception):
    """A pass at another threshold is running (503 with Retry-After)."""


class DuplicateJobs:
    """``groups(generation, threshold)``: a kept result, or one pass of ``compute(threshold)`` on the thread of
    this object."""

    def __init__(self, compute: Callable[[float], list[DuplicateGroup]]):
        self._compute = compute
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsearch-duplicates")
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[int, float], Result] = OrderedDict()
        self._running: tuple[tuple[int, float], Future] | None = None

    def groups(self, generation: int, threshold: float) -> Result:
        if threshold < SERVER_MIN_THRESHOLD:
            raise UsageError(
                f"the server groups duplicates at a threshold of {SERVER_MIN_THRESHOLD} or more "
                f"(lower ones link unrelated photos): use `clipsearch duplicates --threshold {threshold:g}`"
            )
        key = (generation, round(threshold, 4))
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
            if self._running is not None and not self._running[1].done():
                if self._running[0] != key:
                    raise DuplicatesBusy("the server is grouping duplicates at another threshold: try again shortly")
                future = self._running[1]
            else:
                future = self._worker.submit(self._timed, threshold)
                self._running = (key, future)
        result = future.result()
        with self._lock:
            for old in [kept for kept in self._kept if kept[0] != generation]:  # another index state
                del self._kept[old]
            self._kept[key] = result
            while len(self._kept) > KEPT_RESULTS:
                self._kept.popitem(last=False)
        return result

    def _timed(self, threshold: float) -> Result:
        started = time.perf_counter()
        groups = self._compute(threshold)
        return groups, (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self._worker.shutdown(wait=True)
