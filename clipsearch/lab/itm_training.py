"""Train a fusion ITM re-ranker on a frozen CLIP model, ALBEF-style, from plain captions.

Each step takes a batch of true (image, caption) pairs and adds, for each:
- a negative image mined from the dual encoder's own similarities (one of the caption's top images that is
  not its own), and a negative caption mined the same way for the image;
- two binding hard negatives of two different kinds (colours, shapes or objects swapped, relation reversed or
  turned at a right angle): from the annotations where they carry some, and derived from the caption's own
  text where it relates two things (``clipsearch.lab.hard_negatives``), so the model learns what a bag of
  words cannot tell apart.
The loss is cross-entropy on match / no match. The CLIP towers stay frozen, so the image tokens and the
mining are computed once; only the small fusion model trains.

It trains by steps, not epochs: every ``eval_every`` steps validation measures recall@1 after re-ranking the
dual encoder's top ``rerank_depth`` (and hard-negative accuracy, per kind); the best evaluation is kept, and the
run stops once ``patience`` evaluations in a row brought no better one, or at ``steps``. A run whose best is
below the dual encoder's own recall@1 is saved marked as such (``retrieval.model.itm.ITM_VERDICT_FILE``): search
refuses it unless forced.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipsearch.lab.datasets import DatasetError
from clipsearch.lab.epochs import EpochLoop, EpochStats, FitResult, Step, Verdict, fit, shuffled_batches
from clipsearch.lab.hard_negatives import hard_negative_accuracy, negative_trials, negatives_for, read_hard_negatives
from retrieval.errors import UsageError
from retrieval.model.itm import (
    ITM_CONFIG_FILE,
    ITM_VERDICT_FILE,
    FusionItm,
    ItmConfig,
    load_itm,
    save_itm,
    write_verdict,
)
from retrieval.model.itm_tokens import ImageTokens, image_token_dims, text_tokens
from retrieval.model.spec import ModelSpec

REPORT_FILE = "train_report.json"


@dataclass(frozen=True)
class ItmTrainSettings:
    """How to train the re-ranker; ``clip`` is the (trained) CLIP model whose tokens it reads."""

    clip: ModelSpec
    steps: int = 4000  # at most; patience usually ends the run sooner
    eval_every: int = 250  # steps between validations
    patience: int = 6  # validations without a better recall@1 before stopping
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    width: int = 128
    layers: int = 2
    heads: int = 4
    mine_top: int = 32
    rerank_depth: int = 20
    seed: int = 0
    threads: int | None = None
    workers: int = 0
    val_split: str = "val"
    init_from: Path | None = None  # continue from the weights of a re-ranker folder (same sizes) instead of random
    save_fp16: bool = True
    overwrite: bool = False


@dataclass
class ItmTrainReport:
    out_dir: str
    clip_model: str
    data: dict[str, Any]
    settings: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)  # one record per validation: step, loss, val scores
    best_step: int | None = None
    dual_r1: float | None = None  # the dual encoder's validation recall@1: what the re-ranker must beat
    best_r1: float | None = None
    worse_than_dual_encoder: bool = False
    stopped: str = ""  # "patience", "steps" or "interrupted"
    prepare_seconds: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time: on a shared machine, wall time says more about the neighbours

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class _Split:
    """Frozen CLIP outputs for one split: image tokens, caption vectors, and which image each caption is of."""

    images: ImageTokens
    texts: list[str]
    owners: np.ndarray
    text_vectors: torch.Tensor


def train_itm(
    images_dir: Path, annotations: Path, out_dir: Path, settings: ItmTrainSettings, progress: bool = True
) -> ItmTrainReport:
    """Train the fusion model on the train split, validate on ``val_split``, write the best step to ``out_dir``."""
    from clipsearch.lab.datasets import load_captioned_set
    from clipsearch.lab.train_data import split_train_val
    from retrieval.model.device import CPU
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import spec_key

    out_dir = Path(out_dir).expanduser()
    if (out_dir / ITM_CONFIG_FILE).exists() and not settings.overwrite:
        raise UsageError(f"{out_dir} already holds a re-ranker: pass --overwrite to replace it")
    if settings.steps < 1 or settings.eval_every < 1 or settings.patience < 1 or settings.batch_size < 2:
        raise UsageError("--steps, --eval-every and --patience must be at least 1 and --batch-size at least 2")
    (out_dir / ITM_VERDICT_FILE).unlink(missing_ok=True)  # a verdict speaks for the weights of one run only
    if settings.threads:
        torch.set_num_threads(settings.threads)
    began, cpu_began = time.perf_counter(), time.process_time()
    captioned = load_captioned_set(Path(annotations), Path(images_dir))
    data = split_train_val(captioned, settings.val_split, settings.seed)
    table = read_hard_negatives(annotations)
    encoder = Encoder.load(settings.clip, CPU)
    clip, tokenizer = encoder.model.eval(), encoder.tokenizer
    for param in clip.parameters():
        param.requires_grad_(False)
    train = _encode_split(encoder, data.train, settings)
    val = _encode_split(encoder, data.val, settings)
    val_trials = _trials(data.val, table)

    cells, channels, embed = image_token_dims(clip, encoder.identity.image_size)
    config = ItmConfig(
        image_cells=cells,
        image_channels=channels,
        image_embed=embed,
        text_width=int(clip.ln_final.normalized_shape[0]),
        clip_key=spec_key(settings.clip),
        clip_model=settings.clip.name,
        width=settings.width,
        layers=settings.layers,
        heads=settings.heads,
    )
    torch.manual_seed(settings.seed)
    model = FusionItm(config)
    if settings.init_from is not None:
        start = load_itm(settings.init_from)
        if asdict(start.config) != asdict(config):
            raise UsageError(f"--init {settings.init_from} has other sizes or another CLIP model than this run")
        model.load_state_dict(start.state_dict())
    rng = random.Random(settings.seed)
    neg_images, neg_texts = _mine(train.text_vectors, train.images.pooled, train.owners, train.texts, settings.mine_top)
    own = [frozenset(item.captions) for item in data.train]
    binding_negatives = [
        negatives_for(data.train[owner].path.name, text, table, own[owner])
        for text, owner in zip(train.texts, train.owners)
    ]
    binding_texts = [[n.text for n in negatives] for negatives in binding_negatives]
    annotated = {(data.train[o].path.name, t) for t, o in zip(train.texts, train.owners)} & set(table)
    bank = _TextBank(clip, tokenizer, train.texts + [t for texts in binding_texts for t in texts])
    binding = [_by_kind(negatives, bank.index) for negatives in binding_negatives]
    draw = _KindDraw({n.kind for negatives in binding_negatives for n in negatives}, rng)
    rounds = -(-settings.steps // settings.eval_every)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.05)
    report = ItmTrainReport(
        out_dir=str(out_dir),
        clip_model=settings.clip.describe(),
        data={
            "annotations": str(annotations),
            "train_images": len(data.train),
            "train_captions": len(train.texts),
            "train_captions_with_binding_negatives": sum(1 for b in binding if b),
            "binding_negatives": _kinds(binding_negatives),
            "binding_negatives_from": {
                "annotations (sentences[].negatives)": len(annotated),
                "caption text (derived)": sum(1 for b in binding_negatives if b) - len(annotated),
            },
            "mined_negatives": f"dual encoder's top {settings.mine_top} images per caption and captions per image",
            "val_images": len(data.val),
            "val_source": data.val_source,
            "val_negative_trials": len(val_trials),
        },
        settings={
            **asdict(replace(settings, clip=None, init_from=None)),
            "clip": settings.clip.describe(),
            "init_from": str(settings.init_from) if settings.init_from else None,
        },
    )
    report.prepare_seconds = time.perf_counter() - began
    if progress:
        print(_sources_line(report.data), flush=True)
    stream = shuffled_batches(len(train.texts), settings.batch_size, rng)

    def batches(round_: int) -> Iterable[list[int]]:
        model.train()
        return (next(stream) for _ in range(_steps_in(round_, settings)))

    def step(batch: list[int]) -> Step:
        loss = _step_loss(model, train, bank, batch, neg_images, neg_texts, binding, draw, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        return Step(float(loss.detach()), len(batch))

    def judge(stats: EpochStats) -> Verdict:
        model.eval()
        done = min(stats.epoch * settings.eval_every, settings.steps)
        record = {"step": done, "loss": stats.mean_loss, "seconds": stats.seconds, "kind_loss": draw.means()}
        if data.val:
            record["val"] = _validate(model, clip, tokenizer, val, val_trials, settings.rerank_depth)
        report.curve.append(record)
        scores = record.get("val", {})
        # recall@1 decides; hard-negative accuracy breaks ties (300 captions give R@1 steps of 0.33 points)
        return Verdict(scores.get("rerank_r1", -stats.mean_loss) + 1e-3 * scores.get("hard_negatives", 0.0),
                       _curve_line(record))  # fmt: skip

    def keep(round_: int) -> None:
        report.best_step = min(round_ * settings.eval_every, settings.steps)
        report.best_r1 = report.curve[-1].get("val", {}).get("rerank_r1")
        save_itm(model, out_dir, half=settings.save_fp16)  # written at once: an interrupted run keeps it
        _judge_against_dual(report, out_dir)

    def write_report(_result: FitResult) -> None:
        report.seconds = time.perf_counter() - began
        report.cpu_seconds = time.process_time() - cpu_began
        report.write(out_dir / REPORT_FILE)

    if data.val:
        report.dual_r1 = _dual_r1(val)
    loop = EpochLoop(
        rounds, batches, step, judge, keep, lambda r: _steps_in(r, settings), write_report, label="validation round"
    )
    result = fit(loop, progress, patience=settings.patience if data.val else None)
    report.stopped = "interrupted" if result.interrupted else "patience" if result.stopped_early else "steps"
    write_report(result)
    if result.interrupted:
        raise KeyboardInterrupt  # the best step so far and its report are already written
    return report


def _trials(items, table) -> list:
    try:
        return negative_trials(items, table) if items else []
    except DatasetError:
        return []  # no caption relates two things and the annotations have none: recall alone validates


def _steps_in(round_: int, settings: ItmTrainSettings) -> int:
    return max(0, min(settings.eval_every, settings.steps - (round_ - 1) * settings.eval_every))


def _kinds(binding_negatives) -> dict[str, int]:
    counts: dict[str, int] = {}
    for negatives in binding_negatives:
        for negative in negatives:
            counts[negative.kind] = counts.get(negative.kind, 0) + 1
    return dict(sorted(counts.items()))


def _sources_line(data: dict[str, Any]) -> str:
    sources = ", ".join(f"{count:,} captions from {where}" for where, count in data["binding_negatives_from"].items())
    kinds = ", ".join(f"{kind} {count:,}" for kind, count in data["binding_negatives"].items()) or "none"
    return f"binding negatives: {sources} ({kinds}); mined negatives: {data['mined_negatives']}"


def _dual_r1(val: _Split) -> float:
    sims = val.text_vectors @ val.images.pooled.T
    return float(np.mean(sims.argmax(dim=1).numpy() == val.owners))


def _judge_against_dual(report: ItmTrainReport, out_dir: Path) -> None:
    """Record in the model folder whether the kept re-ranker beats the dual encoder on validation."""
    if report.dual_r1 is None or report.best_r1 is None:
        return
    report.worse_than_dual_encoder = report.best_r1 < report.dual_r1
    write_verdict(out_dir, report.best_r1, report.dual_r1, report.best_step)


def _encode_split(encoder: Any, items, settings: ItmTrainSettings) -> _Split:
    """Image tokens of every image and the CLIP vector of every caption, computed once (the towers are frozen)."""
    from clipsearch.lab.image_token_cache import cache_image_tokens

    images = cache_image_tokens(encoder.model, encoder.preprocess, [i.path for i in items], settings.workers)
    texts = [c for item in items for c in item.captions]
    owners = np.array([i for i, item in enumerate(items) for _ in item.captions], dtype=np.int64)
    text_vectors = torch.from_numpy(encoder.encode_texts(texts)) if texts else torch.zeros(0)
    return _Split(images, texts, owners, text_vectors)


def _mine(
    text_vectors: torch.Tensor, image_vectors: torch.Tensor, owners: np.ndarray, texts: list[str], top: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hard negatives by dual-encoder similarity: for each caption its ``top`` most similar images, and for each
    image its ``top`` most similar captions, leaving out pairs that are known to match: an image and any
    caption with the text of one of its own captions (ALBEF leaves out the same image id; with captions that
    name part of a scene, other images often make the same caption true)."""
    owners_of: dict[str, set[int]] = {}
    for text, owner in zip(texts, owners):
        owners_of.setdefault(text, set()).add(int(owner))
    matches = [owners_of[text] for text in texts]
    own_texts: dict[int, set[str]] = {}
    for text, owner in zip(texts, owners):
        own_texts.setdefault(int(owner), set()).add(text)
    neg_images = []
    for start in range(0, len(text_vectors), 1024):
        sims = text_vectors[start : start + 1024] @ image_vectors.T
        for row, candidates in enumerate(sims.topk(min(top * 2, sims.shape[1]), dim=1).indices.numpy()):
            known = matches[start + row]
            neg_images.append(np.array([c for c in candidates if int(c) not in known][:top]))
    neg_texts = []
    for start in range(0, len(image_vectors), 1024):
        sims = image_vectors[start : start + 1024] @ text_vectors.T
        for row, candidates in enumerate(sims.topk(min(top * 4, sims.shape[1]), dim=1).indices.numpy()):
            mine = own_texts.get(start + row, set())
            neg_texts.append(np.array([c for c in candidates if texts[c] not in mine][:top]))
    return neg_images, neg_texts


class _TextBank:
    """Token states of every caption and binding negative, computed once (the text tower is frozen):
    a step then costs only the fusion layers."""

    def __init__(self, clip: Any, tokenizer: Any, texts: list[str], batch_size: int = 1024):
        self.index = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        unique = list(self.index)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(unique), batch_size):
                parts.append(text_tokens(clip, tokenizer(unique[start : start + batch_size])))
        width = max(p.states.shape[1] for p in parts)
        self.states = torch.cat([F.pad(p.states, (0, 0, 0, width - p.states.shape[1])).half() for p in parts])
        self.mask = torch.cat([F.pad(p.mask, (0, width - p.mask.shape[1]), value=True) for p in parts])
        self.lengths = (~self.mask).sum(dim=1)

    def batch(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(ids)
        length = int(self.lengths[index].max())
        return self.states[index, :length].float(), self.mask[index, :length]


def _by_kind(negatives, index: dict[str, int]) -> dict[str, list[int]]:
    """A caption's binding negatives as text-bank ids grouped by kind: steps draw a kind first, then one of
    its phrasings, so a kind with several phrasings (two perpendicular relations) is not drawn more often than
    one with a single phrasing (shapes swapped)."""
    groups: dict[str, list[int]] = {}
    for negative in negatives:
        groups.setdefault(negative.kind, []).append(index[negative.text])
    return groups


class _KindDraw:
    """Which kinds of binding negative a step draws: in proportion to each kind's recent training loss (an
    exponential mean), with a floor so that no kind drops out. The kinds the model still confuses on this data
    (shapes swapped, on the scenes sets) get the steps; the ones it has learned are only kept up. Measured
    during the run on the user's own captions, not fixed in advance."""

    def __init__(self, kinds, rng: random.Random, decay: float = 0.95, floor: float = 0.2):
        self.loss = dict.fromkeys(kinds, 1.0)
        self.rng, self.decay, self.floor = rng, decay, floor

    def two(self, groups: dict[str, list[int]]) -> list[tuple[int, str]]:
        """Up to two (bank id, kind) of two different kinds of this caption's negatives."""
        kinds = list(groups)
        mean = sum(self.loss.values()) / max(len(self.loss), 1)
        picked = []
        while kinds and len(picked) < 2:
            weights = [self.loss[k] + self.floor * mean for k in kinds]
            kind = self.rng.choices(kinds, weights)[0]
            kinds.remove(kind)
            picked.append((self.rng.choice(groups[kind]), kind))
        return picked

    def means(self) -> dict[str, float]:
        """Each kind's recent training loss (the report's record of what the draw favoured)."""
        return {kind: round(loss, 4) for kind, loss in sorted(self.loss.items())}

    def learn(self, kinds: list[str | None], losses: torch.Tensor) -> None:
        """Fold this step's per-pair losses of binding negatives into each kind's mean (None: not one)."""
        by_kind: dict[str, list[float]] = {}
        for kind, loss in zip(kinds, losses.tolist()):
            if kind is not None:
                by_kind.setdefault(kind, []).append(loss)
        for kind, values in by_kind.items():
            self.loss[kind] = self.decay * self.loss[kind] + (1 - self.decay) * float(np.mean(values))


def _step_loss(model, train: _Split, bank: _TextBank, batch, neg_images, neg_texts, binding, draw, rng) -> torch.Tensor:
    """ITM cross-entropy on positives, negative images and captions (mined from the dual encoder's top M half
    the time, at random otherwise: ALBEF samples in-batch, which is mostly easy), and two binding negatives of
    two different kinds (``_KindDraw``), where the caption allows them."""
    n_images, n_texts = len(train.images.grid), len(train.texts)
    pos_images = [int(train.owners[t]) for t in batch]
    wrong_images = [
        int(rng.choice(neg_images[t])) if rng.random() < 0.5 and len(neg_images[t]) else _other(rng, n_images, i)
        for t, i in zip(batch, pos_images)
    ]
    wrong_texts = [int(rng.choice(neg_texts[i])) if rng.random() < 0.5 else rng.randrange(n_texts) for i in pos_images]
    texts = [bank.index[train.texts[t]] for t in batch]
    wrong = [bank.index[train.texts[t]] for t in wrong_texts]
    picked = [draw.two(binding[t]) for t in batch]
    first = [p[0] if p else (w, None) for p, w in zip(picked, wrong)]
    second = [p[1] if len(p) > 1 else (w, None) for p, w in zip(picked, wrong)]
    swapped = [text for text, _ in first + second]
    image_index = torch.tensor(pos_images + wrong_images + pos_images * 3)
    states, mask = bank.batch(texts + texts + wrong + swapped)
    labels = torch.tensor([1] * len(batch) + [0] * 4 * len(batch))
    logits = model(train.images.grid[image_index].float(), train.images.pooled[image_index], states, mask)
    losses = F.cross_entropy(logits, labels, reduction="none")
    draw.learn([kind for _, kind in first + second], losses[3 * len(batch) :].detach())
    return losses.mean()


def _other(rng: random.Random, n: int, not_this: int) -> int:
    pick = rng.randrange(n - 1)
    return pick + (pick >= not_this)


@torch.inference_mode()
def _validate(model, clip, tokenizer, val: _Split, trials, depth: int) -> dict[str, float]:
    """Recall@1 of the dual encoder alone and after re-ranking its top ``depth``; hard-negative accuracy."""
    sims = val.text_vectors @ val.images.pooled.T
    top = sims.topk(min(depth, sims.shape[1]), dim=1).indices
    hits_dual, hits_rerank = 0, 0
    for caption, candidates in enumerate(top):
        owner = int(val.owners[caption])
        scores = _itm(model, clip, tokenizer, val.images, candidates, [val.texts[caption]] * len(candidates))
        hits_dual += int(candidates[0]) == owner
        hits_rerank += int(candidates[int(np.argmax(scores))]) == owner
    result = {"dual_r1": hits_dual / len(top), "rerank_r1": hits_rerank / len(top)}
    if trials:

        def score(images, texts):
            return _itm(model, clip, tokenizer, val.images, torch.tensor(images), texts)

        accuracy = hard_negative_accuracy(trials, score)
        result["hard_negatives"] = accuracy.pop("all")
        result["hard_negative_kinds"] = accuracy
    return result


def _itm(model, clip, tokenizer, images: ImageTokens, index: torch.Tensor, texts: list[str]) -> np.ndarray:
    out = []
    for start in range(0, len(texts), 512):
        part = index[start : start + 512]
        text = text_tokens(clip, tokenizer(texts[start : start + 512]))
        out.append(model.match_probability(images.grid[part].float(), images.pooled[part], text.states, text.mask))
    return torch.cat(out).numpy()


def _curve_line(record: dict[str, Any]) -> str:
    line = f"step {record['step']}: loss {record['loss']:.4f}, {record['seconds']:.0f} s"
    val = record.get("val")
    if val:
        line += f"; val R@1 dual {100 * val['dual_r1']:.1f} → re-ranked {100 * val['rerank_r1']:.1f}"
        if "hard_negatives" in val:
            kinds = val.get("hard_negative_kinds", {})
            line += f", hard negatives {100 * val['hard_negatives']:.1f}"
            if kinds:
                line += " (" + ", ".join(f"{kind} {100 * value:.0f}" for kind, value in kinds.items()) + ")"
    return line
