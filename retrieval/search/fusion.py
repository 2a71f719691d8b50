"""Putting rankings together: reciprocal rank fusion (CLIP + file-name keywords + words read in photos) and date
order."""

from __future__ import annotations

from collections.abc import Sequence

RRF_K = 60  # the usual constant of reciprocal rank fusion (Cormack et al., 2009)
# A keyword match counts twice: the first 61 file-name matches come before anything only CLIP found (2/(60+61) >
# 1/61), while CLIP still orders the matches among themselves. A query that names a file wants that file first.
KEYWORD_WEIGHT = 2.0
# Words read in a photo count as much as CLIP: on by default for every text query, so a photo of a sign holding the
# query's words comes first when CLIP also finds it plausible, without burying the pictures CLIP finds (a text match
# at text rank r and CLIP rank c scores 1/(60+r) + 1/(60+c); a picture only CLIP found, at most 1/61). It goes
# before CLIP's ranking in the fusion, so a match CLIP ranks nowhere still ties CLIP's first and wins the tie.
TEXT_WEIGHT = 1.0


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], weights: Sequence[float], k: int = RRF_K) -> list[int]:
    """Items of all rankings by sum(weight / (k + rank)), rank from 1; ties keep the order items were first met
    in (so the first ranking wins them)."""
    fused: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    return sorted(fused, key=lambda item: -fused[item])


def newest_first(ids: Sequence[int], taken_at: dict[int, str | None]) -> list[int]:
    """``ids`` by date taken, newest first; images without a date last, in their given order."""
    dated = sorted((i for i in ids if taken_at.get(i)), key=lambda i: taken_at[i], reverse=True)
    return dated + [i for i in ids if not taken_at.get(i)]
