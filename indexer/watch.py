"""Watched folders: file events (watchdog) are debounced into batches, and each batch is one ordinary incremental
run (``index_paths``) over the folders the events touched, with the same crash safety and write lock.

A burst (a camera import of 500 files) becomes one batch: a batch starts once no event has come for ``quiet_s``,
or ``max_wait_s`` after its first event while events keep coming. Between batches the write lock is free, so a
manual ``clipsearch index`` can run in between. A file still being copied when its batch runs is recorded as
failed (truncated) and indexed again when its last write changes it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from indexer.pipeline import IndexSettings, IndexSummary, index_paths, preload_encoder
from indexer.scan import image_suffixes, resolve_folder
from retrieval.errors import ClipsearchError, UsageError
from retrieval.model.device import Device
from retrieval.store.catalog import Catalog, is_under
from retrieval.store.layout import IndexLayout
from retrieval.store.recorded_model import recorded_model

MAX_FOLDERS = 64  # a batch touching more folders than this rescans the watched roots instead
IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})  # reads, not changes


@dataclass(frozen=True)
class WatchSettings:
    """How events become batches; the defaults keep a single new photo searchable within about two seconds."""

    quiet_s: float = 1.0  # a batch starts once no event came for this long ...
    max_wait_s: float = 5.0  # ... or this long after its first event, even while events keep coming
    poll_s: float = 0.2  # how often a waiting loop looks at its stop flag


class ChangeBatcher:
    """Collects changed paths from the watchdog thread and hands them out as debounced batches."""

    def __init__(self, settings: WatchSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._changed = threading.Condition()
        self._paths: set[str] = set()
        self._first: float | None = None
        self._last: float | None = None

    def add(self, paths: Iterable[str]) -> None:
        with self._changed:
            now = self.clock()
            self._paths.update(paths)
            self._first = now if self._first is None else self._first
            self._last = now
            self._changed.notify_all()

    def due_in(self) -> float | None:
        """Seconds until the pending batch is due (0 or less: now); None when nothing is pending."""
        with self._changed:
            if self._first is None:
                return None
            due = min(self._last + self.settings.quiet_s, self._first + self.settings.max_wait_s)
            return due - self.clock()

    def take_ready(self) -> set[str] | None:
        """The pending paths when their batch is due, else None."""
        with self._changed:
            wait = self.due_in()
            if wait is None or wait > 0:
                return None
            paths, self._paths, self._first, self._last = self._paths, set(), None, None
            return paths

    def wait(self, stop: threading.Event) -> set[str] | None:
        """Block until a batch is due (its paths) or ``stop`` is set (None)."""
        with self._changed:
            while not stop.is_set():
                ready = self.take_ready()
                if ready is not None:
                    return ready
                wait = self.due_in()
                self._changed.wait(self.settings.poll_s if wait is None else min(self.settings.poll_s, wait))
        return None


def folders_to_scan(changed: Iterable[str], roots: Sequence[str]) -> list[str]:
    """The fewest existing folders that cover every changed path: each path's folder (the nearest one still on
    disk, for a deleted folder), kept inside the watched roots, none inside another; the roots when there are
    too many."""
    folders: set[str] = set()
    for path in changed:
        root = next((r for r in roots if is_under(path, r)), None)
        if root is None:
            continue
        folder = os.path.dirname(path) if path != root else root
        while folder != root and not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        folders.add(folder)
    if len(folders) > MAX_FOLDERS:
        folders = {root for root in roots if os.path.isdir(root)}
    ordered = sorted(folders, key=len)
    kept: list[str] = []
    for folder in ordered:
        if not any(is_under(folder, outer) for outer in kept):
            kept.append(folder)
    return sorted(kept)


class FolderWatcher:
    """Keeps an index in step with its folders until stopped: a first run catches up with what changed while
    nobody watched, then each debounced batch of events is indexed."""

    def __init__(
        self,
        index_dir: Path,
        paths: Sequence[Path],
        settings: IndexSettings,
        watch: WatchSettings | None = None,
        on_batch: Callable[[IndexSummary], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        self.index_dir = Path(index_dir).expanduser()
        self.paths = list(paths)
        self.settings = settings
        self.watch = watch or WatchSettings()
        self.on_batch = on_batch or (lambda summary: None)
        self.on_error = on_error or (lambda message: None)
        self.batcher = ChangeBatcher(self.watch)
        self.batches = 0  # index runs made from events (not counting the first run)

    def roots(self) -> list[str]:
        """The folders to watch: the ones given, else every folder the index knows."""
        if self.paths:
            return [resolve_folder(path) for path in self.paths]
        layout = IndexLayout(self.index_dir)
        if not layout.catalog.is_file():
            raise UsageError("nothing indexed yet: run `clipsearch index FOLDER --watch`")
        catalog = Catalog(layout.catalog)
        try:
            roots = catalog.roots()
        finally:
            catalog.close()
        if not roots:
            raise UsageError("nothing indexed yet: run `clipsearch index FOLDER --watch`")
        return roots

    def run(self, stop: threading.Event, first_progress: bool = False) -> None:
        """Watch until ``stop`` is set (or Ctrl-C): events are observed from before the first run on."""
        roots = self.roots()
        observer = Observer()
        handler = _EventHandler(self.batcher, roots, _ignored_prefixes(self.index_dir))
        try:
            for root in roots:
                observer.schedule(handler, root, recursive=True)
            observer.start()
        except OSError as error:  # inotify's per-user watch limit, most often (one watch per folder)
            raise UsageError(
                f"cannot watch {', '.join(roots)}: {error.strerror or error}; on Linux, raise "
                f"fs.inotify.max_user_watches (sysctl) for large folder trees"
            ) from None
        try:
            self.on_batch(self._run(self.paths, first_progress))  # errors here end the watch: nothing to keep in step
            self._preload()
            while not stop.is_set():
                changed = self.batcher.wait(stop)
                if changed is None:
                    break
                folders = folders_to_scan(changed, roots)
                if folders:
                    self.batches += 1
                    self._index([Path(folder) for folder in folders], False)
        finally:
            observer.stop()
            observer.join()

    def _preload(self) -> None:
        """The model, before the first event needs it (events that arrive meanwhile wait in the batcher)."""
        try:
            preload_encoder(self.settings)
        except ClipsearchError as error:  # the first event's run says it again, in its own words
            self.on_error(f"the model could not be loaded yet: {error}")

    def _run(self, folders: Sequence[Path], progress: bool) -> IndexSummary:
        return index_paths(self.index_dir, folders, self.settings, progress=progress, on_wait=self.on_error)

    def _index(self, folders: Sequence[Path], progress: bool) -> None:
        try:
            summary = self._run(folders, progress)
        except ClipsearchError as error:  # a folder emptied or gone, a busy or full disk: say so, keep watching
            self.on_error(str(error))
            return
        self.on_batch(summary)


@contextmanager
def watching_in_background(
    index_dir: Path,
    settings: IndexSettings,
    watch: WatchSettings | None = None,
    on_batch: Callable[[IndexSummary], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    join_timeout_s: float = 10.0,
) -> Iterator[FolderWatcher]:
    """Run a FolderWatcher over every folder of the index on a daemon thread while the block runs (``serve
    --watch``). Decoding stays in the thread (no worker processes forked from a threaded server). On exit the
    watcher stops after its current batch; a batch still running after ``join_timeout_s`` is abandoned with the
    process, which the catalog's transactions make safe (the next run resumes)."""
    watcher = FolderWatcher(index_dir, [], replace(settings, workers=0), watch, on_batch, on_error)
    watcher.roots()  # fail now, in the caller's thread, when there is nothing to watch
    stop = threading.Event()

    def run() -> None:
        try:
            watcher.run(stop)
        except Exception as error:  # noqa: BLE001  (the server keeps serving; the reason is told once)
            (on_error or (lambda message: None))(f"watching stopped: {error}")

    thread = threading.Thread(target=run, name="clipsearch-watch", daemon=True)
    thread.start()
    try:
        yield watcher
    finally:
        stop.set()
        thread.join(join_timeout_s)


def recorded_settings(index_dir: Path, device: Device | str = "auto") -> IndexSettings:
    """Index settings for the model an index already records (how ``serve --watch`` indexes)."""
    model = recorded_model(Path(index_dir))
    if model is None:
        raise UsageError(f"the index at {index_dir} has no images yet: run `clipsearch index FOLDER` first")
    return IndexSettings(model=model, device=device)


class _EventHandler(FileSystemEventHandler):
    """Image files and folders that changed, outside hidden folders (the scan skips them) and the index itself."""

    def __init__(self, batcher: ChangeBatcher, roots: Sequence[str], ignored: tuple[str, ...]):
        self.batcher = batcher
        self.roots = roots
        self.ignored = ignored
        self.suffixes = image_suffixes()

    def dispatch(self, event) -> None:
        if event.event_type in IGNORED_EVENTS or (event.is_directory and event.event_type == "modified"):
            return
        paths = [os.fsdecode(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        relevant = [p for p in paths if self._relevant(p, event.is_directory)]
        if relevant:
            self.batcher.add(relevant)

    def _relevant(self, path: str, is_directory: bool) -> bool:
        if any(path == prefix or path.startswith(prefix + os.sep) for prefix in self.ignored):
            return False
        root = next((r for r in self.roots if is_under(path, r)), None)
        if root is None or any(part.startswith(".") for part in Path(os.path.relpath(path, root)).parts):
            return False
        return is_directory or os.path.splitext(path)[1].lower() in self.suffixes


def _ignored_prefixes(index_dir: Path) -> tuple[str, ...]:
    """The index folder (its catalog and FAISS writes are events too, when it lies inside a watched folder)."""
    return tuple({str(index_dir.absolute()), str(index_dir.resolve())})
