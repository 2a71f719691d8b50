"""One writer per index: an OS lock on ``<index>/write.lock``, waited for with a message or refused at once.

The lock is ``flock``-based, so the kernel drops it when its holder dies (``kill -9`` included): a stale lock file
never blocks anyone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from retrieval.errors import IndexBusyError
from retrieval.store.layout import IndexLayout, unwritable_index_error


@contextmanager
def write_lock(layout: IndexLayout, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the index's write lock; when another process has it, tell ``on_wait`` and wait, or fail at once."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(layout.lock))
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
        if not wait:
            raise IndexBusyError(
                f"another clipsearch process is writing to {layout.root} (leave out --no-wait to wait for it)"
            ) from None
        if on_wait is not None:
            on_wait(f"another clipsearch process is writing to {layout.root}; waiting for it to finish (Ctrl-C stops)")
        lock.acquire(timeout=-1)
    except OSError as error:  # a read-only disk, no permission, or a file where the folder should be
        raise unwritable_index_error(layout.root, error) from None
    try:
        yield
    finally:
        lock.release()
