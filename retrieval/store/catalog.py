"""The SQLite catalog (SQLAlchemy 2): folders, image facts and their embeddings. The source of truth.

Each image's embedding lives in its row (float16), written in the same transaction as its facts, so a crash can
never separate a vector from its file; the FAISS file is rebuilt from here whenever it is missing or stale.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import (
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from retrieval.errors import (
    EmptyIndexError,
    IndexCorruptError,
    ModelMismatchError,
    ReadOnlyIndexError,
    UnreadableCatalogError,
)
from retrieval.image_meta import ImageMeta
from retrieval.model.spec import ModelIdentity
from retrieval.store.image_text import register_text_index
from retrieval.store.keywords import register_keyword_table
from retrieval.store.paths import FsPath
from retrieval.store.read_only import read_only_engine, writable
from retrieval.unit import unit_rows

# 2: image ids are never reused (AUTOINCREMENT); paths may hold escaped non-UTF-8 bytes (retrieval/store/paths.py).
# 3: header facts for filters and date order (retrieval/image_meta.py); FTS5 keyword table over paths.
# 4: no per-row insert trigger on the keyword table; writers fill it per chunk (retrieval/store/keywords.py).
# 5: pixel_print, the thumbnail near-duplicates are verified with (retrieval/pixel_print.py); NULL until computed.
# 6: per-image text (OCR lines, later captions), its passes and its FTS5 trigram index (retrieval/store/image_text.py).
SCHEMA_VERSION = 6
STATUS_OK = "ok"
STATUS_FAILED = "failed"
EMBEDDING_DTYPE = np.float16


class Base(DeclarativeBase):
    pass


class Root(Base):
    """A folder the user asked to index; ``clipsearch index`` with no path refreshes all of them."""

    __tablename__ = "roots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    added_at: Mapped[float] = mapped_column(Float, default=time.time)


FACT_COLUMNS = ("status", "taken_at", "file_type", "width", "height", "camera_make", "camera_model")


class ImageRow(Base):
    """One file. ``status`` is ok (embedding set) or failed (error set, retried only when the file changes)."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str | None] = mapped_column(String, nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String)
    error: Mapped[str | None] = mapped_column(String, nullable=True)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    indexed_at: Mapped[float] = mapped_column(Float, default=time.time)
    # schema 3: header facts (ImageMeta); NULL where unknown (failed files, files missing at the migration)
    taken_at: Mapped[str | None] = mapped_column(String, nullable=True)
    date_source: Mapped[str | None] = mapped_column(String, nullable=True)
    camera_make: Mapped[str | None] = mapped_column(String, nullable=True)
    camera_model: Mapped[str | None] = mapped_column(String, nullable=True)
    orientation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    has_gps: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    file_type: Mapped[str | None] = mapped_column(String, nullable=True)
    # schema 5: written with the embedding; NULL for rows indexed before (filled in by the first `duplicates`)
    pixel_print: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)

    __table_args__ = (
        Index("ix_images_hash", "content_hash"),
        Index("ix_images_status", "status"),
        # covering index of the filterable facts: a filter reads it, not the rows with their 1 KB embeddings
        Index("ix_images_facts", *FACT_COLUMNS),
        {"sqlite_autoincrement": True},  # a FAISS id held by a reader never names another image
    )

    def vector(self) -> np.ndarray:
        return decode_embedding(self.embedding)

    def set_meta(self, meta: ImageMeta) -> None:
        """Record header facts; the pixel size stays the decoder's when it already set one."""
        self.taken_at, self.date_source = meta.taken_at, meta.date_source
        self.camera_make, self.camera_model = meta.camera_make, meta.camera_model
        self.orientation, self.has_gps, self.file_type = meta.orientation, meta.has_gps, meta.file_type
        if self.width is None:
            self.width, self.height = meta.width, meta.height


register_keyword_table(ImageRow.__table__)


class TextLine(Base):
    """One piece of text about an image from one ``source`` ("ocr": a line read in the photo, with its confidence
    and its box as four upright full-size pixel corners in JSON). Deleted with its image, or when its content
    changes (triggers, ``retrieval.store.image_text``); a move keeps it, since the row keeps its id."""

    __tablename__ = "text_lines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String)
    text: Mapped[str] = mapped_column(String)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    box: Mapped[str | None] = mapped_column(String, nullable=True)

    __table_args__ = (Index("ix_text_lines_image", "image_id", "source"),)


class TextPass(Base):
    """That ``source`` has looked at an image (with or without finding text): ok, or failed with its reason. An
    image without a pass row for a source is that source's pending work, which is what makes a pass resumable."""

    __tablename__ = "text_passes"
    image_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String, primary_key=True)
    status: Mapped[str] = mapped_column(String)
    error: Mapped[str | None] = mapped_column(String, nullable=True)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    done_at: Mapped[float] = mapped_column(Float, default=time.time)


register_text_index(TextPass.__table__)


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


class Meta(Base):
    """Key/value facts about the index (keys: ``MetaKey``)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


def encode_embedding(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=EMBEDDING_DTYPE).tobytes()


def decode_embedding(blob: bytes | None) -> np.ndarray:
    if blob is None:
        raise IndexCorruptError("an indexed image has no stored embedding: run `clipsearch check --repair`")
    return np.frombuffer(blob, dtype=EMBEDDING_DTYPE).astype(np.float32)


CACHE_KIB = 131_072  # SQLite's page cache per connection (default 2 MB), filled only as pages are used


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA page_size=16384")  # new catalogs only: 1 KB embedding rows pack 15 a page, not 3
    # past ~1M rows the index B-trees (facts, hash, path, keywords) outgrow 2 MB and every chunk re-read their pages
    # from the OS (26 KB read a row by 1.9M rows): at 1M dated rows the writer went from 32k to 49k rows/s (issue 29)
    cursor.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Catalog:
    """An open catalog file. Short-lived sessions; WAL so readers never wait on the indexer."""

    def __init__(self, path: Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise EmptyIndexError(f"no index at {self.path.parent}: run `clipsearch index FOLDER` first")
        # read-only (retrieval/store/read_only.py): searches work where the folder cannot be written
        self.read_only = not create and not writable(self.path)
        if self.read_only:
            self.engine = read_only_engine(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(f"sqlite:///{self.path}")
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            Base.metadata.create_all(self.engine)
        self._check_schema(create)

    def _check_schema(self, create: bool) -> None:
        version = self._recorded_version()
        if version is None:
            if not create and self._holds_images():
                raise IndexCorruptError(f"{self.path} is not a clipsearch catalog (no schema version)")
            if not create:  # a first run died while creating the file: nothing to lose, nothing to read
                raise EmptyIndexError(f"no index at {self.path.parent} yet: run `clipsearch index FOLDER` first")
            self.set_meta(MetaKey.SCHEMA_VERSION, str(SCHEMA_VERSION))
        elif not version.isdigit():
            raise IndexCorruptError(f"{self.path} records an unreadable schema version {version!r}")
        elif int(version) > SCHEMA_VERSION:
            raise IndexCorruptError(
                f"this index was written by a newer clipsearch (schema {version}, this one reads "
                f"{SCHEMA_VERSION}): upgrade clipsearch"
            )
        elif int(version) < SCHEMA_VERSION:
            from retrieval.store.migrations import migrate_catalog

            if self.read_only:
                raise ReadOnlyIndexError(
                    f"read-only index: {self.path.parent} holds schema {version} and must be upgraded once where it "
                    f"can be written (any clipsearch command does it)"
                )

            self.engine.dispose()
            migrate_catalog(self.path, int(version), SCHEMA_VERSION)

    def _recorded_version(self) -> str | None:
        """The schema version; None when the file has no meta table yet (creation interrupted)."""
        try:
            return self.get_meta(MetaKey.SCHEMA_VERSION)
        except DatabaseError as error:
            if "no such table" in str(error):
                return None
            self.engine.dispose()
            raise UnreadableCatalogError(
                f"{self.path} is not a readable SQLite catalog ({getattr(error, 'orig', error)}): "
                f"`clipsearch check --repair` salvages what it holds into a new file"
            ) from None

    def _holds_images(self) -> bool:
        try:
            with self.session() as session:
                return bool(session.scalar(select(func.count(ImageRow.id))))
        except DatabaseError:
            return False

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self.sessions()

    # --- meta -----------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self.session() as session:
            row = session.get(Meta, key)
            return row.value if row else None

    def set_meta(self, key: str, value: str, session: Session | None = None) -> None:
        if session is not None:
            session.merge(Meta(key=key, value=value))
            return
        with self.session() as own, own.begin():
            own.merge(Meta(key=key, value=value))

    def model_identity(self) -> ModelIdentity | None:
        text = self.get_meta(MetaKey.MODEL)
        return ModelIdentity.from_json(text) if text else None

    def set_model_identity(self, identity: ModelIdentity) -> None:
        self.set_meta(MetaKey.MODEL, identity.to_json())

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

    def bump_generation(self, session: Session) -> int:
        current = session.get(Meta, MetaKey.VECTORS_GENERATION)
        value = int(current.value) + 1 if current else 1
        session.merge(Meta(key=MetaKey.VECTORS_GENERATION, value=str(value)))
        return value

    # --- roots and rows ---------------------------------------------------------------------------------------

    def roots(self) -> list[str]:
        with self.session() as session:
            return list(session.scalars(select(Root.path).order_by(Root.path)))

    def add_roots(self, folders: Iterable[str]) -> None:
        """Record folders, folding a folder inside a known one into it (and known ones inside a new one)."""
        with self.session() as session, session.begin():
            known = list(session.scalars(select(Root)))
            for folder in folders:
                if any(is_under(folder, root.path) for root in known):
                    continue
                for root in [r for r in known if is_under(r.path, folder)]:
                    session.delete(root)
                    known.remove(root)
                root = Root(path=folder)
                session.add(root)
                known.append(root)

    def remove_roots(self, folders: Iterable[str]) -> None:
        """Stop refreshing these folders (their rows are the caller's business)."""
        with self.session() as session, session.begin():
            session.execute(delete(Root).where(Root.path.in_(list(folders))))

    def rows_under(self, session: Session, folder: str) -> list[ImageRow]:
        return list(session.scalars(select(ImageRow).where(path_under(ImageRow.path, folder))))

    def ids_under(self, folder: str, status: str | None = STATUS_OK) -> np.ndarray:
        """Ids of rows inside ``folder`` (``status`` None: failed rows too)."""
        with self.session() as session:
            query = select(ImageRow.id).where(path_under(ImageRow.path, folder))
            if status is not None:
                query = query.where(ImageRow.status == status)
            return np.fromiter(session.scalars(query), dtype=np.int64)

    def rows_by_id(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        with self.session() as session:
            rows = session.scalars(select(ImageRow).where(ImageRow.id.in_([int(i) for i in ids])))
            return {row.id: row for row in rows}

    def row_by_path(self, path: str) -> ImageRow | None:
        with self.session() as session:
            return session.scalars(select(ImageRow).where(ImageRow.path == path)).first()

    def rows_by_paths(self, paths: Sequence[str]) -> dict[str, ImageRow]:
        found: dict[str, ImageRow] = {}
        with self.session() as session:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start : start + 500])
                found.update({r.path: r for r in session.scalars(select(ImageRow).where(ImageRow.path.in_(chunk)))})
        return found

    def count(self, status: str | None = None) -> int:
        with self.session() as session:
            query = select(func.count(ImageRow.id))
            if status is not None:
                query = query.where(ImageRow.status == status)
            return int(session.scalar(query) or 0)

    def failed_rows(self) -> list[ImageRow]:
        with self.session() as session:
            return list(
                session.scalars(select(ImageRow).where(ImageRow.status == STATUS_FAILED).order_by(ImageRow.path))
            )

    def sample_embeddings(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` (ids, normalised float32 vectors) of ok rows spread over the id range, found by index
        seeks (no scan of the table, so it costs the same at 10 rows and at 10 million)."""
        with self.session() as session:
            low, high = session.execute(
                select(func.min(ImageRow.id), func.max(ImageRow.id)).where(ImageRow.status == STATUS_OK)
            ).one()
            if low is None:
                return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
            starts = np.random.default_rng(seed).integers(low, high + 1, size=n)
            found: dict[int, bytes] = {}
            for start in sorted({int(s) for s in starts}):
                row = session.execute(
                    select(ImageRow.id, ImageRow.embedding)
                    .where(ImageRow.status == STATUS_OK, ImageRow.id >= start)
                    .order_by(ImageRow.id)
                    .limit(1)
                ).first()
                if row is not None:
                    found[row[0]] = row[1]
        ids = np.fromiter(found, dtype=np.int64)
        return ids, unit_rows(np.stack([decode_embedding(blob) for blob in found.values()]))

    def iter_embeddings(self, batch: int = 20000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, normalised float32 vectors) of ok rows, in id order, in batches."""
        last = 0
        with self.session() as session:
            while True:
                rows = session.execute(
                    select(ImageRow.id, ImageRow.embedding)
                    .where(ImageRow.status == STATUS_OK, ImageRow.id > last)
                    .order_by(ImageRow.id)
                    .limit(batch)
                ).all()
                if not rows:
                    return
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                vectors = np.stack([decode_embedding(r[1]) for r in rows])
                last = int(ids[-1])
                yield ids, unit_rows(vectors)


def path_under(column, folder: str):
    """SQL for "inside ``folder``": a binary range on the path, exact and case-sensitive (SQLite's LIKE folds
    ASCII case, which made /a/Photos look inside /a/photos), and it uses the path index."""
    prefix = folder.rstrip("/") + "/"
    return (column >= prefix) & (column < prefix[:-1] + "0")  # "0" is the character after "/"


def is_under(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or inside it (by name: no file system access)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")
