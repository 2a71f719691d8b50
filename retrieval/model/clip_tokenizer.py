"""open_clip's CLIP tokenizer without torch, loaded in milliseconds: the same token ids from the model's BPE merges.

``import open_clip`` costs over a second because it imports torch; a text query needs only the token ids. The
export (``save_tokenizer``) writes open_clip's merges, one ``a b`` a line, to ``bpe-merges.txt`` and its settings to
``tokenizer-settings.json``; ``ClipTokenizer`` then repeats open_clip's ``SimpleTokenizer`` step by step: ftfy and
HTML clean-up, whitespace folding, lower case, the same split pattern (Python ``regex``, as open_clip uses), the
special tokens matched as pieces, byte-level BPE with ``</w>`` word ends (open_clip's own loop, on the few words
of a query), start/end tokens, truncation. A CLIP vocabulary is its 256 byte characters, the same with ``</w>``,
one token per merge in merge order and the special tokens, so the merges are the whole file: it loads in ~20 ms
where HF ``tokenizers`` took ~75 ms to read a ``tokenizer.json`` (still read from exports made before). Tests
compare the ids with open_clip's on 1,000 varied strings.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

MERGES_FILE = "bpe-merges.txt"
TOKENIZER_FILE = "tokenizer.json"  # exports before bpe-merges.txt: HF tokenizers' file, its merges read from it
SETTINGS_FILE = "tokenizer-settings.json"
WORD_END = "</w>"


class UnsupportedTokenizer(Exception):
    """open_clip's tokenizer for this model is not the plain CLIP one (the query path then keeps torch)."""


# open_clip's ``bytes_to_unicode`` order: the bytes shown as themselves, then the rest (shown as 256, 257, ...)
PRINTABLE_BYTES = (*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1))
OTHER_BYTES = tuple(b for b in range(256) if b not in PRINTABLE_BYTES)


@lru_cache(maxsize=1)
def byte_characters() -> tuple[str, ...]:
    """GPT-2/CLIP's printable stand-in for each byte 0..255 (open_clip's ``bytes_to_unicode``), by byte."""
    shown = dict(zip(PRINTABLE_BYTES, PRINTABLE_BYTES)) | {b: 256 + n for n, b in enumerate(OTHER_BYTES)}
    return tuple(chr(shown[b]) for b in range(256))


def clip_vocabulary(merges: Sequence[str], specials: Sequence[str]) -> list[str]:
    """The tokens in id order that a CLIP ``SimpleTokenizer`` builds from its merges and special tokens."""
    singles = [byte_characters()[b] for b in (*PRINTABLE_BYTES, *OTHER_BYTES)]
    return [*singles, *(c + WORD_END for c in singles), *(m.replace(" ", "") for m in merges), *specials]


def save_tokenizer(tokenizer: Any, folder: Path, context_length: int) -> list[Path]:
    """Write the files ``ClipTokenizer`` loads from an open_clip ``SimpleTokenizer`` (lower-case clean-up, no
    reduction mask, a plain CLIP vocabulary); anything else raises ``UnsupportedTokenizer``. Returns the files."""
    clean = getattr(getattr(tokenizer, "clean_fn", None), "__name__", "")
    if type(tokenizer).__name__ != "SimpleTokenizer" or clean != "_clean_lower" or tokenizer.reduction_fn:
        raise UnsupportedTokenizer(f"{type(tokenizer).__name__} (clean-up {clean or '?'}) is not supported")
    merges = [" ".join(pair) for pair in sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)]
    specials = {tokenizer.decoder[i]: int(i) for i in tokenizer.all_special_ids}
    vocabulary = clip_vocabulary(merges, sorted(specials, key=specials.get))
    if dict(tokenizer.encoder) != {token: i for i, token in enumerate(vocabulary)}:
        raise UnsupportedTokenizer("its vocabulary is not the one its merges make")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MERGES_FILE).write_text("\n".join(merges) + "\n", encoding="utf-8")
    settings = {
        "pattern": tokenizer.pat.pattern,
        "specials": specials,
        "sot": int(tokenizer.sot_token_id),
        "eot": int(tokenizer.eot_token_id),
        "context_length": int(context_length),
    }
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return [folder / MERGES_FILE, folder / SETTINGS_FILE]


def read_merges(folder: Path) -> list[str]:
    """The merges, ``a b`` each, in rank order: from ``bpe-merges.txt``, or an older export's ``tokenizer.json``."""
    if (folder / MERGES_FILE).is_file():
        return (folder / MERGES_FILE).read_text(encoding="utf-8").splitlines()
    merges = json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))["model"]["merges"]
    return [pair if isinstance(pair, str) else " ".join(pair) for pair in merges]


class ClipTokenizer:
    """Token ids as open_clip's ``SimpleTokenizer`` gives them, as int64 numpy rows (no torch)."""

    def __init__(self, folder: Path):
        import regex

        settings = json.loads((folder / SETTINGS_FILE).read_text())
        self.context_length = int(settings["context_length"])
        self.sot, self.eot = int(settings["sot"]), int(settings["eot"])
        self.specials: dict[str, int] = {str(k): int(v) for k, v in settings["specials"].items()}
        self.pattern = regex.compile(settings["pattern"], regex.IGNORECASE)
        merges = read_merges(folder)
        self.ranks = dict(zip(merges, range(len(merges))))  # "a b" -> rank; the merged token's id is 512 + rank
        singles = clip_vocabulary((), ())
        self.single_ids = {token: i for i, token in enumerate(singles)}  # the 512 byte tokens, with and without </w>
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without start/end tokens (``SimpleTokenizer.encode``)."""
        ids: list[int] = []
        shown = byte_characters()
        for piece in self.pattern.findall(_clean_lower(text)):
            if piece in self.specials:
                ids.append(self.specials[piece])
            else:
                ids.extend(self.bpe("".join(shown[b] for b in piece.encode("utf-8"))))
        return ids

    def bpe(self, token: str) -> list[int]:
        """open_clip's ``bpe``: merge the lowest-ranked adjacent pair until none is a merge; the pieces' ids."""
        if token in self.cache:
            return self.cache[token]
        word = [*token[:-1], token[-1] + WORD_END]
        ids = [self.single_ids[piece] for piece in word]
        while len(word) > 1:
            ranked = [(self.ranks.get(f"{a} {b}"), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            known = [rank for rank, _ in ranked if rank is not None]
            if not known:
                break
            best = min(known)
            pair = next(i for rank, i in ranked if rank == best)
            first, second = word[pair], word[pair + 1]
            merged_word, merged_ids, i = [], [], 0
            while i < len(word):  # every occurrence of the pair, left to right, as open_clip does
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged_word.append(first + second)
                    merged_ids.append(512 + best)
                    i += 2
                else:
                    merged_word.append(word[i])
                    merged_ids.append(ids[i])
                    i += 1
            word, ids = merged_word, merged_ids
        self.cache[token] = ids
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), context_length) int64 rows: start, ids, end, zeros; too long: cut, ending with end."""
        rows = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot, *self.encode(text), self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot
            rows[row, : len(tokens)] = tokens
        return rows


def _clean_lower(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy, HTML entities (twice), whitespace folded, lower case. ftfy (~40 ms to
    import) only where it can change something: printable ASCII without ``&`` is already as it leaves it."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = text.strip()
    return " ".join(text.split()).strip().lower()
