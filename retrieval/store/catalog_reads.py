"""The catalog's reads in plain ``sqlite3``: the one place their SQL lives, for searches and writers alike.

A cold ``clipsearch search "text"`` needs a handful of reads (the model, the FAISS file's generation, a few rows);
importing SQLAlchemy and declaring the ORM cost it ~150 ms of its second (issue 27). ``CatalogReader`` opens the
same file with the standard library and answers those reads; ``Catalog`` (``retrieval.store.catalog``, the ORM
that writes) is a ``CatalogReader`` too, so each read is written once. Rows come back as ``StoredImage``: every
column of ``images`` but the deferred ``pixel_print`` (a test checks the columns against the ORM's).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from retrieval.errors import EmptyIndexError, IndexCorruptError, ModelMismatchError, UnreadableCatalogError
from retrieval.model.spec import ModelIdentity
from retrieval.store.paths import from_stored, to_stored
from retrieval.store.read_only import read_only_uri, writable
from retrieval.unit import unit_rows

# 2: image ids are never reused (AUTOINCREMENT); paths may hold escaped non-UTF-8 bytes (retrieval/store/paths.py).
# 3: header facts for filters and date order (retrieval/image_meta.py); FTS5 keyword table over paths.
# 4: no per-row insert trigger on the keyword table; writers fill it per chunk (retrieval/store/keywords.py).
# 5: pixel_print, the thumbnail near-duplicates are verified with (retrieval/pixel_print.py); NULL until computed.
# 6: per-image text (OCR lines, later captions), its passes and its FTS5 trigram index (retrieval/store/image_text.py).
# 7: a contentless keyword table (no copy of the names) and no index on status alone (retrieval/store/migrations.py).
SCHEMA_VERSION = 7
STATUS_OK = "ok"
STATUS_FAILED = "failed"
EMBEDDING_DTYPE = np.float16
CHUNK = 500  # ids or paths per SQL IN (...)
# ok rows walked in id order along the table itself: the unary + keeps SQLite off the facts index (status first,
# then the facts), which would have to sort every ok row by id; the reads that use it want the embeddings anyway
OK_BY_ID = "+status = ?"
BUSY_MS = 30_000  # how long a read waits on a writer's lock (WAL: only checkpoints and schema changes take it)


class MetaKey:
    """Every key of the ``meta`` table, in one place: what the catalog records about itself and its FAISS file."""

    SCHEMA_VERSION = "schema_version"
    MODEL = "model"  # ModelIdentity as JSON
    VECTORS_GENERATION = "vectors_generation"  # bumped by every change to the stored vectors
    FAISS_GENERATION = "faiss_generation"  # the generation the saved FAISS file reflects
    INDEX_TYPE = "index_type"  # the type the FAISS file is built as
    REQUESTED_TYPE = "index_type_requested"  # auto or a type: what `clipsearch index` keeps in force
    MAX_MEMORY = "index_max_memory"  # bytes; the budget auto plans with
    PARAMS = "index_params"  # IndexParams as JSON
    BUILT_N = "index_built_n"  # vectors at the last (re)build: the IVF types are retrained once it doubles
    RECALL = "index_recall"  # JSON: recall@10 against exact search, queries, kind, effort, when
    TEXT_TOWER = "text_tower"  # JSON TextTowerRecord: the exported ONNX text tower, its model and file digests
    OCR = "ocr"  # "on" or "off": whether `clipsearch index` reads the text in photos (index --ocr / --no-ocr)
    CAPTIONS = "captions"  # "on" or "off": whether `clipsearch index` writes a caption per image (index --captions)
    CAPTIONER = "captioner"  # the decoder folder index --captioner named (absent: FOLDER-cap beside the model)
    IMAGE_TOWER = "image_tower"  # JSON TextTowerRecord of the cached ONNX image tower this index checked


def encode_embedding(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=EMBEDDING_DTYPE).tobytes()


def decode_embedding(blob: bytes | None) -> np.ndarray:
    if blob is None:
        raise IndexCorruptError("an indexed image has no stored embedding: run `clipsearch check --repair`")
    return np.frombuffer(blob, dtype=EMBEDDING_DTYPE).astype(np.float32)


@dataclass(frozen=True)
class StoredImage:
    """One row of ``images`` as read (the ORM's ``ImageRow`` writes them): ok (embedding set) or failed."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    width: int | None
    height: int | None
    status: str
    error: str | None
    embedding: bytes | None
    indexed_at: float
    taken_at: str | None
    date_source: str | None
    camera_make: str | None
    camera_model: str | None
    orientation: int | None
    has_gps: bool | None
    file_type: str | None

    def vector(self) -> np.ndarray:
        return decode_embedding(self.embedding)


IMAGE_COLUMNS = tuple(each.name for each in fields(StoredImage))
_SELECT_IMAGES = f"SELECT {', '.join(IMAGE_COLUMNS)} FROM images"
_PATH = IMAGE_COLUMNS.index("path")
_HAS_GPS = IMAGE_COLUMNS.index("has_gps")


def _stored_image(values: tuple) -> StoredImage:
    values = list(values)
    values[_PATH] = from_stored(values[_PATH])
    if values[_HAS_GPS] is not None:
        values[_HAS_GPS] = bool(values[_HAS_GPS])
    return StoredImage(*values)


class CatalogReader:
    """An open catalog for reading: one ``sqlite3`` connection (read-only where the file cannot be written),
    shared by threads under a lock, opened again in a forked child. ``create=True`` is ``Catalog``'s."""

    def __init__(self, path: Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise EmptyIndexError(f"no index at {self.path.parent}: run `clipsearch index FOLDER` first")
        # read-only (retrieval/store/read_only.py): searches work where the folder cannot be written
        self.read_only = not create and not writable(self.path)
        self._connection: sqlite3.Connection | None = None
        self._owner = os.getpid()
        self._lock = threading.Lock()

    def open_checked(self) -> None:
        """Refuse a file that is not a catalog, or one written by a newer clipsearch; upgrade an older one."""
        version = self._recorded_version()
        if version is None:
            if self._holds_images():
                raise IndexCorruptError(f"{self.path} is not a clipsearch catalog (no schema version)")
            # a first run died while creating the file: nothing to lose, nothing to read
            raise EmptyIndexError(f"no index at {self.path.parent} yet: run `clipsearch index FOLDER` first")
        if not version.isdigit():
            raise IndexCorruptError(f"{self.path} records an unreadable schema version {version!r}")
        if int(version) > SCHEMA_VERSION:
            raise IndexCorruptError(
                f"this index was written by a newer clipsearch (schema {version}, this one reads "
                f"{SCHEMA_VERSION}): upgrade clipsearch"
            )
        if int(version) < SCHEMA_VERSION:
            self.upgrade(int(version))

    def upgrade(self, version: int) -> None:
        """Migrate a catalog of an older schema in place (where it can be written)."""
        from retrieval.errors import ReadOnlyIndexError
        from retrieval.store.migrations import migrate_catalog

        if self.read_only:
            raise ReadOnlyIndexError(
                f"read-only index: {self.path.parent} holds schema {version} and must be upgraded once where it "
                f"can be written (any clipsearch command does it)"
            )
        self.close_reads()
        migrate_catalog(self.path, version, SCHEMA_VERSION)

    def _recorded_version(self) -> str | None:
        """The schema version; None when the file has no meta table yet (creation interrupted)."""
        try:
            return self.get_meta(MetaKey.SCHEMA_VERSION)
        except sqlite3.DatabaseError as error:
            if "no such table" in str(error):
                return None
            self.close_reads()
            raise UnreadableCatalogError(
                f"{self.path} is not a readable SQLite catalog ({error}): "
                f"`clipsearch check --repair` salvages what it holds into a new file"
            ) from None

    def _holds_images(self) -> bool:
        try:
            return bool(self.count())
        except sqlite3.DatabaseError:
            return False

    # --- the connection -------------------------------------------------------------------------------------

    def _all(self, sql: str, parameters: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._reads().execute(sql, parameters).fetchall()

    def _all_in(self, head: str, column: str, values: Sequence, tail: str = "", after: Sequence = ()) -> list[tuple]:
        """Rows of ``head WHERE column IN (values) tail`` (``after``: the parameters of ``tail``), ``CHUNK``
        values a statement."""
        rows: list[tuple] = []
        for start in range(0, len(values), CHUNK):
            chunk = list(values[start : start + CHUNK])
            rows += self._all(f"{head} WHERE {column} IN ({', '.join('?' * len(chunk))}){tail}", [*chunk, *after])
        return rows

    def _reads(self) -> sqlite3.Connection:
        if self._connection is None or self._owner != os.getpid():
            if self.read_only:
                uri = read_only_uri(self.path)
                connection = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=BUSY_MS / 1000)
                connection.execute("PRAGMA query_only=ON")
            else:
                connection = sqlite3.connect(self.path, check_same_thread=False, timeout=BUSY_MS / 1000)
            connection.isolation_level = None  # autocommit: every read sees the latest committed state
            self._connection, self._owner = connection, os.getpid()
        return self._connection

    def close_reads(self) -> None:
        if self._connection is not None and self._owner == os.getpid():
            self._connection.close()
        self._connection = None

    def close(self) -> None:
        self.close_reads()

    # --- meta -----------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        found = self._all("SELECT value FROM meta WHERE key = ?", (key,))
        return found[0][0] if found else None

    def model_identity(self) -> ModelIdentity | None:
        text = self.get_meta(MetaKey.MODEL)
        return ModelIdentity.from_json(text) if text else None

    def check_model(self, key: str, wanted: str) -> ModelIdentity | None:
        """Refuse a model other than the recorded one (``key`` from ``model.spec_key``)."""
        recorded = self.model_identity()
        if recorded is not None and recorded.key() != key:
            if recorded.spec().describe() == wanted:  # the same name: its weights file changed or went missing
                raise ModelMismatchError(
                    f"the weights of {wanted} are not the ones this index was built with (changed or missing "
                    f"since): restore them, or index again into another --index folder"
                )
            raise ModelMismatchError(
                f"this index was built with {recorded.describe()}, not {wanted}: use the same --model/--pretrained, "
                f"or another --index folder"
            )
        return recorded

    def vectors_generation(self) -> int:
        return int(self.get_meta(MetaKey.VECTORS_GENERATION) or 0)

    # --- rows -----------------------------------------------------------------------------------------------

    def count(self, status: str | None = None) -> int:
        if status is None:
            return int(self._all("SELECT count(id) FROM images")[0][0])
        return int(self._all("SELECT count(id) FROM images WHERE status = ?", (status,))[0][0])

    def rows_by_id(self, ids: Sequence[int]) -> dict[int, StoredImage]:
        rows = self._all_in(_SELECT_IMAGES, "id", [int(i) for i in ids])
        return {row.id: row for row in map(_stored_image, rows)}

    def row_by_path(self, path: str) -> StoredImage | None:
        return self.rows_by_paths([path]).get(path)

    def rows_by_paths(self, paths: Sequence[str]) -> dict[str, StoredImage]:
        rows = self._all_in(_SELECT_IMAGES, "path", [to_stored(path) for path in paths])
        return {row.path: row for row in map(_stored_image, rows)}

    def failed_rows(self) -> list[StoredImage]:
        rows = self._all(f"{_SELECT_IMAGES} WHERE status = ? ORDER BY path", (STATUS_FAILED,))
        return [_stored_image(row) for row in rows]

    def holds_text(self) -> bool:
        """Whether any image has text (read in the photo, a caption): a text query ranks it only then."""
        return bool(self._all("SELECT 1 FROM text_lines LIMIT 1"))

    # --- embeddings -----------------------------------------------------------------------------------------

    def embeddings_by_id(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The stored embeddings of those ``ids`` that are indexed (ok), as stored."""
        ids = [int(i) for i in ids]
        return dict(self._all_in("SELECT id, embedding FROM images", "id", ids, " AND status = ?", (STATUS_OK,)))

    def sample_embeddings(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` (ids, normalised float32 vectors) of ok rows spread over the id range, found by seeks along
        the id (no scan of the table, so it costs the same at 10 rows and at 10 million)."""
        # two seeks along the rowid (OK_BY_ID): asked together, min and max scan every ok row (0.86 s at 10M rows)
        low = self._all(f"SELECT id FROM images WHERE {OK_BY_ID} ORDER BY id LIMIT 1", (STATUS_OK,))
        if not low:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        high = self._all(f"SELECT id FROM images WHERE {OK_BY_ID} ORDER BY id DESC LIMIT 1", (STATUS_OK,))
        starts = np.random.default_rng(seed).integers(low[0][0], high[0][0] + 1, size=n)
        found: dict[int, bytes] = {}
        sql = f"SELECT id, embedding FROM images WHERE {OK_BY_ID} AND id >= ? ORDER BY id LIMIT 1"
        for start in sorted({int(s) for s in starts}):
            found.update(self._all(sql, (STATUS_OK, start)))
        ids = np.fromiter(found, dtype=np.int64)
        return ids, unit_rows(np.stack([decode_embedding(blob) for blob in found.values()]))

    def iter_embeddings(self, batch: int = 20000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, normalised float32 vectors) of ok rows, in id order, in batches."""
        last = 0
        sql = f"SELECT id, embedding FROM images WHERE {OK_BY_ID} AND id > ? ORDER BY id LIMIT ?"
        while True:
            rows = self._all(sql, (STATUS_OK, last, batch))
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vectors = np.stack([decode_embedding(r[1]) for r in rows])
            last = int(ids[-1])
            yield ids, unit_rows(vectors)


def open_reader(path: Path) -> CatalogReader:
    """A checked ``CatalogReader`` of an existing catalog (upgraded first when it is of an older schema)."""
    reader = CatalogReader(path)
    try:
        reader.open_checked()
    except BaseException:
        reader.close()
        raise
    return reader
