"""Write captions and answer questions for images with a trained decoder on top of the CLIP model it was trained for.

``Captioner`` is what `clipsearch caption`, `clipsearch ask` and the index's caption pass use: preprocessed pixels
in, the frozen CLIP's image tokens (``itm_tokens.image_tokens_batched``, as the re-ranker reads them), then beam
search (``beam_search``) over the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import UsageError
from retrieval.model.beam_search import BeamSettings, beam_search
from retrieval.model.caption_folder import caption_folder
from retrieval.model.captioner import CaptionDecoder, Vocabulary, load_captioner
from retrieval.model.device import CPU, Device
from retrieval.model.itm_tokens import ImageTokens, image_tokens_batched
from retrieval.model.spec import ModelSpec


class Captioner:
    """A loaded decoder and the (frozen) open_clip model whose image tokens it reads."""

    def __init__(
        self, decoder: CaptionDecoder, clip: Any, preprocess: Any, device: Device = CPU, image_size: int | None = None
    ):
        self.decoder = decoder.to(device.torch_name).eval()
        self.image_size = image_size  # the side images are decoded to (draft decoding), None: full size
        self.vocab = Vocabulary(decoder.config.vocabulary)
        self.clip = clip
        self.preprocess = preprocess
        self.device = device
        self.folder: Path | None = None

    @classmethod
    def load(cls, folder: Path | str, encoder: Any, clip_key: str, image_size: int | None = None) -> Captioner:
        """The decoder in ``folder`` on ``encoder``'s model; refused when it was trained on another CLIP model."""
        decoder = load_captioner(folder)
        if decoder.config.clip_key != clip_key:
            raise UsageError(
                f"the captioning model in {folder} was trained on another CLIP model "
                f"({decoder.config.clip_model or '?'}) than this one"
            )
        if getattr(encoder, "text_only", False):
            raise UsageError("captioning needs the full CLIP model, not a text-only encoder")
        captioner = cls(decoder, encoder.model, encoder.preprocess, encoder.device, image_size)
        captioner.folder = Path(folder).expanduser()
        return captioner

    @property
    def image_stage(self) -> int:
        """The feature map of the image tower the decoder reads (``itm_tokens.image_tokens``'s stage)."""
        return self.decoder.config.image_stage

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        return image_tokens_batched(self.clip, pixels, self.device.torch_name, stage=self.image_stage)

    @torch.inference_mode()
    def caption_tokens(self, images: ImageTokens, settings: BeamSettings = BeamSettings()) -> list[str]:
        """One caption per image."""
        return self.continue_prefixes(images, [self.vocab.caption_prefix()] * len(images.grid), settings)

    @torch.inference_mode()
    def answer_tokens(
        self, images: ImageTokens, questions: Sequence[str], settings: BeamSettings = BeamSettings()
    ) -> list[str]:
        """The answer to question i about image i."""
        return self.continue_prefixes(images, [self.vocab.question_prefix(q) for q in questions], settings)

    def continue_prefixes(
        self, images: ImageTokens, prefixes: list[list[int]], settings: BeamSettings, batch_size: int = 64
    ) -> list[str]:
        """Decode every prefix on its image, prefixes of one length together (beam search needs one length)."""
        limit = self.decoder.config.max_length - 1
        if any(len(p) > limit for p in prefixes):
            raise UsageError(f"a question is too long for this model (at most {limit - 2} words)")
        out: list[str] = [""] * len(prefixes)
        by_length: dict[int, list[int]] = {}
        for i, prefix in enumerate(prefixes):
            by_length.setdefault(len(prefix), []).append(i)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the decoder's tensors are small: more threads only wait on each other (CPU)
        try:
            self._decode_groups(images, prefixes, by_length, settings, batch_size, out)
        finally:
            torch.set_num_threads(threads)
        return out

    def _decode_groups(self, images, prefixes, by_length, settings, batch_size, out) -> None:
        for rows in by_length.values():
            for start in range(0, len(rows), batch_size):
                part = rows[start : start + batch_size]
                index = torch.tensor(part)
                memory = self.decoder.image_memory(
                    images.grid[index].to(self.device.torch_name), images.pooled[index].to(self.device.torch_name)
                )
                for row, ids in zip(part, beam_search(self.decoder, memory, [prefixes[i] for i in part], settings)):
                    out[row] = self.vocab.decode(ids)

    def captions(self, pixels: torch.Tensor, settings: BeamSettings = BeamSettings()) -> list[str]:
        return self.caption_tokens(self.image_tokens(pixels), settings)

    def answers(self, pixels: torch.Tensor, questions: Sequence[str], settings: BeamSettings = BeamSettings()):
        return self.answer_tokens(self.image_tokens(pixels), questions, settings)


@dataclass(frozen=True)
class FileAnswer:
    """What the decoder wrote for one file: ``text`` (a caption or an answer), or ``error`` when it could not be
    read."""

    path: str
    text: str | None
    error: str | None = None


def open_captioner(spec: ModelSpec, folder: Path | None, device: Device) -> Captioner:
    """The CLIP model of ``spec`` and the decoder trained on it (``caption_folder``), loaded."""
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import spec_key

    path = caption_folder(spec, folder)
    load_captioner(path)  # a missing or broken folder is said before the CLIP model loads
    encoder = Encoder.load(spec, device)
    return Captioner.load(path, encoder, spec_key(spec, check=False), encoder.identity.image_size)


def describe_files(
    captioner: Captioner,
    paths: Sequence[Path | str],
    question: str | None = None,
    settings: BeamSettings = BeamSettings(),
) -> list[FileAnswer]:
    """A caption of each file, or with ``question`` the answer about each; an unreadable file gets its reason."""
    from retrieval.images import DecodeError, load_image

    pixels, readable, out = [], [], {}
    for path in paths:
        try:
            pixels.append(captioner.preprocess(load_image(Path(path), captioner.image_size)))
            readable.append(str(path))
        except (DecodeError, OSError) as error:
            out[str(path)] = FileAnswer(str(path), None, str(error))
    if readable:
        batch = torch.stack(pixels)
        texts = (
            captioner.answers(batch, [question] * len(readable), settings)
            if question is not None
            else captioner.captions(batch, settings)
        )
        out.update({path: FileAnswer(path, text) for path, text in zip(readable, texts)})
    return [out[str(path)] for path in paths]
