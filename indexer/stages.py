"""Threads joined by bounded queues, with failures that reach the caller instead of hanging the run.

Every stage runs ``target`` in a thread; a failure is kept and sets the shared ``stop`` event, and every blocking
put or get on a ``Channel`` wakes up within a tenth of a second once ``stop`` is set. So a writer that hits a full
disk, an encoder that fails, or a Ctrl-C in the main thread stops all stages, and the first failure is raised once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

DONE = object()  # put by a producer after its last item
_POLL_S = 0.1


class Stopped(Exception):
    """Raised inside a stage when the run is stopping because of a failure elsewhere."""


class Channel:
    """A bounded queue between two stages: holding ``maxsize`` items is what keeps memory flat."""

    def __init__(self, maxsize: int, stop: threading.Event):
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.stop = stop

    def put(self, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                self.queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        """The next item; ``Stopped`` once the run stops, even with items left (they are not committed)."""
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                return self.queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue


class Stage(threading.Thread):
    """One stage in a daemon thread: a process that is interrupted never waits for it to end by itself."""

    def __init__(self, name: str, target: Callable[[], Any], stop: threading.Event):
        super().__init__(name=f"clipsearch-{name}", daemon=True)
        self.target = target
        self.stop = stop
        self.error: BaseException | None = None
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self.target()
        except Stopped:
            pass
        except BaseException as error:  # noqa: BLE001  (kept and raised by the caller: nothing is lost)
            self.error = error
            self.stop.set()

    def wait(self) -> Any:
        """Join in short steps (a Ctrl-C in the main thread is still heard), then raise what the stage raised."""
        while self.is_alive():
            self.join(_POLL_S)
        if self.error is not None:
            raise self.error
        return self.result


def first_error(stages: list[Stage]) -> BaseException | None:
    return next((stage.error for stage in stages if stage.error is not None), None)
