"""`clipsearch eval captions --captioning`: how well the captioning decoder writes and answers, on a split.

- BLEU-4 and CIDEr(-D) of the generated captions against the split's reference captions, with pycocoevalcap's own
  ``Bleu`` and ``Cider`` classes (pure Python; the extra ``clipsearch[captions]``), so the figures compare with
  published ones. Captions are tokenised as the vocabulary reads them (lower case words), not by the Java PTB
  tokenizer the COCO toolkit would call.
- On generated scenes (``scripts/make_scenes_dataset.py``, whose images list every true statement under
  ``attributes.statements``): the share of generated captions that are true of their image, both objects and the
  relation right, checked against the scene that was drawn, not against the one reference caption.
- With questions (``--questions``): answer accuracy (exact words) per question kind, on the split's images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipsearch.lab.datasets import CaptionedSet, load_captioned_set
from clipsearch.lab.questions import read_questions
from retrieval.errors import UsageError
from retrieval.model.beam_search import BeamSettings
from retrieval.model.captioner import words


@dataclass
class CaptioningReport:
    images: int
    split: str | None
    captioner: str
    bleu4: float | None = None
    cider: float | None = None
    true_share: float | None = None  # generated captions true of their scene (generated sets only)
    scenes_checked: int = 0
    vqa: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> {"accuracy", "questions"}
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few (image, caption, references, true)
    seconds_per_image: float = 0.0  # decoding only (image tokens + beam search), for the caption

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def coco_scores(references: dict[int, list[str]], generated: dict[int, str]) -> tuple[float, float]:
    """(BLEU-4, CIDEr) with pycocoevalcap's classes, on lower-case word tokens."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise UsageError(
            "BLEU and CIDEr need pycocoevalcap: pip install 'clipsearch[captions]' (or pycocoevalcap)"
        ) from None
    gts = {i: [" ".join(words(r)) for r in refs] for i, refs in references.items()}
    res = {i: [" ".join(words(generated[i])) or "."] for i in references}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return float(bleu[3]), float(cider)


def scene_statements(annotations: Path) -> dict[str, set[str]]:
    """File name -> every true statement of its scene, from a generated scenes set (empty for other sets)."""
    try:
        document = json.loads(Path(annotations).expanduser().read_text())
    except (OSError, ValueError):
        return {}
    images = document.get("images") if isinstance(document, dict) else None
    out = {}
    for image in images or []:
        statements = (image.get("attributes") or {}).get("statements") if isinstance(image, dict) else None
        if statements:
            out[image["filename"]] = {" ".join(words(s)) for s in statements}
    return out


def is_true(caption: str, statements: set[str]) -> bool:
    """The caption says one of the scene's true statements, word for word (both objects and the relation)."""
    return " ".join(words(caption)) in statements


def evaluate_captioning(
    annotations: Path,
    images_dir: Path,
    captioner: Any,
    split: str | None = None,
    questions: Path | None = None,
    settings: BeamSettings = BeamSettings(),
    workers: int = 0,
) -> CaptioningReport:
    """Caption every image of the split (and answer the questions on them) with a loaded ``Captioner``."""
    import time

    from clipsearch.lab.image_token_cache import cache_image_tokens

    captioned: CaptionedSet = load_captioned_set(annotations, images_dir, split)
    if not captioned.items:
        raise UsageError("the captioned set is empty")
    began = time.perf_counter()
    paths = [item.path for item in captioned.items]
    tokens = cache_image_tokens(
        captioner.clip, captioner.preprocess, paths, workers, captioner.device.torch_name, stage=captioner.image_stage
    )
    generated = captioner.caption_tokens(tokens, settings)
    report = CaptioningReport(len(captioned.items), split, str(captioner.folder or ""))
    report.seconds_per_image = (time.perf_counter() - began) / len(captioned.items)
    references = {i: list(item.captions) for i, item in enumerate(captioned.items)}
    report.bleu4, report.cider = coco_scores(references, dict(enumerate(generated)))
    statements = scene_statements(annotations)
    verdicts = [is_true(g, statements[item.path.name]) for g, item in zip(generated, captioned.items)
                if item.path.name in statements]  # fmt: skip
    if verdicts:
        report.true_share, report.scenes_checked = sum(verdicts) / len(verdicts), len(verdicts)
    for i, item in enumerate(captioned.items[:5]):
        example = {"image": item.path.name, "caption": generated[i], "references": list(item.captions)}
        if item.path.name in statements:
            example["true"] = is_true(generated[i], statements[item.path.name])
        report.examples.append(example)
    if questions is not None:
        report.vqa = _vqa(captioner, captioned, tokens, questions, settings)
    return report


def _vqa(captioner, captioned: CaptionedSet, tokens, questions: Path, settings: BeamSettings) -> dict:
    import torch

    from retrieval.model.itm_tokens import ImageTokens

    position = {item.path.name: i for i, item in enumerate(captioned.items)}
    asked = [q for q in read_questions(questions) if Path(q.filename).name in position]
    if not asked:
        raise UsageError(f"none of the questions in {questions} is about an image of this split")
    index = torch.tensor([position[Path(q.filename).name] for q in asked])
    answers = captioner.answer_tokens(
        ImageTokens(tokens.grid[index], tokens.pooled[index]), [q.question for q in asked], settings
    )
    per_kind: dict[str, list[int]] = {}
    for question, answer in zip(asked, answers):
        kind = per_kind.setdefault(question.kind or "question", [0, 0])
        kind[0] += words(answer) == words(question.answer)
        kind[1] += 1
    return {kind: {"accuracy": right / n, "questions": n} for kind, (right, n) in sorted(per_kind.items())}


def report_lines(report: CaptioningReport) -> list[str]:
    """The report as the command prints it."""
    lines = [f"captioning on {report.images} images (split {report.split or 'all'}), {report.captioner}"]
    lines.append(f"BLEU-4 {report.bleu4:.3f}   CIDEr {report.cider:.3f}")
    if report.true_share is not None:
        lines.append(f"captions true of their scene: {100 * report.true_share:.1f}% of {report.scenes_checked}")
    for kind, result in report.vqa.items():
        lines.append(f"VQA {kind:<10} {100 * result['accuracy']:5.1f}%  ({result['questions']} questions)")
    lines.append(f"decoding: {1000 * report.seconds_per_image:.1f} ms per image (image tokens + beam search)")
    for example in report.examples[:3]:
        mark = "" if "true" not in example else ("  [true]" if example["true"] else "  [false]")
        lines.append(f"  {example['image']}: {example['caption']}{mark}")
    return lines
