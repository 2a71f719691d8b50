"""Beam search for the captioning decoder: a length penalty, and no n-gram written twice.

Greedy decoding commits to its first word; a beam keeps the ``beams`` best partial texts. Summed log-probabilities
favour short texts, so a finished text is ranked by its score divided by GNMT's length penalty
((5 + length) / 6) ** alpha (Wu et al., 2016; alpha 0 ranks by the raw sum). A small decoder loops ("a red circle
above a red circle above ..."): a word that would complete an n-gram already written is banned (``no_repeat``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retrieval.model.captioner import SPECIALS, CaptionDecoder, Vocabulary


@dataclass(frozen=True)
class BeamSettings:
    beams: int = 3
    max_words: int = 20  # at most this many words after the prefix (and the model's max_length in all)
    length_penalty: float = 0.6  # alpha; larger favours longer texts
    no_repeat: int = 3  # n of the n-grams that may not repeat (0: off)


def length_penalty(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


def _banned(generated: list[int], n: int) -> set[int]:
    """Words that would complete an n-gram already in ``generated``."""
    if n <= 0 or len(generated) < n - 1:
        return set()
    if n == 1:
        return set(generated)
    tail = tuple(generated[len(generated) - n + 1 :])
    return {generated[i + n - 1] for i in range(len(generated) - n + 1) if tuple(generated[i : i + n - 1]) == tail}


def _settled(finished: list, best_alive: float, beams: int, steps: int, settings: BeamSettings) -> bool:
    """No live beam can still beat the worst of ``beams`` finished texts: scores only fall as a text grows, and
    the most a longer text can gain is the length penalty of the longest one allowed."""
    if best_alive == float("-inf"):
        return True
    if len(finished) < beams:
        return False
    kept = sorted(score for score, _ in finished)[-beams]
    return kept >= best_alive / length_penalty(steps, settings.length_penalty)


@torch.inference_mode()
def beam_search(
    model: CaptionDecoder, memory: torch.Tensor, prefixes: list[list[int]], settings: BeamSettings = BeamSettings()
) -> list[list[int]]:
    """The best continuation (word ids, without the end token) of each prefix, each reading its row of ``memory``
    (``model.image_memory``). The prefixes of one call have one length (the caller groups questions by it)."""
    vocab = Vocabulary(model.config.vocabulary)
    batch, beams, start = len(prefixes), max(1, settings.beams), len(prefixes[0])
    if any(len(p) != start for p in prefixes):
        raise ValueError("beam_search: prefixes of one call must have one length")
    steps = max(1, min(settings.max_words + 1, model.config.max_length - start))
    sequences = torch.tensor(prefixes, dtype=torch.long).repeat_interleave(beams, 0)
    memory = memory.repeat_interleave(beams, 0)
    scores = torch.full((batch, beams), float("-inf"))
    scores[:, 0] = 0.0  # one live beam per prefix at first: the others would repeat it
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    never = [vocab.ids[s] for s in SPECIALS if s != "<eos>"]
    for step in range(steps):
        pad = torch.zeros(sequences.shape, dtype=torch.bool)
        logp = model(memory, sequences, pad)[:, -1].float().log_softmax(dim=-1)
        logp[:, never] = float("-inf")
        if step == 0:
            logp[:, vocab.eos] = float("-inf")  # no empty text
        if step == steps - 1:
            logp[:, : vocab.eos] = float("-inf")
            logp[:, vocab.eos + 1 :] = float("-inf")  # out of room: end here
        for row in range(len(sequences)):
            banned = _banned(sequences[row, start:].tolist(), settings.no_repeat)
            if banned:
                logp[row, list(banned)] = float("-inf")
        total = (scores.reshape(-1, 1) + logp).reshape(batch, -1)
        values, flat = total.topk(min(2 * beams, total.shape[1]), dim=1)
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            kept = 0
            for rank, (value, index) in enumerate(zip(values[b].tolist(), flat[b].tolist())):
                if value == float("-inf"):
                    break
                row, token = b * beams + index // len(vocab), index % len(vocab)
                generated = sequences[row, start:].tolist()
                if token == vocab.eos:  # a text ends here, if it ranks among the beams' best
                    if rank < beams:
                        finished[b].append(
                            (value / length_penalty(len(generated) + 1, settings.length_penalty), generated)
                        )
                    continue
                if kept < beams:
                    next_rows.append(row)
                    next_tokens.append(token)
                    next_scores.append(value)
                    kept += 1
            while kept < beams:  # fewer live candidates than beams: dead rows keep the shape
                next_rows.append(b * beams)
                next_tokens.append(vocab.pad)
                next_scores.append(float("-inf"))
                kept += 1
        sequences = torch.cat([sequences[next_rows], torch.tensor(next_tokens)[:, None]], dim=1)
        scores = torch.tensor(next_scores).reshape(batch, beams)
        if all(_settled(f, float(s.max()), beams, steps, settings) for f, s in zip(finished, scores)):
            break
    return [max(f)[1] if f else [] for f in finished]
