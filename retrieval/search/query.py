"""The one query model of the CLI, the Python API, the HTTP API and the page.

A query is weighted terms, each a text or an image, added (``positive``) or taken away (``negative``); its vector
is sum(w_i q_i) - sum(w_j q_j) over the terms' unit vectors, re-normalised. Filters say which images may come back,
``sort`` orders them by relevance or date taken, ``keywords`` fuses CLIP's ranking with a file-name match and
``text_match`` with the words read in the photos (``index --ocr``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import UsageError
from retrieval.file_types import ALL_IMAGE_SUFFIXES
from retrieval.store.filters import Filters
from retrieval.store.keywords import looks_like_file_name

SORTS = ("relevance", "date")  # date: newest first, among the same results relevance would give
_WEIGHTED = re.compile(r"^(\d+(?:\.\d*)?|\.\d+):(.+)$", re.DOTALL)

__all__ = ["SORTS", "Filters", "Query", "Term", "parse_term"]


@dataclass(frozen=True)
class Term:
    """One text or one image with its weight. An image is a file (``path``, indexed or not), an indexed image
    (``image_id``), or a decoded picture (``picture``: uploads and the Python API)."""

    text: str | None = None
    path: str | None = None
    image_id: int | None = None
    picture: Any = field(default=None, compare=False, repr=False)  # a PIL image
    weight: float = 1.0

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.text, self.path, self.image_id, self.picture)]
        if sum(given) != 1:
            raise UsageError("a query term is exactly one of: a text, an image file, an image id, a picture")
        if self.text is not None and not self.text.strip():
            raise UsageError("the query text is empty")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise UsageError(f"a term's weight must be a positive number, not {self.weight}")

    @property
    def is_image(self) -> bool:
        return self.text is None

    def to_dict(self) -> dict:
        found: dict[str, Any] = {"weight": self.weight}
        for name in ("text", "path", "image_id"):
            if getattr(self, name) is not None:
                found[name] = getattr(self, name)
        if self.picture is not None:
            found["picture"] = True
        return found


def parse_term(spec: str, image: bool | None = None) -> Term:
    """``[WEIGHT:]TEXT_OR_FILE`` as the CLI takes it: ``2:snow``, ``0.5:./ref.jpg``. An existing file is an image,
    anything else a text (``image`` forces one or the other). Write ``1:12:30`` for a text that starts with
    a number and a colon."""
    weight, value = 1.0, spec
    match = _WEIGHTED.match(spec)
    if match:
        weight, value = float(match.group(1)), match.group(2)
    as_file = Path(value).expanduser()
    if image is None:
        image = as_file.is_file() or looks_like_image_path(value)  # a typo in a path must not become words
    if image:
        if not as_file.is_file():
            raise UsageError(f"no such image file: {as_file}")
        return Term(path=str(as_file), weight=weight)
    return Term(text=value, weight=weight)


def looks_like_image_path(value: str) -> bool:
    """A term written as a path (``/x``, ``./x``, ``~/x``, ``../x``) or a file name with an image suffix: meant as
    an image, so a missing file is an error rather than a text query made of its letters."""
    stripped = value.strip()
    if stripped.startswith(("/", "./", "../", "~/")) and " " not in stripped:
        return True
    return " " not in stripped and Path(stripped).suffix.lower() in ALL_IMAGE_SUFFIXES


@dataclass(frozen=True)
class Query:
    """What to search for (``positive`` minus ``negative``), within ``filters``, in ``sort`` order. ``keywords``:
    True fuses CLIP's ranking with a match of the positive texts against file and folder names, False never,
    None (default) when a positive text looks like a file name (``keywords.looks_like_file_name``). ``text_match``:
    True or None (default) fuses it with the words read in photos (``store.image_text``), False never."""

    positive: tuple[Term, ...]
    negative: tuple[Term, ...] = ()
    filters: Filters = field(default_factory=Filters)
    sort: str = "relevance"
    keywords: bool | None = None
    text_match: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "positive", tuple(self.positive))
        object.__setattr__(self, "negative", tuple(self.negative))
        if not self.positive:
            raise UsageError("a query needs at least one text or image to look for")
        if self.sort not in SORTS:
            raise UsageError(f"--sort must be one of {', '.join(SORTS)}, not {self.sort!r}")

    @classmethod
    def of(
        cls,
        main: str | Term,
        add: list[str] | tuple[str, ...] = (),
        sub: list[str] | tuple[str, ...] = (),
        filters: Filters | None = None,
        sort: str = "relevance",
        keywords: bool | None = None,
        text_match: bool | None = None,
    ) -> Query:
        """The CLI's way: a main text or term, plus ``--add`` and ``--sub`` specs (``parse_term``)."""
        first = main if isinstance(main, Term) else Term(text=main)
        return cls(
            positive=(first, *(parse_term(spec) for spec in add)),
            negative=tuple(parse_term(spec) for spec in sub),
            filters=filters or Filters(),
            sort=sort,
            keywords=keywords,
            text_match=text_match,
        )

    @property
    def keyword_text(self) -> str | None:
        """The text matched against file names: every positive text, when keywords are on."""
        texts = [term.text for term in self.positive if term.text is not None]
        if not texts or self.keywords is False:
            return None
        if self.keywords is None and not any(looks_like_file_name(t) for t in texts):
            return None
        return " ".join(texts)

    @property
    def text_words(self) -> str | None:
        """The text matched against the words read in photos: every positive text, unless ``text_match`` is False
        (an index without text matches nothing, so the default costs nothing there)."""
        texts = [term.text for term in self.positive if term.text is not None]
        return " ".join(texts) if texts and self.text_match is not False else None

    def with_filters(self, filters: Filters) -> Query:
        return Query(self.positive, self.negative, filters, self.sort, self.keywords, self.text_match)

    def to_dict(self) -> dict:
        return {
            "positive": [term.to_dict() for term in self.positive],
            "negative": [term.to_dict() for term in self.negative],
            "filters": self.filters.to_dict(),
            "sort": self.sort,
            "keywords": self.keywords,
            "text_match": self.text_match,
        }
