"""The SQLite catalog (SQLAlchemy 2): folders, image facts and their embeddings. The source of truth.

Each image's embedding lives in its row (float16), written in the same transaction as its facts, so a crash can
never separate a vector from its file; the FAISS file is rebuilt from here whenever it is missing or stale.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
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
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from retrieval.image_meta import ImageMeta
from retrieval.model.spec import ModelIdentity

# the catalog's vocabulary lives with its reads (catalog_reads); importable from here too
from retrieval.store.catalog_reads import (  # noqa: F401
    EMBEDDING_DTYPE,
    SCHEMA_VERSION,
    STATUS_FAILED,
    STATUS_OK,
    CatalogReader,
    MetaKey,
    StoredImage,
    decode_embedding,
    encode_embedding,
)
from retrieval.store.image_text import register_text_index
from retrieval.store.keywords import register_keyword_table
from retrieval.store.paths import from_stored, to_stored
from retrieval.store.read_only import read_only_engine


class FsPath(TypeDecorator):
    """A ``String`` column that stores any ``os`` path losslessly (see the module docstring)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> str | None:
        return None if value is None else to_stored(value)

    def process_result_value(self, value: str | None, dialect) -> str | None:
        return None if value is None else from_stored(value)


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
        Index("ix_images_hash", "content_hash"),  # schema 7: no index on status alone (ix_images_facts leads with it)
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


class Meta(Base):
    """Key/value facts about the index (keys: ``MetaKey``)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


CACHE_KIB = 131_072  # SQLite's page cache per connection (default 2 MB), filled only as pages are used


WAL_CHECKPOINT_PAGES = 16384  # of 16 KB: 256 MB
WAL_KEEP_BYTES = 64 << 20


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA page_size=16384")  # new catalogs only: 1 KB embedding rows pack 15 a page, not 3
    # past ~1M rows the index B-trees (facts, hash, path, keywords) outgrow 2 MB and every chunk re-read their pages
    # from the OS (26 KB read a row by 1.9M rows): at 1M dated rows the writer went from 32k to 49k rows/s (issue 29)
    cursor.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # checkpoint every 256 MB of WAL, not SQLite's 16 MB: each checkpoint waits on an fsync (bench_ingest, 200k
    # rows, quiet, alternated: 44.0-44.3k -> 44.5-49.0k rows/s by the clock, a few percent within the runs' spread;
    # docs/scale.md); the file is cut back to 64 MB after each checkpoint
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Catalog(CatalogReader):
    """An open catalog for writing (the ORM): short-lived sessions; WAL so readers never wait on the indexer. Its
    reads are ``CatalogReader``'s (plain sqlite3, one form for searches and writers)."""

    def __init__(self, path: Path, create: bool = False):
        super().__init__(path, create)
        if self.read_only:
            self.engine = read_only_engine(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(f"sqlite:///{self.path}")
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            if create:
                Base.metadata.create_all(self.engine)
                if self._recorded_version() is None:
                    self.set_meta(MetaKey.SCHEMA_VERSION, str(SCHEMA_VERSION))
            self.open_checked()
        except BaseException:
            self.close()
            raise

    def upgrade(self, version: int) -> None:
        self.engine.dispose()
        super().upgrade(version)

    def close(self) -> None:
        self.engine.dispose()
        self.close_reads()

    def session(self) -> Session:
        return self.sessions()

    # --- meta -----------------------------------------------------------------------------------------------

    def set_meta(self, key: str, value: str, session: Session | None = None) -> None:
        if session is not None:
            session.merge(Meta(key=key, value=value))
            return
        with self.session() as own, own.begin():
            own.merge(Meta(key=key, value=value))

    def set_model_identity(self, identity: ModelIdentity) -> None:
        self.set_meta(MetaKey.MODEL, identity.to_json())

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


def path_under(column, folder: str):
    """SQL for "inside ``folder``": a binary range on the path, exact and case-sensitive (SQLite's LIKE folds
    ASCII case, which made /a/Photos look inside /a/photos), and it uses the path index."""
    prefix = folder.rstrip("/") + "/"
    return (column >= prefix) & (column < prefix[:-1] + "0")  # "0" is the character after "/"


def is_under(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or inside it (by name: no file system access)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")
