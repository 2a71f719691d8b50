"""What a search may return: filters on the catalog's facts, turned into SQL, and the keyword (FTS5) ranking.

Filters become the set of allowed ids handed to the vector search (``VectorIndex.search(allowed_ids=...)``), so a
filter narrows the search itself instead of cutting a top-k afterwards: k results come back whenever k images match.

``Filters`` is the one declaration of a filter field: the JSON API's model (retrieval/search/api_query.py) and the
CLI's option group (clipsearch/cli/options.py) are built from its fields and their ``FilterSpec``, and a test holds
the web page's table (static/query.js) to it. Adding a filter: a field here, its condition in ``conditions``, and
its control on the page. The command line builds its options from this module at startup, so the database and
image libraries are imported only where they are used.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from retrieval.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from retrieval.store.catalog import Catalog

_DATE = re.compile(r"^(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?$")


MAX_INTEGER = 2**63 - 1  # SQLite's largest


@dataclass(frozen=True)
class FilterSpec:
    """How one filter field reads for people: its help text, its command-line flag, and its bounds."""

    description: str
    flag: str  # the command-line option, also the page's URL parameter (without the dashes)
    metavar: str | None = None
    ge: int | None = None  # lowest value allowed (numbers)
    max_length: int | None = None  # longest text, or most items (lists)


def _filter(default: Any, description: str, flag: str, metavar: str | None = None, **bounds: int) -> Any:
    return field(default=default, metadata={"filter": FilterSpec(description, flag, metavar, **bounds)})


def filter_spec(filter_field: Field) -> FilterSpec:
    return filter_field.metadata["filter"]


@dataclass(frozen=True)
class Filters:
    """Which images a search may return. Dates are inclusive at both ends and as precise as written:
    ``after="2019"`` starts on 1 January 2019, ``before="2019-06"`` ends on 30 June 2019 at 23:59:59.
    A tuple field is a list (comma-separated on the command line)."""

    under: str | None = _filter(None, "Only results inside this folder (one inside the index).", "--under", "FOLDER")
    after: str | None = _filter(
        None, "Taken on or after DATE: YYYY, YYYY-MM, YYYY-MM-DD or 'YYYY-MM-DD HH:MM'.", "--after", "DATE"
    )
    before: str | None = _filter(
        None, "Taken on or before DATE (the whole year, month or day named).", "--before", "DATE"
    )
    camera: str | None = _filter(None, "Camera make or model contains TEXT (any case).", "--camera", max_length=200)
    min_width: int | None = _filter(None, "At least this many pixels wide (upright).", "--min-width", ge=1)
    min_height: int | None = _filter(None, "At least this many pixels high (upright).", "--min-height", ge=1)
    types: tuple[str, ...] = _filter(
        (), "File types, comma-separated: jpg,png,webp,gif,bmp,tiff,heic.", "--type", "TYPES", max_length=20
    )
    has_text: bool | None = _filter(
        None, "Only photos with text read in them (index --ocr); --no-has-text: without.", "--has-text"
    )

    def __post_init__(self) -> None:
        from retrieval.image_meta import normalise_type

        object.__setattr__(self, "after", parse_date(self.after, end=False) if self.after else None)
        object.__setattr__(self, "before", parse_date(self.before, end=True) if self.before else None)
        object.__setattr__(self, "camera", (self.camera or "").strip() or None)
        object.__setattr__(self, "under", str(self.under) if self.under else None)
        types = self.types.split(",") if isinstance(self.types, str) else self.types or ()
        object.__setattr__(self, "types", tuple(sorted({normalise_type(t) for t in types if t.strip()})))
        for each in fields(self):
            value, least = getattr(self, each.name), filter_spec(each).ge
            if value is not None and least is not None and value < least:
                raise UsageError(f"{filter_spec(each).flag} must be at least {least}")
            if isinstance(value, int) and value > MAX_INTEGER:  # SQLite would overflow deep in the search
                raise UsageError(f"{filter_spec(each).flag} must be at most {MAX_INTEGER}")
        if self.after and self.before and self.after > self.before:
            raise UsageError(f"--after {self.after[:10]} is later than --before {self.before[:10]}")

    def _set(self) -> dict[str, Any]:
        """The fields set: not None and not empty (``False`` is a setting, "without")."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None and v != ()}

    @property
    def active(self) -> bool:
        return bool(self._set())

    def with_under(self, under: str | None) -> Filters:
        return replace(self, under=under)

    def to_dict(self) -> dict:
        return {name: list(v) if isinstance(v, tuple) else v for name, v in self._set().items()}

    @classmethod
    def from_dict(cls, data: dict | None) -> Filters:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in data.items()})


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
    from sqlalchemy import func

    from retrieval.store.catalog import ImageRow, path_under

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
    if filters.has_text is not None:
        found.append(_has_text() if filters.has_text else ~_has_text())
    return found


def _has_text():
    """SQL for "OCR read some text in this image": a primary-key lookup in ``text_passes`` per row."""
    from sqlalchemy import exists

    from retrieval.store.catalog import ImageRow, TextPass
    from retrieval.store.image_text import OCR_SOURCE

    return exists().where(TextPass.image_id == ImageRow.id, TextPass.source == OCR_SOURCE, TextPass.lines > 0)


def allowed_ids(catalog: Catalog, filters: Filters) -> np.ndarray | None:
    """Ids of the indexed images the filters let through; None when no filter is set (everything)."""
    import numpy as np
    from sqlalchemy import select

    from retrieval.store.catalog import STATUS_OK, ImageRow

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
    from sqlalchemy import select

    from retrieval.store.catalog import STATUS_OK, ImageRow

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
    from retrieval.store.keywords import FOLDER_WEIGHT, FTS_TABLE, NAME_WEIGHT, match_expression

    rank = f"bm25({FTS_TABLE}, {NAME_WEIGHT}, {FOLDER_WEIGHT})"
    return _fts_ranking(catalog, FTS_TABLE, match_expression(query), rank, filters, limit)


def text_ranking(catalog: Catalog, query: str, filters: Filters, limit: int) -> list[int]:
    """Ids of indexed images whose text (read in the photo, ``image_text``) holds every word of ``query``, folded
    as OCR needs (``image_text.match_expression``), best bm25 first, within the filters."""
    from retrieval.store.image_text import TEXT_FTS, match_expression

    return _fts_ranking(catalog, TEXT_FTS, match_expression(query), f"bm25({TEXT_FTS})", filters, limit)


def _fts_ranking(
    catalog: Catalog, fts_table: str, expression: str | None, rank: str, filters: Filters, limit: int
) -> list[int]:
    """The one FTS5 ranking: rows of ``fts_table`` (rowid = image id) matching ``expression``, by ``rank``."""
    from sqlalchemy import column, select, table, text

    from retrieval.store.catalog import STATUS_OK, ImageRow

    if expression is None:
        return []
    fts = table(fts_table, column("rowid"))
    statement = (
        select(ImageRow.id)
        .join(fts, fts.c.rowid == ImageRow.id)
        .where(text(f"{fts_table} MATCH :expression").bindparams(expression=expression))
        .where(ImageRow.status == STATUS_OK, *conditions(filters))
        .order_by(text(rank), ImageRow.id)
        .limit(limit)
    )
    with catalog.session() as session:
        return list(session.scalars(statement))
