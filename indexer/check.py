"""Verify an index folder, and repair what can be repaired: ``clipsearch check [--repair]``.

The catalog is the truth and the FAISS file is derived from it, so most repairs are "rebuild the derived file".
What a check looks at: SQLite's own integrity check; every stored embedding (present for ok rows only, the model's
size, finite, unit length); the FAISS file (readable, right size, and when it claims to be current: exactly the ok
rows' ids, each once, with their stored vectors); generation bookkeeping; temporary files left by a killed save.
A stale or missing FAISS file after an interrupted run is normal (searches rebuild it in memory): it is a notice,
not a problem. Repairs happen under the write lock, so they never race an indexer. A catalog whose header or
keyword table is damaged while its rows still read is salvaged into a new file (indexer/salvage.py). Whatever
stops a check itself (a full disk, an unreadable file) is one line, never a traceback.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select, text, update
from sqlalchemy.exc import DatabaseError, DBAPIError

from indexer.salvage import salvage_catalog
from indexer.text_export import stray_exports
from retrieval.errors import ClipsearchError, DiskFullError, IndexCorruptError, UnreadableCatalogError
from retrieval.faults import fault_point
from retrieval.store.catalog import EMBEDDING_DTYPE, STATUS_FAILED, STATUS_OK, Catalog, ImageRow, MetaKey
from retrieval.store.keywords import FTS_TABLE
from retrieval.store.layout import IndexLayout
from retrieval.store.paths import display_path
from retrieval.store.sync import build_from_catalog, fetch_vectors, recorded_type, save_vectors
from retrieval.store.vectors import VectorIndex
from retrieval.store.write_lock import write_lock

DAMAGED_EMBEDDING = "stored embedding was damaged; re-encoded on the next `clipsearch index`"
NORM_TOLERANCE = 0.02  # float16 storage keeps unit vectors within ~1e-3 of length 1
VECTOR_TOLERANCE = 1e-3
ROW_BATCH = 10_000  # rows read at a time
COMPARE_BATCH = 2_000  # vectors compared at a time (a few MB of float32 copies at 512-d)


@dataclass
class CheckReport:
    """What ``check`` found and did. ``healthy`` means nothing is left that a search could get wrong."""

    index_dir: str
    schema_version: int | None = None
    images: int = 0
    failed: int = 0
    vectors_in_file: int | None = None
    problems: list[str] = field(default_factory=list)  # found (before any repair)
    notices: list[str] = field(default_factory=list)  # harmless states, e.g. a stale FAISS file
    repairs: list[str] = field(default_factory=list)  # what --repair did
    remaining: list[str] = field(default_factory=list)  # problems still there at the end

    @property
    def healthy(self) -> bool:
        return not self.remaining

    def to_dict(self) -> dict:
        return asdict(self) | {"healthy": self.healthy}


@dataclass
class _Findings:
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    reencode_ids: list[int] = field(default_factory=list)  # ok rows whose embedding cannot be trusted
    clear_embedding_ids: list[int] = field(default_factory=list)  # failed rows that still carry one
    rebuild_vectors: bool = False
    save_vectors: bool = False  # stale or missing: not a problem, but --repair writes a current file
    stray_files: list[Path] = field(default_factory=list)
    sqlite_damaged: bool = False
    salvage: bool = False  # pages SQLite cannot read, or a damaged keyword table: copied into a new file
    images: int = 0
    failed: int = 0
    vectors_in_file: int | None = None


def check_index(
    index_dir: Path, repair: bool = False, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> CheckReport:
    """Verify ``index_dir``; with ``repair``, fix what was found under the write lock and verify again."""
    layout = IndexLayout(Path(index_dir).expanduser())
    try:
        return _check(layout, repair, wait, on_wait)
    except ClipsearchError:
        raise
    except (DBAPIError, OSError) as error:
        from indexer.pipeline import is_disk_full

        if is_disk_full(error):
            raise DiskFullError(
                f"the disk holding {layout.root} is full: check stopped with the index as it was; free some space "
                f"and run it again"
            ) from None
        reason = getattr(error, "orig", None) or getattr(error, "strerror", None) or error
        raise IndexCorruptError(f"check could not read {layout.root}: {reason}") from None


def _check(layout: IndexLayout, repair: bool, wait: bool, on_wait: Callable[[str], None] | None) -> CheckReport:
    report = CheckReport(index_dir=str(layout.root))
    refused: list[str] = []
    if repair and layout.catalog.exists() and not _opens(layout):
        refused.append("SQLite refused the catalog file as a whole (a damaged header)")
        with write_lock(layout, wait, on_wait):
            report.repairs.append(salvage_catalog(layout.catalog))
    catalog = _open_catalog(layout)
    try:
        report.schema_version = int(catalog.get_meta(MetaKey.SCHEMA_VERSION) or 0)
        findings = _inspect(layout, catalog)
        report.problems, report.notices = refused + findings.problems, findings.notices
        if repair and _needs_repair(findings):
            with write_lock(layout, wait, on_wait):
                findings = _inspect(layout, catalog)  # again: an indexer may have run while we waited
                if findings.salvage:
                    catalog.close()
                    report.repairs.append(salvage_catalog(layout.catalog))
                    catalog = _open_catalog(layout)
                    findings = _inspect(layout, catalog)
                report.repairs += _repair(layout, catalog, findings)
                findings = _inspect(layout, catalog)
        report.remaining = findings.problems
        report.images, report.failed, report.vectors_in_file = (
            findings.images,
            findings.failed,
            findings.vectors_in_file,
        )
        return report
    finally:
        catalog.close()


def _opens(layout: IndexLayout) -> bool:
    try:
        Catalog(layout.catalog, create=False).close()
        return True
    except (DatabaseError, UnreadableCatalogError):
        return False


def _open_catalog(layout: IndexLayout) -> Catalog:
    try:
        return Catalog(layout.catalog, create=False)
    except DatabaseError as error:
        raise IndexCorruptError(
            f"{layout.catalog} is not a readable SQLite catalog ({error.orig}): `clipsearch check --repair` salvages "
            f"what it holds into a new file"
        ) from None


def _needs_repair(findings: _Findings) -> bool:
    return bool(
        findings.salvage
        or findings.problems
        or findings.reencode_ids
        or findings.clear_embedding_ids
        or findings.rebuild_vectors
        or findings.save_vectors
        or findings.stray_files
    )


# --- inspection ---------------------------------------------------------------------------------------------------


def _inspect(layout: IndexLayout, catalog: Catalog) -> _Findings:
    findings = _Findings()
    _inspect_sqlite(catalog, findings)
    identity = catalog.model_identity()
    dim = identity.embed_dim if identity else None
    ok_ids = _inspect_rows(catalog, dim, findings)
    if len(ok_ids) and identity is None:
        findings.problems.append("images have embeddings but the index records no model")
    _inspect_vectors(layout, catalog, ok_ids, dim, findings)
    findings.stray_files = sorted(layout.root.glob(f".{layout.vectors.name}.*.tmp")) + stray_exports(layout)
    if findings.stray_files:
        findings.notices.append(f"{len(findings.stray_files)} temporary file(s) left by an interrupted save or export")
    return findings


def _inspect_sqlite(catalog: Catalog, findings: _Findings) -> None:
    try:
        with catalog.engine.connect() as connection:
            result = [row[0] for row in connection.execute(text("PRAGMA quick_check")).fetchall()]
    except DatabaseError as error:  # a page SQLite cannot even walk
        result, findings.salvage = [str(error.orig)], True
    if result != ["ok"]:
        findings.sqlite_damaged = True
        findings.problems.append(f"SQLite integrity check failed: {'; '.join(result[:3])}")
    damage = _keyword_damage(catalog)
    if damage:
        findings.salvage = True
        findings.problems.append(f"the keyword table (file-name search) is damaged: {damage}")


def _keyword_damage(catalog: Catalog) -> str | None:
    """What FTS5's own integrity check says is wrong with the keyword table; None when it is sound (or when a
    read-only catalog cannot run the check)."""
    try:
        with catalog.engine.connect() as connection:
            connection.execute(text(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rank) VALUES ('integrity-check', 1)"))
            connection.rollback()
    except DatabaseError as error:
        message = str(error.orig)
        return None if "readonly" in message or "no such table" in message else message
    return None


def _inspect_rows(catalog: Catalog, dim: int | None, findings: _Findings) -> np.ndarray:
    """Every row's status and embedding, streamed; returns the ids of the trusted ok rows (their vectors are read
    again in batches when compared: holding them all took ~11 KB a row, 2.2 GB at 200k rows)."""
    ok_ids: list[int] = []
    damaged: list[str] = []
    with catalog.session() as session:
        rows = session.execute(
            select(ImageRow.id, ImageRow.path, ImageRow.status, ImageRow.embedding).execution_options(
                yield_per=ROW_BATCH
            )
        )
        for image_id, path, status, blob in rows:
            if status == STATUS_FAILED:
                findings.failed += 1
                if blob is not None:
                    findings.clear_embedding_ids.append(image_id)
                continue
            reason = _embedding_fault(blob, dim) if status == STATUS_OK else f"unknown status {status!r}"
            if reason:
                findings.reencode_ids.append(image_id)
                damaged.append(f"{display_path(path)} ({reason})")
                continue
            findings.images += 1
            ok_ids.append(image_id)
    if damaged:
        findings.problems.append(f"{len(damaged)} image(s) with a damaged embedding, e.g. {damaged[0]}")
    if findings.clear_embedding_ids:
        findings.problems.append(f"{len(findings.clear_embedding_ids)} failed image(s) still carry an embedding")
    return np.sort(np.asarray(ok_ids, dtype=np.int64))


def _embedding_fault(blob: bytes | None, dim: int | None) -> str | None:
    if blob is None:
        return "no embedding"
    itemsize = np.dtype(EMBEDDING_DTYPE).itemsize
    if len(blob) % itemsize or (dim is not None and len(blob) != dim * itemsize):
        return f"{len(blob)} bytes, expected {dim * itemsize if dim else 'a multiple of 2'}"
    vector = np.frombuffer(blob, dtype=EMBEDDING_DTYPE).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        return "not finite"
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        return f"length {norm:.3f}, expected 1"
    return None


def _inspect_vectors(
    layout: IndexLayout, catalog: Catalog, ok_ids: np.ndarray, dim: int | None, findings: _Findings
) -> None:
    generation = catalog.vectors_generation()
    saved_text = catalog.get_meta(MetaKey.FAISS_GENERATION)
    saved = int(saved_text) if saved_text and saved_text.isdigit() else None
    if saved is not None and saved > generation:
        findings.problems.append(f"the FAISS file claims generation {saved}, newer than the catalog's {generation}")
        findings.rebuild_vectors = True
    if not layout.vectors.is_file():
        if len(ok_ids):
            findings.notices.append("no FAISS file: searches rebuild it from the catalog (--repair saves one)")
            findings.save_vectors = True
        return
    try:
        index = VectorIndex.load(layout.vectors, read_only=True)  # mapped where FAISS can: only read here
    except IndexCorruptError as error:
        findings.problems.append(f"the FAISS file is unreadable ({error})")
        findings.rebuild_vectors = True
        return
    findings.vectors_in_file = len(index)
    if dim is not None and index.dim != dim:
        findings.problems.append(f"the FAISS file holds {index.dim}-d vectors, the model makes {dim}-d")
        findings.rebuild_vectors = True
        return
    recorded = recorded_type(catalog)
    if index.index_type != recorded:
        findings.problems.append(f"the FAISS file is a {index.index_type} index, the catalog records {recorded}")
        findings.rebuild_vectors = True
        return
    if saved != generation:
        findings.notices.append(
            f"the FAISS file is behind the catalog (generation {saved}, catalog {generation}): normal after an "
            f"interrupted run; searches rebuild it in memory (--repair saves a current one)"
        )
        findings.save_vectors = True
        return
    mismatch = _compare_vectors(index, catalog, ok_ids)
    if mismatch:
        findings.problems.append(f"the FAISS file disagrees with the catalog: {mismatch}")
        findings.rebuild_vectors = True


def _compare_vectors(index: VectorIndex, catalog: Catalog, expected: np.ndarray) -> str | None:
    """None when the file holds exactly the ok rows' ids, once each, with their stored vectors (compared a batch
    of ids at a time, so memory stays a batch's whatever the size of the index)."""
    ids = index.ids()
    unique, counts = np.unique(ids, return_counts=True)
    faults = []
    if (counts > 1).any():
        faults.append(f"{int((counts > 1).sum())} id(s) stored more than once")
    extra = np.setdiff1d(unique, expected)
    missing = np.setdiff1d(expected, unique)
    if len(extra):
        faults.append(f"{len(extra)} id(s) not in the catalog")
    if len(missing):
        faults.append(f"{len(missing)} image(s) missing")
    if not faults and len(ids) and index.kind.keeps_vectors:  # the IVF types keep no exact vectors
        wrong = 0
        for start in range(0, len(expected), COMPARE_BATCH):
            batch = expected[start : start + COMPARE_BATCH]
            stored, wanted = index.vectors_of(batch), fetch_vectors(catalog, batch)
            close = np.abs(stored - wanted).max(axis=1) <= VECTOR_TOLERANCE  # NaN (missing) is not close
            wrong += int((~close).sum())
        if wrong:
            faults.append(f"{wrong} vector(s) differ from the stored embeddings")
    return "; ".join(faults) or None


# --- repair -------------------------------------------------------------------------------------------------------


def _repair(layout: IndexLayout, catalog: Catalog, findings: _Findings) -> list[str]:
    fault_point("repair")
    repairs: list[str] = []
    if findings.sqlite_damaged:
        with catalog.engine.begin() as connection:
            connection.execute(text("REINDEX"))
        repairs.append("rebuilt the SQLite indexes (REINDEX)")
    if findings.reencode_ids or findings.clear_embedding_ids:
        _fix_rows(catalog, findings)
        if findings.reencode_ids:
            repairs.append(
                f"marked {len(findings.reencode_ids)} image(s) with a damaged embedding for re-encoding on the "
                f"next `clipsearch index`"
            )
        if findings.clear_embedding_ids:
            repairs.append(f"cleared the stale embedding of {len(findings.clear_embedding_ids)} failed image(s)")
    identity = catalog.model_identity()
    if identity is not None and (
        findings.rebuild_vectors or findings.save_vectors or findings.reencode_ids or findings.clear_embedding_ids
    ):
        index = build_from_catalog(catalog, identity.embed_dim)
        save_vectors(catalog, layout, index, catalog.vectors_generation())
        repairs.append(f"rebuilt the FAISS file from the catalog ({len(index)} vectors)")
    for stray in findings.stray_files:
        if stray.is_dir():
            shutil.rmtree(stray, ignore_errors=True)
        else:
            stray.unlink(missing_ok=True)
    if findings.stray_files:
        repairs.append(f"removed {len(findings.stray_files)} temporary file(s)")
    return repairs


def _fix_rows(catalog: Catalog, findings: _Findings) -> None:
    """One transaction: damaged rows become failed with size -1 (so the next index run re-encodes the file)."""
    with catalog.session() as session, session.begin():
        if findings.reencode_ids:
            session.execute(
                update(ImageRow)
                .where(ImageRow.id.in_(findings.reencode_ids))
                .values(status=STATUS_FAILED, error=DAMAGED_EMBEDDING, embedding=None, size=-1, indexed_at=time.time())
            )
        if findings.clear_embedding_ids:
            session.execute(
                update(ImageRow).where(ImageRow.id.in_(findings.clear_embedding_ids)).values(embedding=None)
            )
        catalog.bump_generation(session)
