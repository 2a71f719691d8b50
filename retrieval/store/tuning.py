"""Measure an approximate index against exact search, and tune how much of it a query visits.

Recall is measured with *text* queries: CLIP text vectors sit apart from the image vectors (the modality gap),
which is exactly where approximate indexes lose neighbours; image-to-image probes would flatter them. The effort
(nprobe, efSearch, rescore depth) is chosen on half of the probes and recall is reported on the other half.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from retrieval.store.index_types import TARGET_RECALL
from retrieval.store.topk import empty_top_k, merge_top_k, pad_top_k
from retrieval.store.vectors import VectorIndex

K = 10
SUBJECTS = (
    "a dog",
    "a cat",
    "a small child",
    "an old man",
    "a woman smiling",
    "a red car",
    "a bicycle",
    "a sailing boat",
    "a mountain lake",
    "a busy city street",
    "a birthday cake",
    "a bowl of fruit",
    "a wooden house",
    "a bird on a branch",
    "a horse in a field",
    "a stone bridge",
    "a sandy beach",
    "a forest path",
    "a plate of pasta",
    "a group of friends",
)
SETTINGS = ("at sunset", "in the snow", "in the rain", "at night", "on a sunny day", "in black and white")


def probe_texts() -> list[str]:
    """120 everyday captions: the kind of thing people type into a photo search."""
    return [f"a photo of {subject} {setting}" for subject in SUBJECTS for setting in SETTINGS]


def exact_top_k(batches: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int = K) -> np.ndarray:
    """Ids of the exact top-k per query by brute force over (ids, vectors) batches; -1 pads short results."""
    best = empty_top_k(len(queries))
    for ids, vectors in batches:
        best = merge_top_k(best, queries @ vectors.T, ids, k)
    return pad_top_k(best, k)[1]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k that the index returned (ids -1 ignored)."""
    shares = []
    for got, want in zip(found, exact):
        want = set(int(i) for i in want if i >= 0)
        if want:
            shares.append(len(want & {int(i) for i in got if i >= 0}) / len(want))
    return float(np.mean(shares)) if shares else 1.0


@dataclass(frozen=True)
class RecallReport:
    recall: float  # on the held-out half of the probes
    queries: int
    kind: str  # "text" or "image" (when the model could not be loaded)
    effort: int  # nprobe or efSearch chosen
    rescore: int  # ivfpq candidates per result rescored exactly


def efforts(index: VectorIndex) -> list[int]:
    """The search efforts tuning tries, cheapest first: the kind's ladder (nprobe or efSearch)."""
    return index.kind.efforts(index.index)


def tune(index: VectorIndex, queries: np.ndarray, exact: np.ndarray, kind: str, target: float = TARGET_RECALL):
    """Smallest effort (and ivfpq rescore depth) that clears ``target`` with a margin on the even probes (a few
    dozen probes are a noisy estimate); recall is then measured on the odd ones.

    Where no setting clears it (at 10M rows, 64-byte codes rank the true neighbours of hard queries below the
    rescored candidates whatever the effort), the cheapest setting on the plateau: more effort past the point
    where recall stops rising costs time and buys nothing (at 10M the old fallback, every list, answered in
    seconds for the recall that 64 of 3,159 lists gave)."""
    aim = target + (1 - target) / 2
    tune_q, tune_exact = queries[0::2], exact[0::2]
    check_q, check_exact = queries[1::2], exact[1::2]
    rescoring = index.kind.rescores and index.rescore_source is not None
    depths = (4, 10, 32, 100) if rescoring else (index.params.rescore,)  # candidates rescored: k times this
    plateaus: list[tuple[float, int, int]] = []  # (recall, effort, depth) where each depth levels off
    chosen = None
    for depth in depths:
        index.params = replace(index.params, rescore=depth)
        curve: list[tuple[float, int]] = []
        for effort in efforts(index):
            index.set_search_effort(effort)
            curve.append((recall_at_k(index.search(tune_q, K)[1], tune_exact), effort))
            if curve[-1][0] >= aim:
                chosen = (depth, effort)
                break
            if _levelled(curve):
                break
        if chosen:
            break
        plateaus.append((*_plateau(curve), depth))
    if chosen is None:
        best = max(recall for recall, _, _ in plateaus)
        _, effort, depth = next(row for row in plateaus if row[0] >= best - PLATEAU_TOLERANCE)
        chosen = (depth, effort)
    depth, effort = chosen
    index.params = replace(index.params, rescore=depth)
    index.set_search_effort(effort)
    held_out = recall_at_k(index.search(check_q, K)[1], check_exact)
    return RecallReport(round(held_out, 4), len(check_q), kind, effort, depth)


PLATEAU_TOLERANCE = 0.003  # recall within this of the best seen counts as the same (a few probes' noise)
PLATEAU_STEPS = 3  # efforts in a row that add less than the tolerance: the curve has levelled off


def _levelled(curve: list[tuple[float, int]]) -> bool:
    """True once the last ``PLATEAU_STEPS`` doublings of effort added less than the tolerance in all."""
    if len(curve) <= PLATEAU_STEPS:
        return False
    return curve[-1][0] - curve[-1 - PLATEAU_STEPS][0] < PLATEAU_TOLERANCE


def _plateau(curve: list[tuple[float, int]]) -> tuple[float, int]:
    """(recall, effort): the least effort whose recall is within the tolerance of the curve's best."""
    best = max(recall for recall, _ in curve)
    return next((recall, effort) for recall, effort in curve if recall >= best - PLATEAU_TOLERANCE)
