"""An image-grounded text decoder in the style of BLIP's: captions and answers to questions, on a frozen CLIP.

A small causal transformer whose tokens cross-attend to the image tower's last feature map, the same tokens the
ITM re-ranker reads (``retrieval.model.itm_tokens.image_tokens``), in the re-ranker's own block
(``retrieval.model.itm.FusionLayer``) with a causal mask. It is trained with a language-modelling loss
(``clipsearch.lab.caption_training``) and decoded by beam search (``retrieval.model.beam_search``). A question is
the decoder's prefix: ``<bos> question words <sep>`` and the answer follows (BLIP's VQA setting); a caption is
what follows ``<bos>`` alone.

The vocabulary is words, built from the training captions, questions and answers and saved with the model, not
CLIP's 49,408 BPE pieces: the output layer (vocabulary x width, tied with the input embedding) is then a few
thousand rows, so a training step and a decoding step on the CPU cost the transformer, not the softmax, and the
model folder stays a few MB. The price is that a word never seen in training cannot be written (nor read in a
question: it becomes ``<unk>``); a decoder trained on a user's captions speaks their words.

A model folder (``FOLDER-cap`` beside a ``local-dir:FOLDER`` CLIP model, as the re-ranker is ``FOLDER-itm``) holds
``caption_config.json`` (sizes, vocabulary, the CLIP model's identity key) and ``caption_model.safetensors``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import ModelLoadError
from retrieval.model.caption_folder import CAPTION_CONFIG_FILE, CAPTION_WEIGHTS_FILE, require_captioner
from retrieval.model.itm import FusionLayer

PAD, UNK, BOS, SEP, EOS = "<pad>", "<unk>", "<bos>", "<sep>", "<eos>"
SPECIALS = (PAD, UNK, BOS, SEP, EOS)
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The words of a caption, question or answer as the vocabulary holds them: lower case letters and digits."""
    return _WORD.findall(text.lower())


def build_vocabulary(texts: list[str], min_count: int = 1) -> tuple[str, ...]:
    """The special tokens, then every word seen at least ``min_count`` times, most frequent first (ties by word)."""
    counts: dict[str, int] = {}
    for value in texts:
        for word in words(value):
            counts[word] = counts.get(word, 0) + 1
    kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return SPECIALS + tuple(kept)


@dataclass(frozen=True)
class CaptionConfig:
    """Sizes of the decoder, its vocabulary, and the CLIP model whose image tokens it reads."""

    image_cells: int
    image_channels: int
    image_embed: int
    vocabulary: tuple[str, ...]
    clip_key: str
    clip_model: str = ""
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    max_length: int = 32  # tokens, prefix included
    image_stage: int = 1  # which feature map of the image tower it reads (``itm_tokens.image_tokens``'s stage)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))


class Vocabulary:
    """Word <-> id for one decoder."""

    def __init__(self, vocabulary: tuple[str, ...]):
        self.words = vocabulary
        self.ids = {word: i for i, word in enumerate(vocabulary)}
        self.pad, self.unk, self.bos, self.sep, self.eos = (self.ids[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(word, self.unk) for word in words(text)]

    def caption_prefix(self) -> list[int]:
        return [self.bos]

    def question_prefix(self, question: str) -> list[int]:
        return [self.bos, *self.encode(question), self.sep]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids if i >= len(SPECIALS))

    def unknown_words(self, text: str) -> list[str]:
        return [word for word in words(text) if word not in self.ids]


class CaptionDecoder(nn.Module):
    """Next-token logits for token prefixes, each reading its image's tokens.

    The image side is built as the re-ranker builds it (normalised grid tokens and the pooled vector, projected,
    with a position embedding large enough that the cell a token comes from is not lost: captions here are about
    where things are). The output layer is the input embedding, transposed (tied)."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        width = config.width
        self.config = config
        self.ln_grid = nn.LayerNorm(config.image_channels)
        self.ln_pooled = nn.LayerNorm(config.image_embed)
        self.image_proj = nn.Linear(config.image_channels, width)
        self.pooled_proj = nn.Linear(config.image_embed, width)
        self.image_position = nn.Parameter(torch.randn(config.image_cells + 1, width) * 0.5)
        self.token_embedding = nn.Embedding(len(config.vocabulary), width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # it is also the output layer: logits start near 0
        self.token_position = nn.Parameter(torch.randn(config.max_length, width) * 0.02)
        self.layers = nn.ModuleList(FusionLayer(width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(width)

    def image_memory(self, grid: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(B, cells + 1, width): what every decoding step cross-attends to; computed once per image."""
        image = torch.cat(
            [self.pooled_proj(self.ln_pooled(pooled.float()))[:, None], self.image_proj(self.ln_grid(grid.float()))],
            dim=1,
        )
        return image + self.image_position

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``memory`` (B, M, width) from ``image_memory``, ``tokens`` (B, L) ids, ``pad`` (B, L) True at padding
        -> (B, L, vocabulary) logits of the token after each position."""
        length = tokens.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        x = self.token_embedding(tokens) + self.token_position[:length]
        for layer in self.layers:
            x = layer(x, pad, memory, causal)
        return self.ln_final(x) @ self.token_embedding.weight.T


def save_captioner(model: CaptionDecoder, out_dir: Path | str, half: bool = True) -> Path:
    """Write the model folder; ``half`` stores float16 weights (loaded back into float32)."""
    from safetensors.torch import save_file

    from retrieval.atomic import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / CAPTION_WEIGHTS_FILE))
    config = (json.dumps(asdict(model.config), indent=1) + "\n").encode()
    atomic_write(out / CAPTION_CONFIG_FILE, lambda f: f.write(config))
    return out


def load_captioner(folder: Path | str) -> CaptionDecoder:
    """The decoder in ``folder``, in eval mode on the CPU; a folder that is not a captioner is a user error."""
    from safetensors.torch import load_file

    folder = require_captioner(Path(folder).expanduser())
    config_file, weights_file = folder / CAPTION_CONFIG_FILE, folder / CAPTION_WEIGHTS_FILE
    try:
        config = CaptionConfig(**json.loads(config_file.read_text()))
        model = CaptionDecoder(config)
        model.load_state_dict({k: v.float() for k, v in load_file(str(weights_file)).items()})
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the captioning model in {folder}: {error}") from error
    return model.eval()
