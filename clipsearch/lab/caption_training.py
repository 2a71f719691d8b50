"""Train the captioning decoder (``retrieval.model.captioner``) on a frozen CLIP, BLIP's LM objective.

Every training caption is a sample ``<bos> caption <eos>``, and every question a sample ``<bos> question <sep>
answer <eos>``: one decoder learns both, and the loss is cross-entropy with label smoothing on the tokens after
the prefix only (the caption, or the answer: the question is given, not predicted). The CLIP towers stay frozen,
so the image tokens are computed once (``image_token_cache``) and a step costs only the decoder.

It trains by steps on the shared skeleton (``clipsearch.lab.epochs``): every ``eval_every`` steps the validation
split's loss (teacher forced, without smoothing) and its next-word accuracy are measured per kind (captions and
each kind of question), and the best by the mean of the kinds' losses is kept (written at once). The learning rate
holds after its warm-up until ``patience`` validations bring no better one; then it is cut and training goes on
from the best weights, and after ``lr_cuts`` cuts the next such stall ends the run (or ``steps`` does). So how
long the decoder learns at which rate is read from the validation curve of the user's own data.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipsearch.lab.epochs import (
    EpochLoop,
    EpochStats,
    FitResult,
    PlateauSchedule,
    Step,
    Verdict,
    fit,
    optimiser_step,
    shuffled_batches,
)
from clipsearch.lab.questions import Question, read_questions
from retrieval.errors import UsageError
from retrieval.model.caption_folder import CAPTION_CONFIG_FILE
from retrieval.model.captioner import (
    CaptionConfig,
    CaptionDecoder,
    Vocabulary,
    build_vocabulary,
    load_captioner,
    save_captioner,
)
from retrieval.model.itm_tokens import ImageTokens, image_token_dims
from retrieval.model.spec import ModelSpec

REPORT_FILE = "train_report.json"
CAPTION_KIND = "caption"


@dataclass(frozen=True)
class CaptionTrainSettings:
    """How to train the decoder; ``clip`` is the (trained) CLIP model whose image tokens it reads."""

    clip: ModelSpec
    steps: int = 12000  # at most; the validation curve usually ends the run sooner
    eval_every: int = 250
    patience: int = 4  # validations without a better one before the learning rate is cut (or, after the cuts, the end)
    lr_cuts: int = 2  # times the learning rate is cut (by lr_cut, back to the best weights) before a stall ends the run
    lr_cut: float = 0.2
    warmup: int = 500  # steps of linear warm-up to lr
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    width: int = 128
    layers: int = 3
    heads: int = 4
    image_stage: int = 2  # the image tower's feature map before the last: on scenes-clip 4 x 4 cells, not 2 x 2
    # (a linear probe of a cell's shape, scripts/probe_cell_shapes.py: 98.5% there, 93.4% on the last: docs)
    min_word_count: int = 1  # words seen fewer times in training are left out of the vocabulary
    seed: int = 0
    threads: int | None = 1  # torch threads for the steps (the image tokens are made with all): the decoder's tensors
    # are small, and on a shared 2-core machine a second thread cost 25x per step (0.79 s vs 0.03 s, at load 10)
    workers: int = 0
    val_split: str = "val"
    init_from: Path | None = None  # continue from the weights of a decoder folder (same sizes and vocabulary)
    save_fp16: bool = True
    overwrite: bool = False


@dataclass
class CaptionTrainReport:
    out_dir: str
    clip_model: str
    data: dict[str, Any]
    settings: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)  # one record per validation
    best_step: int | None = None
    best_val_loss: float | None = None  # the mean over kinds of the validation loss: the measure that picks the best
    lr_cuts: list[int] = field(default_factory=list)  # the steps at which the learning rate was cut
    stopped: str = ""  # "patience" (after the cuts), "steps" or "interrupted"
    prepare_seconds: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time: on a shared machine, wall time says more about the neighbours

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class Samples:
    """Token sequences (``<bos>`` ... ``<eos>``, right padded) on images: which image, where the prefix ends."""

    images: ImageTokens
    owner: torch.Tensor  # (N,) image of each sequence
    tokens: torch.Tensor  # (N, L)
    prefix: torch.Tensor  # (N,) prefix length (1 for a caption: <bos>)
    kinds: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.owner)


def train_captioner(
    images_dir: Path,
    annotations: Path,
    out_dir: Path,
    settings: CaptionTrainSettings,
    questions: Path | None = None,
    progress: bool = True,
) -> CaptionTrainReport:
    """Train on the train split's captions (and questions), validate on ``val_split``, write the best to ``out_dir``."""
    from clipsearch.lab.datasets import load_captioned_set
    from clipsearch.lab.train_data import split_train_val
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import spec_key

    out_dir = Path(out_dir).expanduser()
    if (out_dir / CAPTION_CONFIG_FILE).exists() and not settings.overwrite:
        raise UsageError(f"{out_dir} already holds a captioning model: pass --overwrite to replace it")
    if settings.steps < 1 or settings.eval_every < 1 or settings.patience < 1 or settings.batch_size < 2:
        raise UsageError("--steps, --eval-every and --patience must be at least 1 and --batch-size at least 2")
    if settings.lr_cuts < 0 or not 0 < settings.lr_cut < 1:
        raise UsageError("--lr-cuts must be 0 or more and the cut a factor between 0 and 1")
    if settings.image_stage < 1:
        raise UsageError("--image-stage counts feature maps back from the last: 1 or more")
    began, cpu_began = time.perf_counter(), time.process_time()
    images_dir = Path(images_dir).expanduser()
    data = split_train_val(load_captioned_set(Path(annotations), images_dir), settings.val_split, settings.seed)
    asked = read_questions(questions) if questions is not None else []
    train_plan = _split_plan(data.train, asked, images_dir, data, settings.val_split, "train")
    val_plan = _split_plan(data.val, asked, images_dir, data, settings.val_split, "val")
    vocabulary = build_vocabulary(
        [text for _, prefix, target, _ in train_plan.texts for text in (prefix or "", target)], settings.min_word_count
    )
    vocab = Vocabulary(vocabulary)
    encoder = Encoder.load(settings.clip, CPU)
    clip = encoder.model.eval()
    for param in clip.parameters():
        param.requires_grad_(False)
    stage = settings.image_stage
    try:
        cells, channels, embed = image_token_dims(clip, encoder.identity.image_size, stage)
    except AssertionError as error:  # open_clip's own check of the feature map asked for
        raise UsageError(f"--image-stage {stage}: this image tower has no such feature map ({error})") from None
    train = train_plan.samples(encoder, vocab, settings.workers, stage)
    val = val_plan.samples(encoder, vocab, settings.workers, stage) if val_plan.texts else None
    longest = max(int(train.tokens.shape[1]), int(val.tokens.shape[1]) if val else 0)
    config = CaptionConfig(
        image_cells=cells,
        image_channels=channels,
        image_embed=embed,
        vocabulary=vocabulary,
        clip_key=spec_key(settings.clip),
        clip_model=settings.clip.name,
        width=settings.width,
        layers=settings.layers,
        heads=settings.heads,
        max_length=max(32, longest + 8),
        image_stage=stage,
    )
    torch.manual_seed(settings.seed)
    model = CaptionDecoder(config)
    if settings.init_from is not None:
        start = load_captioner(settings.init_from)
        if asdict(start.config) != asdict(config):
            raise UsageError(f"--init {settings.init_from} has other sizes, words or another CLIP model than this run")
        model.load_state_dict(start.state_dict())
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = PlateauSchedule(optimizer, settings.lr, settings.warmup)
    best_weights: dict[str, torch.Tensor] = {}
    report = CaptionTrainReport(
        out_dir=str(out_dir),
        clip_model=settings.clip.describe(),
        data={
            "annotations": str(annotations),
            "questions": str(questions) if questions else None,
            "train_images": len(train.images.grid),
            "train_sequences": _counts(train.kinds),
            "val_images": len(val.images.grid) if val else 0,
            "val_sequences": _counts(val.kinds) if val else {},
            "val_source": data.val_source,
            "vocabulary": len(vocabulary),
        },
        settings={
            **asdict(replace(settings, clip=None, init_from=None)),
            "clip": settings.clip.describe(),
            "init_from": str(settings.init_from) if settings.init_from else None,
        },
    )
    report.prepare_seconds = time.perf_counter() - began
    stream = shuffled_batches(len(train), settings.batch_size, rng)
    rounds = -(-settings.steps // settings.eval_every)

    def steps_in(round_: int) -> int:
        return max(0, min(settings.eval_every, settings.steps - (round_ - 1) * settings.eval_every))

    def batches(round_: int) -> Iterable[list[int]]:
        model.train()
        return (next(stream) for _ in range(steps_in(round_)))

    def step(batch: list[int]) -> Step:
        loss = sequence_loss(model, train, batch, settings.label_smoothing)
        return optimiser_step(model, optimizer, schedule, loss, len(batch))

    def judge(stats: EpochStats) -> Verdict:
        model.eval()
        record: dict[str, Any] = {
            "step": min(stats.epoch * settings.eval_every, settings.steps),
            "loss": stats.mean_loss,
            "lr": schedule.lr,
            "seconds": stats.seconds,
        }
        if val is not None:
            record["val"] = validate(model, val)
        report.curve.append(record)
        score = -record["val"]["kind_mean_loss"] if val is not None else -stats.mean_loss
        return Verdict(score, _curve_line(record))

    def keep(round_: int) -> None:
        report.best_step = min(round_ * settings.eval_every, settings.steps)
        report.best_val_loss = report.curve[-1].get("val", {}).get("kind_mean_loss")
        best_weights.update({name: value.clone() for name, value in model.state_dict().items()})
        save_captioner(model, out_dir, half=settings.save_fp16)  # written at once: an interrupted run keeps it

    def stalled() -> bool:
        """Validation stopped improving: cut the learning rate and go on from the best weights, while cuts are left."""
        if len(report.lr_cuts) >= settings.lr_cuts:
            return False
        schedule.cut(settings.lr_cut)
        model.load_state_dict(best_weights)
        report.lr_cuts.append(report.curve[-1]["step"])
        return True

    def write_report(_result: FitResult) -> None:
        report.seconds = time.perf_counter() - began
        report.cpu_seconds = time.process_time() - cpu_began
        report.write(out_dir / REPORT_FILE)

    loop = EpochLoop(
        rounds, batches, step, judge, keep, steps_in, write_report, label="validation round", stalled=stalled
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or threads)
    try:
        result = fit(loop, progress, patience=settings.patience if val is not None else None)
    finally:
        torch.set_num_threads(threads)
    report.stopped = "interrupted" if result.interrupted else "patience" if result.stopped_early else "steps"
    write_report(result)
    if result.interrupted:
        raise KeyboardInterrupt  # the best step so far and its report are already written
    return report


@dataclass(frozen=True)
class _SplitPlan:
    """One split before encoding: its image files and its texts as (image index, prefix question, target, kind)."""

    paths: tuple[Path, ...]
    texts: tuple[tuple[int, str | None, str, str], ...]

    def samples(self, encoder: Any, vocab: Vocabulary, workers: int, stage: int) -> Samples:
        from clipsearch.lab.image_token_cache import cache_image_tokens

        tokens = cache_image_tokens(encoder.model, encoder.preprocess, self.paths, workers, stage=stage)
        return encode_samples(tokens, self.texts, vocab)


def _split_plan(items, asked: Sequence[Question], images_dir: Path, data, val_split: str, split: str) -> _SplitPlan:
    """The split's annotated images with their captions, and the questions on them: a question goes where its
    image went (train or validation); a question on an image the annotations do not name goes by its own split
    (none: training), its image read from ``images_dir``."""
    paths = [item.path for item in items]
    index = {path.resolve(): i for i, path in enumerate(paths)}
    annotated = {item.path.resolve() for item in (*data.train, *data.val)}
    texts = [(i, None, caption, CAPTION_KIND) for i, item in enumerate(items) for caption in item.captions]
    for question in asked:
        path = (images_dir / question.filename).resolve()
        if path not in index:
            own_split = "train" if question.split in (None, "train", "restval") else question.split
            if path in annotated or own_split != (val_split if split == "val" else "train"):
                continue
            if not path.is_file():
                raise UsageError(f"a question names {question.filename}, which is not in {images_dir}")
            index[path] = len(paths)
            paths.append(path)
        texts.append((index[path], question.question, question.answer, question.kind or "question"))
    return _SplitPlan(tuple(paths), tuple(texts))


def encode_samples(images: ImageTokens, texts: Sequence[tuple[int, str | None, str, str]], vocab: Vocabulary):
    """Token id sequences for (image, question or None, target, kind): ``<bos> [question <sep>] target <eos>``."""
    rows, prefixes = [], []
    for _, question, target, _ in texts:
        prefix = vocab.question_prefix(question) if question is not None else vocab.caption_prefix()
        rows.append(prefix + vocab.encode(target) + [vocab.eos])
        prefixes.append(len(prefix))
    width = max((len(r) for r in rows), default=1)
    tokens = torch.full((len(rows), width), vocab.pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    owner = torch.tensor([t[0] for t in texts], dtype=torch.long)
    return Samples(images, owner, tokens, torch.tensor(prefixes, dtype=torch.long), tuple(t[3] for t in texts))


def _logits_and_targets(model: CaptionDecoder, samples: Samples, batch: Sequence[int]):
    """Next-token logits at every position, the target ids, and which targets count (after the prefix, not pad)."""
    index = torch.tensor(batch)
    tokens = samples.tokens[index]
    pad_id = Vocabulary(model.config.vocabulary).pad
    length = int((tokens != pad_id).sum(dim=1).max())
    tokens = tokens[:, :length]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    owners = samples.owner[index]
    memory = model.image_memory(samples.images.grid[owners], samples.images.pooled[owners])
    logits = model(memory, inputs, inputs == pad_id)
    positions = torch.arange(targets.shape[1])[None, :]
    counts = (positions >= samples.prefix[index][:, None] - 1) & (targets != pad_id)
    return logits, targets, counts


def sequence_loss(model: CaptionDecoder, samples: Samples, batch: Sequence[int], smoothing: float) -> torch.Tensor:
    """Cross-entropy (with label smoothing) on the tokens after the prefix."""
    logits, targets, counts = _logits_and_targets(model, samples, batch)
    return F.cross_entropy(logits[counts], targets[counts], label_smoothing=smoothing)


@torch.inference_mode()
def validate(model: CaptionDecoder, samples: Samples, batch_size: int = 512) -> dict[str, Any]:
    """Teacher-forced loss (no smoothing) and next-word accuracy after the prefix, over all and per kind; and the
    mean of the kinds' losses, which picks the best step: a caption has more words, and less certain ones, than an
    answer, so the loss over all words is mostly the captions' and can rise while answers still get better."""
    total, right, n = 0.0, 0, 0
    per_kind: dict[str, list[float]] = {}  # kind -> [sequences all right, sequences, loss sum, target tokens]
    for start in range(0, len(samples), batch_size):
        batch = list(range(start, min(start + batch_size, len(samples))))
        logits, targets, counts = _logits_and_targets(model, samples, batch)
        losses = torch.zeros(counts.shape)
        losses[counts] = F.cross_entropy(logits[counts], targets[counts], reduction="none")
        total += float(losses.sum())
        hits = (logits.argmax(dim=-1) == targets) | ~counts
        n += int(counts.sum())
        right += int((hits & counts).sum())
        rows = zip(batch, hits.all(dim=1).tolist(), losses.sum(dim=1).tolist(), counts.sum(dim=1).tolist())
        for row, whole, loss, tokens in rows:
            kind = per_kind.setdefault(samples.kinds[row], [0, 0, 0.0, 0])
            kind[0] += whole
            kind[1] += 1
            kind[2] += loss
            kind[3] += tokens
    kind_loss = {kind: loss / max(1, tokens) for kind, (_, _, loss, tokens) in sorted(per_kind.items())}
    return {
        "loss": total / max(1, n),
        "kind_mean_loss": sum(kind_loss.values()) / max(1, len(kind_loss)),
        "word_accuracy": right / max(1, n),
        "exact": {kind: hits / count for kind, (hits, count, _, _) in sorted(per_kind.items())},
        "kind_loss": kind_loss,
    }


def _counts(kinds: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind in kinds:
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def _curve_line(record: dict[str, Any]) -> str:
    line = f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.1e}, {record['seconds']:.0f} s"
    val = record.get("val")
    if val:
        exact = ", ".join(f"{kind} {100 * value:.0f}" for kind, value in val["exact"].items())
        line += f"; val loss {val['loss']:.4f} (kinds' mean {val['kind_mean_loss']:.4f})"
        line += f", next word {100 * val['word_accuracy']:.1f}% (all right: {exact})"
    return line
