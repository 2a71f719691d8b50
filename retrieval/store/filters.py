"""What a search may return: filters on the catalog's facts, turned into SQL, and the keyword (FTS5) ranking.

Filters become the set of allowed ids handed to the vector search (``VectorIndex.search(allowed_ids=...)``), so a
filter narrows the search itself instead of cutting a top-k afterwards: k results come back whenever k images match.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, fields, replace

import numpy as np
from sqlalchemy import column, func, select, table, text

from retrieval.errors import UsageError
from retrieval.image_meta import normalise_type
from retrieval.store.catalog import STATUS_OK, Catalog, ImageRow, path_under
from retrieval.store.keywords import FOLDER_WEIGHT, FTS_TABLE, NAME_WEIGHT, match_expression

_DATE = re.compile(r"^(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?$")


@dataclass(frozen=True)
class Filters:
    """Which images a search may return. Dates are inclusive at both ends and as precise as written:
    ``after="2019"`` starts on 1 January 2019, ``before="2019-06"`` ends on 30 June 2019 at 23:59:59."""

    under: str | None = None  # a folder (absolute once resolved by the engine)
    after: str | None = None  # date taken, YYYY[-MM[-DD[ HH:MM[:SS]]]]
    before: str | None = None
    camera: str | None = None  # any part of "make model", case-insensitive
    min_width: int | None = None  # upright pixels
    min_height: int | None = None
    types: tuple[str, ...] = ()  # jpg, png, webp, gif, bmp, tiff, heic

    def __post_init__(self) -> None:
        object.__setattr__(self, "after", parse_date(self.after, end=False) if self.after else None)
        object.__setattr__(self, "before", parse_date(self.before, end=True) if self.before else None)
        object.__setattr__(self, "camera", (self.camera or "").strip() or None)
        object.__setattr__(self, "under", str(self.under) if self.under else None)
        types = self.types.split(",") if isinstance(self.types, str) else self.types
        object.__setattr__(self, "types", tuple(sorted({normalise_type(t) for t in types if t.strip()})))
        for name in ("min_width", "min_height"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.after and self.before and self.after > self.before:
            raise UsageError(f"--after {self.after[:10]} is later than --before {self.before[:10]}")

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def with_under(self, under: str | None) -> Filters:
        return replace(self, under=under)

    def to_dict(self) -> dict:
        return {f.name: list(v) if f.name == "types" else v for f in fields(self) if (v := getattr(self, f.name))}

    @classmethod
    def from_dict(cls, data: dict | None) -> Filters:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        data["types"] = tuple(data.get("types") or ())
        return cls(**data)


def parse_date(value: str, end: bool) -> str:
    """``YYYY[-MM[-DD[ HH:MM[:SS]]]]`` as the catalog's wall-clock text, at the start (or with ``end``, the last
    second) of the period it names."""
    match = _DATE.match(value.strip())
    if not match:
        raise UsageError(f"cannot read the date {value!r}: write YYYY, YYYY-MM, YYYY-MM-DD or 'YYYY-MM-DD HH:MM'")
    year, month, day, hour, minute, second = match.groups()
    month_n = int(month) if month else (12 if end else 1)
    if not 1 <= month_n <= 12:
        raise UsageError(f"no month {month_n} in the date {value!r}")
    last_day = calendar.monthrange(int(year), month_n)[1]
    day_n = int(day) if day else (last_day if end else 1)
    if not 1 <= day_n <= last_day:
        raise UsageError(f"no day {day_n} in {year}-{month_n:02d}")
    if hour is None:
        hour_n, minute_n, second_n = (23, 59, 59) if end else (0, 0, 0)
    else:
        hour_n, minute_n = int(hour), int(minute)
        second_n = int(second) if second else (59 if end else 0)
        if hour_n > 23 or minute_n > 59 or second_n > 59:
            raise UsageError(f"cannot read the time in {value!r}")
    return f"{int(year):04d}-{month_n:02d}-{day_n:02d} {hour_n:02d}:{minute_n:02d}:{second_n:02d}"


def conditions(filters: Filters) -> list:
    """The filters as SQLAlchemy conditions on ``images`` (``under`` must already be an absolute folder)."""
    found = []
    if filters.under:
        found.append(path_under(ImageRow.path, filters.under))
    if filters.after:
        found.append(ImageRow.taken_at >= filters.after)
    if filters.before:
        found.append(ImageRow.taken_at <= filters.before)
    if filters.camera:
        camera = func.coalesce(ImageRow.camera_make, "") + " " + func.coalesce(ImageRow.camera_model, "")
        found.append(func.instr(func.lower(camera), filters.camera.lower()) > 0)
    if filters.min_width:
        found.append(ImageRow.width >= filters.min_width)
    if filters.min_height:
        found.append(ImageRow.height >= filters.min_height)
    if filters.types:
        found.append(ImageRow.file_type.in_(filters.types))
    return found


def allowed_ids(catalog: Catalog, filters: Filters) -> np.ndarray | None:
    """Ids of the indexed images the filters let through; None when no filter is set (everything)."""
    if not filters.active:
        return None
    with catalog.session() as session:
        ids = session.scalars(select(ImageRow.id).where(ImageRow.status == STATUS_OK, *conditions(filters)))
        return np.fromiter(ids, dtype=np.int64)


def scans_every_row(filters: Filters) -> bool:
    """True when no filter bounds a range of an index (date taken, folder): then the id list costs a pass over every
    row's facts (about 2 us a row), and searching first and checking the candidates is cheaper for a wide filter."""
    return not (filters.after or filters.before or filters.under)


def passing(catalog: Catalog, ids: list[int], filters: Filters) -> set[int]:
    """Which of ``ids`` (search candidates) are indexed images the filters let through: primary-key lookups."""
    found: set[int] = set()
    with catalog.session() as session:
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            ok = ImageRow.status.concat("") == STATUS_OK  # not indexable: SQLite stays on primary-key lookups
            query = select(ImageRow.id).where(ImageRow.id.in_(chunk), ok, *conditions(filters))
            found.update(session.scalars(query))
    return found


def keyword_ranking(catalog: Catalog, query: str, filters: Filters, limit: int) -> list[int]:
    """Ids of indexed images whose path holds every token of ``query`` (keywords.match_expression), best bm25
    first (a match in the file name weighs more than one in a folder name), within the filters."""
    expression = match_expression(query)
    if expression is None:
        return []
    fts = table(FTS_TABLE, column("rowid"))
    statement = (
        select(ImageRow.id)
        .join(fts, fts.c.rowid == ImageRow.id)
        .where(text(f"{FTS_TABLE} MATCH :expression").bindparams(expression=expression))
        .where(ImageRow.status == STATUS_OK, *conditions(filters))
        .order_by(text(f"bm25({FTS_TABLE}, {NAME_WEIGHT}, {FOLDER_WEIGHT})"), ImageRow.id)
        .limit(limit)
    )
    with catalog.session() as session:
        return list(session.scalars(statement))
