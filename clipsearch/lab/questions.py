"""Question-answer pairs about images, for the captioning decoder's VQA setting (`train-captioner --questions`).

A JSON file: ``{"questions": [{"filename": "scene_00001.png", "question": "...", "answer": "...", "kind": "colour",
"split": "train"}]}`` (or the list alone; ``image`` may stand for ``filename``). ``kind`` and ``split`` are optional:
evaluation reports accuracy per kind, and a question without a split takes its image's split in the annotations.
``scripts/make_scenes_dataset.py`` writes one, answered from the scenes it drew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clipsearch.lab.datasets import DatasetError


@dataclass(frozen=True)
class Question:
    filename: str
    question: str
    answer: str
    kind: str = ""
    split: str | None = None


def read_questions(path: Path) -> list[Question]:
    """Every question in ``path``; a file that is not such a list is a one-line error."""
    path = Path(path).expanduser()
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DatasetError(f"cannot read questions from {path}: {error}") from error
    records = document.get("questions") if isinstance(document, dict) else document
    if not isinstance(records, list):
        raise DatasetError(f"{path} holds no list of questions (expected {{'questions': [...]}})")
    out = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: question {number} is not an object")
        name = record.get("filename") or record.get("image")
        question, answer = record.get("question"), record.get("answer")
        if not all(isinstance(v, str) and v.strip() for v in (name, question, answer)):
            raise DatasetError(f"{path}: question {number} needs a filename, a question and an answer")
        out.append(Question(name, question, answer, str(record.get("kind") or ""), record.get("split")))
    return out
