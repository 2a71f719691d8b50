"""Captioned image sets from the annotation files people actually have, read into one structure.

Formats are told apart by content, never by file name: Karpathy's ``dataset_*.json``, Flickr30K's
``results_20130124.token``, Kaggle's ``results.csv`` (``|``-separated, one known malformed row), CSVs whose
``raw`` column is a JSON list of captions (``test_1k_flickr.csv``, ``flickr_annotations_30k.csv``), and plain
``image,caption`` CSV / JSONL files (including clip_benchmark's ``flickr30k_test_karpathy.txt``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from retrieval.errors import ClipsearchError

FLICKR30K_TEST_IMAGES = 1000
FLICKR30K_TEST_CAPTIONS = 5000
IMAGE_COLUMNS = ("image", "filename", "file_name", "file", "image_name", "image_path", "path", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentence", "comment", "raw")
SPLIT_COLUMNS = ("split",)
_IMAGE_SUFFIX = r"\.(?:jpe?g|png|webp|bmp|gif|tiff?|heic)"
_TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<number>\d+)\t(?P<caption>.*)$")
# Kaggle: `name| number| caption`; the known bad row lacks the second `|`: `2199200615.jpg| 4   A dog ...`.
_KAGGLE_LINE = re.compile(r"^(?P<image>[^|]+)\|\s*(?P<number>\d+)\s*(?:\|\s?|\s+)(?P<caption>.*)$")
_IMAGE_THEN_CAPTION = re.compile(rf"^(?P<image>.*?{_IMAGE_SUFFIX}),(?P<caption>.*)$", re.IGNORECASE)


class _HasSplit(Protocol):
    split: str | None


T = TypeVar("T", bound=_HasSplit)


class DatasetError(ClipsearchError):
    """An annotation file that cannot be read, or a data set that does not match what was asked for."""

    exit_code = 2


@dataclass(frozen=True)
class CaptionedImage:
    """One image and all of its reference captions."""

    path: Path
    captions: tuple[str, ...]
    split: str | None


@dataclass(frozen=True)
class CaptionedSet:
    """Images with captions, in annotation-file order; ``missing``: images named but not on disk."""

    items: tuple[CaptionedImage, ...]
    source_format: str
    missing: tuple[CaptionedImage, ...] = field(default=(), compare=False)

    @property
    def has_splits(self) -> bool:
        return any(item.split is not None for item in self.items + self.missing)

    @property
    def n_captions(self) -> int:
        return sum(len(item.captions) for item in self.items)

    def split(self, name: str) -> CaptionedSet:
        """The images of one split; an error when the annotations carry no split or none of that name."""
        items = _of_split(self.items + self.missing, name, self.source_format)
        return CaptionedSet(
            tuple(item for item in items if item not in self.missing),
            self.source_format,
            tuple(item for item in items if item in self.missing),
        )

    def captions_and_owners(self, prompt: str = "") -> tuple[list[str], list[int]]:
        """All captions flattened in item order, with the index of the image each one describes."""
        texts, owners = [], []
        for index, item in enumerate(self.items):
            for caption in item.captions:
                texts.append(prompt + caption)
                owners.append(index)
        return texts, owners


@dataclass
class _Record:
    """One image as an annotation file names it (relative), before it is found on disk."""

    name: str
    captions: list[str]
    split: str | None


def load_captioned_set(
    annotations: Path,
    images_dir: Path,
    split: str | None = None,
    split_file: Path | None = None,
    allow_missing: bool = False,
) -> CaptionedSet:
    """Read ``annotations`` (format detected by content), keep ``split`` if given, and find the images.

    ``split_file`` supplies the split for formats without one (the ``.token`` file, Kaggle's CSV): a Karpathy
    JSON or any annotations with a split column, or a text file listing the chosen split's images one a line.
    Images the annotations name but ``images_dir`` lacks are an error, unless ``allow_missing`` drops them
    (they are then listed in ``missing``).
    """
    annotations, images_dir = Path(annotations).expanduser(), Path(images_dir).expanduser()
    if not images_dir.is_dir():
        raise DatasetError(f"images folder not found: {images_dir}")
    source_format, records = read_annotations(annotations)
    if split_file is not None:
        records = _apply_split_file(records, Path(split_file).expanduser(), split)
    if split is not None:
        records = _of_split(records, split, source_format)
    return _locate_images(records, images_dir, source_format, allow_missing)


def read_annotations(annotations: Path) -> tuple[str, list[_Record]]:
    """Detect the format of ``annotations`` and read it into records (image name, captions, split)."""
    if not annotations.is_file():
        raise DatasetError(f"annotations file not found: {annotations}")
    try:
        text = annotations.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{annotations} is not a UTF-8 text file ({error.reason})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"annotations file is empty: {annotations}")
    source_format, records = _parse(text, lines, annotations)
    if not records:
        raise DatasetError(f"no captioned images in {annotations} (read as {source_format})")
    return source_format, records


def _parse(text: str, lines: list[str], annotations: Path) -> tuple[str, list[_Record]]:
    first = lines[0].strip()
    if first.startswith(("{", "[")):
        return _parse_json(text, lines, annotations)
    if _TOKEN_LINE.match(lines[0]):
        return "flickr30k-token", _read_token(lines, annotations)
    header = [column.strip().lower() for column in first.split("|")]
    if len(header) == 3 and header[0] == "image_name":
        return "kaggle-csv", _read_kaggle(lines[1:], annotations)
    columns = [column.strip().lower() for column in next(csv.reader([first]))]
    image_column = _first_present(columns, IMAGE_COLUMNS)
    caption_column = _first_present(columns, CAPTION_COLUMNS)
    if image_column is None or caption_column is None:
        raise DatasetError(
            f"cannot tell the format of {annotations}: expected a Karpathy dataset JSON, a Flickr30K "
            f".token file, Kaggle's results.csv, or a CSV/JSONL with an image column "
            f"({', '.join(IMAGE_COLUMNS[:3])}) and a caption column ({', '.join(CAPTION_COLUMNS[:3])}); "
            f"its first line is {first[:80]!r}"
        )
    if len(columns) == 2 and caption_column != "raw":
        return "image-caption-csv", _read_two_column(lines[1:], annotations)
    return _read_csv_table(text, image_column, caption_column, annotations)


def _first_present(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((name for name in candidates if name in columns), None)


def _parse_json(text: str, lines: list[str], annotations: Path) -> tuple[str, list[_Record]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("images"), list):
        return "karpathy-json", _read_karpathy(document["images"], annotations)
    if isinstance(document, list):
        return "json-records", _read_objects(document, annotations)
    if document is None:
        objects = []
        for number, line in enumerate(lines, 1):
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetError(f"{annotations}:{number}: not valid JSON Lines ({error.msg})") from None
        return "jsonl", _read_objects(objects, annotations)
    raise DatasetError(
        f"cannot tell the format of {annotations}: a JSON object without an 'images' list "
        f"(expected Karpathy's dataset_*.json layout)"
    )


def _read_karpathy(images: list, annotations: Path) -> list[_Record]:
    records = []
    for number, image in enumerate(images):
        try:
            name = image["filename"]
            if image.get("filepath"):
                name = f"{image['filepath']}/{name}"
            captions = [sentence["raw"].strip() for sentence in image["sentences"]]
        except (KeyError, TypeError) as error:
            raise DatasetError(f"{annotations}: image #{number} lacks field {error} (Karpathy layout)") from None
        records.append(_Record(name, captions, image.get("split")))
    return records


def _read_objects(objects: Iterable, annotations: Path) -> list[_Record]:
    rows = []
    for number, obj in enumerate(objects, 1):
        if not isinstance(obj, dict):
            raise DatasetError(f"{annotations}: record {number} is not a JSON object")
        keys = {key.lower(): value for key, value in obj.items()}
        image_key = _first_present(list(keys), IMAGE_COLUMNS)
        caption_key = _first_present(list(keys), CAPTION_COLUMNS)
        if image_key is None or caption_key is None:
            raise DatasetError(f"{annotations}: record {number} needs an 'image' and a 'caption' field")
        captions = keys[caption_key]
        for caption in captions if isinstance(captions, list) else [captions]:
            rows.append((str(keys[image_key]), str(caption), keys.get("split")))
    return _group(rows)


def _read_token(lines: list[str], annotations: Path) -> list[_Record]:
    return _read_pattern(lines, annotations, _TOKEN_LINE, 1, "image.jpg#N<TAB>caption")


def _read_kaggle(lines: list[str], annotations: Path) -> list[_Record]:
    return _read_pattern(lines, annotations, _KAGGLE_LINE, 2, "image.jpg| N| caption")


def _read_pattern(lines: list[str], annotations: Path, pattern, first: int, expected: str) -> list[_Record]:
    """One (image, caption) per line, as ``pattern`` reads it; line numbers in errors count from ``first``."""
    rows = []
    for number, line in enumerate(lines, first):
        match = pattern.match(line)
        if match is None:
            raise DatasetError(f"{annotations}:{number}: expected `{expected}`, got {line[:60]!r}")
        rows.append((match["image"].strip(), match["caption"], None))
    return _group(rows)


def _read_two_column(lines: list[str], annotations: Path) -> list[_Record]:
    """``image,caption`` with captions that may hold unquoted commas: split after the image's extension."""
    rows = []
    for number, line in enumerate(lines, 2):
        match = _IMAGE_THEN_CAPTION.match(line)
        if match is not None:
            image, caption = match["image"], match["caption"]
        else:
            fields = next(csv.reader([line]))
            if len(fields) < 2:
                raise DatasetError(f"{annotations}:{number}: expected `image,caption`, got {line[:60]!r}")
            image, caption = fields[0], ",".join(fields[1:])
        if len(caption) >= 2 and caption[0] == caption[-1] == '"':
            caption = next(csv.reader([caption]))[0]
        rows.append((image.strip().strip('"'), caption, None))
    return _group(rows)


def _read_csv_table(text: str, image_column: str, caption_column: str, annotations: Path) -> tuple[str, list]:
    """A CSV with a header: one caption a row, or a JSON-encoded list of captions (the ``raw`` column)."""
    reader = csv.DictReader(io.StringIO(text))
    reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
    split_column = _first_present(reader.fieldnames, SPLIT_COLUMNS)
    rows, json_lists = [], False
    for number, row in enumerate(reader, 2):
        image, value = row.get(image_column), row.get(caption_column)
        if not image or value is None:
            raise DatasetError(f"{annotations}:{number}: empty {image_column!r} or {caption_column!r}")
        captions = [value]
        if value.lstrip().startswith("["):
            with contextlib.suppress(json.JSONDecodeError):
                captions, json_lists = [str(c) for c in json.loads(value)], True
        split = (row.get(split_column) or "").strip() or None if split_column else None
        rows.extend((image.strip(), caption, split) for caption in captions)
    return ("caption-list-csv" if json_lists else "image-caption-csv"), _group(rows)


def _group(rows: Iterable[tuple[str, str, str | None]]) -> list[_Record]:
    """Rows of (image, caption, split) to one record per image, in first-seen order."""
    records: dict[str, _Record] = {}
    for image, caption, split in rows:
        record = records.setdefault(image, _Record(image, [], split))
        record.captions.append(caption.strip())
        if record.split is None:
            record.split = split
    return list(records.values())


def _apply_split_file(records: list[_Record], split_file: Path, split: str | None) -> list[_Record]:
    """Take each image's split from another file, matched by file name (without folders)."""
    if not split_file.is_file():
        raise DatasetError(f"split file not found: {split_file}")
    try:
        _, split_records = read_annotations(split_file)
        splits = {Path(r.name).name: r.split for r in split_records if r.split}
    except DatasetError:
        splits = {}
    if not splits:  # a plain list of the chosen split's image names, one a line
        if split is None or split == "all":
            raise DatasetError(f"{split_file} is a list of image names: say which split it is with --split")
        names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        splits = {name: split for name in names} | {f"{name}.jpg": split for name in names if "." not in name}
    return [_Record(r.name, r.captions, splits.get(Path(r.name).name)) for r in records]


def _of_split(items: Sequence[T], name: str, source_format: str) -> list[T]:
    """The items of split ``name``; ``all`` keeps every item."""
    if name == "all":
        return list(items)
    if not any(item.split is not None for item in items):
        raise DatasetError(
            f"these {source_format} annotations have no train/val/test split: give the split with "
            f"--split-file (e.g. Karpathy's dataset_flickr30k.json), or use every image with --split all"
        )
    chosen = [item for item in items if item.split == name]
    if not chosen:
        known = ", ".join(sorted({item.split for item in items if item.split}))
        raise DatasetError(f"no images in split {name!r} (the annotations have: {known})")
    return chosen


def _locate_images(records: list[_Record], images_dir: Path, source_format: str, allow_missing: bool) -> CaptionedSet:
    root = images_dir.resolve()
    found, missing = [], []
    for record in records:
        path = _find_image(root, record.name)
        if path is None:
            missing.append(CaptionedImage(root / record.name, tuple(record.captions), record.split))
        else:
            found.append(CaptionedImage(path, tuple(record.captions), record.split))
    if missing and not found:
        raise DatasetError(
            f"none of the {len(records):,} images named in the annotations is in {images_dir} "
            f"(looked for e.g. {missing[0].path}): is --images the folder that holds the image files?"
        )
    if missing and not allow_missing:
        examples = ", ".join(item.path.name for item in missing[:3])
        raise DatasetError(
            f"{len(missing):,} of {len(records):,} images are not found in {images_dir} (e.g. {examples}); "
            f"pass --allow-missing to evaluate on the {len(found):,} that are"
        )
    return CaptionedSet(tuple(found), source_format, tuple(missing))


def _find_image(root: Path, name: str) -> Path | None:
    """The image as named, or by its bare file name (a Karpathy ``filepath`` the user's layout lacks)."""
    for candidate in (root / name, root / Path(name).name):
        if candidate.is_file():
            return candidate
    return None


def flickr30k_test_problems(captioned: CaptionedSet) -> list[str]:
    """How ``captioned`` differs from the Flickr30K 1K test split (1,000 images x 5 captions); [] if not."""
    problems = []
    n_images, n_captions = len(captioned.items), captioned.n_captions
    if captioned.missing:
        examples = ", ".join(item.path.name for item in captioned.missing[:3])
        problems.append(f"{len(captioned.missing):,} images not found (e.g. {examples})")
    if n_images != FLICKR30K_TEST_IMAGES or n_captions != FLICKR30K_TEST_CAPTIONS:
        problems.append(
            f"{n_images:,} images and {n_captions:,} captions where the Flickr30K test split has "
            f"{FLICKR30K_TEST_IMAGES:,} and {FLICKR30K_TEST_CAPTIONS:,}"
        )
    short = [item.path.name for item in captioned.items if len(item.captions) != 5]
    if short:
        problems.append(f"{len(short):,} images do not have exactly 5 captions (e.g. {', '.join(short[:3])})")
    return problems
