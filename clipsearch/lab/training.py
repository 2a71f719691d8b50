"""Contrastive training and fine-tuning of an open_clip model on captioned images (CLIP's recipe).

Symmetric InfoNCE with the model's learnable temperature, AdamW with linear warm-up then cosine decay, mixed
precision on CUDA, and exact gradient accumulation: with ``micro_batch_size`` below ``batch_size`` the features of
the whole batch are computed first without gradients, then each micro-batch is recomputed with gradients against
them, so the loss (and its negatives) is that of the full batch at the memory cost of one micro-batch.
After each epoch recall@k on the validation images decides which epoch's weights are kept.
The result is a ``local-dir:`` model folder plus ``train_report.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import platform
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.lab.epochs import EpochLoop, EpochStats, Step, Verdict, fit
from retrieval.errors import ModelLoadError, UsageError
from retrieval.model.build import build_model, save_model_dir
from retrieval.model.device import Device, resolve_device
from retrieval.model.spec import CONFIG_FILE, WEIGHTS_FILE, ModelSpec

REPORT_FILE = "train_report.json"
FINE_TUNE_LR = 1e-5
FROM_SCRATCH_LR = 5e-4
MAX_LOGIT_SCALE = math.log(100)


@dataclass(frozen=True)
class TrainSettings:
    """How to train. ``lr=None`` picks 1e-5 when fine-tuning and 5e-4 from scratch; ``warmup_steps=None`` is 5%
    of the optimizer steps; ``micro_batch_size`` below ``batch_size`` turns on gradient accumulation.
    ``from_scratch`` starts from seeded random weights of ``model``: an open_clip name, a ``local-dir:`` folder
    (its architecture only) or the path of a config JSON (bare open_clip model config or ``local-dir:`` layout)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    from_scratch: bool = False
    epochs: int = 5
    batch_size: int = 128
    micro_batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    grad_clip_norm: float | None = 1.0
    seed: int = 0
    device: Device | str = "auto"  # a string is resolved once, by train_model
    precision: str = "auto"
    workers: int = 0
    threads: int | None = None
    val_split: str = "val"
    max_val_images: int = 1000
    recall_ks: tuple[int, ...] = (1, 5, 10)
    save_fp16: bool = False
    max_steps: int | None = None
    overwrite: bool = False

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return FROM_SCRATCH_LR if self.from_scratch else FINE_TUNE_LR


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    learning_rate: float
    logit_scale: float
    images_per_second: float
    seconds: float
    val: dict[str, float] | None = None


@dataclass
class TrainReport:
    """What ``train_report.json`` holds: data, hyper-parameters, per-epoch loss and recall, the epoch kept."""

    out_dir: str
    data: dict[str, Any]
    start: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    initial_val: dict[str, float] | None = None
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def best_val(self) -> dict[str, float] | None:
        for record in self.epochs:
            if record.epoch == self.best_epoch:
                return record.val
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- the objective


def contrastive_loss(image_features: Any, text_features: Any, logit_scale: Any) -> Any:
    """Symmetric InfoNCE: row i of each side is the positive of row i of the other, every other row a negative."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to zero at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Any, lr: float, weight_decay: float) -> Any:
    """AdamW, CLIP's betas; no decay on gains, biases, norms and the temperature (as open_clip does)."""
    import torch

    def no_decay(name: str, param: Any) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


# ---------------------------------------------------------------------------------------------- the start model


@dataclass
class StartModel:
    model: Any
    preprocess: Any
    tokenizer: Any
    model_cfg: dict[str, Any]
    description: dict[str, Any]


def _read_config_json(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg) from an open_clip model config, bare or in the ``local-dir:`` layout."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read model config {path}: {error}") from None
    model_cfg = config.get("model_cfg", config)
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UsageError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    return model_cfg, config.get("preprocess_cfg", {})


def _scratch_config(settings: TrainSettings) -> tuple[dict[str, Any], dict[str, Any], str]:
    import open_clip

    spec = settings.model
    if spec.local_dir is not None:
        model_cfg, preprocess_cfg = _read_config_json(spec.local_dir / CONFIG_FILE)
        return model_cfg, preprocess_cfg, spec.name
    if spec.name.endswith(".json"):
        model_cfg, preprocess_cfg = _read_config_json(Path(spec.name).expanduser())
        return model_cfg, preprocess_cfg, spec.name
    model_cfg = open_clip.get_model_config(spec.name.replace("/", "-"))
    if model_cfg is None:
        raise ModelLoadError(f"unknown model {spec.name!r}: use an open_clip model name or a config JSON")
    return model_cfg, {}, spec.name


def load_start_model(settings: TrainSettings, device: Device) -> StartModel:
    """The model to train: random weights of a config (seeded), or a pretrained tag / checkpoint / folder."""
    import open_clip
    import torch

    if settings.from_scratch:
        model_cfg, preprocess_cfg, source = _scratch_config(settings)
        with tempfile.TemporaryDirectory() as folder:
            config = {"model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": preprocess_cfg}
            (Path(folder) / CONFIG_FILE).write_text(json.dumps(config))
            torch.manual_seed(settings.seed)
            spec = ModelSpec(f"local-dir:{folder}", None)
            logging.disable(logging.WARNING)  # open_clip warns that the folder has no weights: that is the point
            try:
                model, preprocess = build_model(spec, device=device.torch_name)
            finally:
                logging.disable(logging.NOTSET)
            tokenizer = open_clip.get_tokenizer(spec.name)
        return StartModel(model, preprocess, tokenizer, model_cfg, {"random_init": source, "seed": settings.seed})
    spec = settings.model
    if spec.name.endswith(".json"):
        raise UsageError(f"{spec.name} is a model config: pass --from-scratch to train it from random weights")
    model, preprocess = build_model(spec, device=device.torch_name)
    model_cfg = open_clip.get_model_config(spec.name if spec.local_dir else spec.name.replace("/", "-"))
    tokenizer = open_clip.get_tokenizer(spec.name)
    return StartModel(model, preprocess, tokenizer, copy.deepcopy(model_cfg), {"model": spec.describe()})


# ---------------------------------------------------------------------------------------------- one step


class StepRunner:
    """Forward, loss and backward for one batch, with autocast and exact accumulation over micro-batches."""

    def __init__(self, model: Any, device: Device, precision: str, micro_batch_size: int | None):
        import torch

        self.model = model
        self.device = device
        use_amp = device.is_cuda and precision in ("auto", "amp")
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.micro_batch_size = micro_batch_size

    def autocast(self) -> Any:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def features(self, pixels: Any, tokens: Any) -> tuple[Any, Any]:
        with self.autocast():
            image = self.model.encode_image(pixels, normalize=True)
            text = self.model.encode_text(tokens, normalize=True)
        return image.float(), text.float()

    def backward(self, pixels: Any, tokens: Any) -> float:
        """Accumulate the gradients of the batch's loss; return the loss."""
        import torch

        pixels = pixels.to(self.device.torch_name, non_blocking=True)
        tokens = tokens.to(self.device.torch_name, non_blocking=True)
        size = self.micro_batch_size or len(pixels)
        if size >= len(pixels):
            image, text = self.features(pixels, tokens)
            loss = contrastive_loss(image, text, self.model.logit_scale.exp())
            self._backward(loss)
            return float(loss.detach())
        bounds = [(start, min(start + size, len(pixels))) for start in range(0, len(pixels), size)]
        with torch.no_grad():
            cached = [self.features(pixels[a:b], tokens[a:b]) for a, b in bounds]
        all_images = torch.cat([image for image, _ in cached])
        all_texts = torch.cat([text for _, text in cached])
        for a, b in bounds:
            image, text = self.features(pixels[a:b], tokens[a:b])
            images = torch.cat([all_images[:a], image, all_images[b:]])
            texts = torch.cat([all_texts[:a], text, all_texts[b:]])
            loss = contrastive_loss(images, texts, self.model.logit_scale.exp())
            self._backward(loss)
        if self.model.logit_scale.grad is not None:  # every micro-batch added the temperature's full gradient
            self.model.logit_scale.grad /= len(bounds)
        return float(loss.detach())

    def _backward(self, loss: Any) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def optimizer_step(self, optimizer: Any, grad_clip_norm: float | None) -> None:
        import torch

        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


# ---------------------------------------------------------------------------------------------- validation


def evaluate_recall(
    model: Any,
    preprocess: Any,
    tokenizer: Any,
    items: Sequence[Any],
    device: Device,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    workers: int = 0,
    runner: StepRunner | None = None,
) -> dict[str, float]:
    """Text→image and image→text recall@k of ``model`` on captioned ``items`` (undecodable images left out)."""
    import torch

    from clipsearch.lab.metrics import recall_at_k
    from clipsearch.lab.train_data import image_loader

    was_training = model.training
    model.eval()
    autocast = runner.autocast if runner is not None else contextlib.nullcontext
    image_rows: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for indices, pixels in image_loader([item.path for item in items], preprocess, batch_size, workers):
            if pixels is None:
                continue
            with autocast():
                features = model.encode_image(pixels.to(device.torch_name), normalize=True)
            image_rows.update(zip(indices, features.float().cpu().numpy(), strict=True))
        kept = sorted(image_rows)
        captions = [(row, caption) for row, index in enumerate(kept) for caption in items[index].captions]
        text_chunks = []
        for start in range(0, len(captions), batch_size):
            tokens = tokenizer([caption for _, caption in captions[start : start + batch_size]]).to(device.torch_name)
            with autocast():
                text_chunks.append(model.encode_text(tokens, normalize=True).float().cpu().numpy())
    model.train(was_training)
    if not kept or not captions:
        return {}
    metrics = recall_at_k(
        np.concatenate(text_chunks), np.stack([image_rows[i] for i in kept]), [row for row, _ in captions], ks
    )
    return {key: float(value) for key, value in metrics.as_dict().items() if not key.startswith(("image_r", "text_r"))}


# ---------------------------------------------------------------------------------------------- the loop


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file, not a folder")
    if (out_dir / WEIGHTS_FILE).exists() and not overwrite:
        raise UsageError(f"{out_dir} already holds a model: choose another --out or pass --overwrite")


def save_trained_model(model: Any, model_cfg: dict[str, Any], out_dir: Path, fp16: bool = False) -> Path:
    """Write the ``local-dir:`` folder; with ``fp16`` the weights are stored in half precision (half the size)."""
    save_model_dir(model, model_cfg, out_dir, half=fp16)
    return out_dir


def _environment(device: Device) -> dict[str, Any]:
    import open_clip
    import torch

    return {
        "device": torch.cuda.get_device_name() if device.is_cuda else device.torch_name,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _score(val: dict[str, float] | None) -> float:
    """The number that picks the best epoch: rsum, the sum of all recall@k in both directions."""
    return float(val.get("rsum", float("-inf"))) if val else float("-inf")


def train_model(
    images_dir: Path,
    annotations: Path,
    out_dir: Path,
    settings: TrainSettings,
    progress: bool = True,
) -> TrainReport:
    """Train contrastively on the captioned images and write the best epoch's model to ``out_dir``."""
    import torch

    from clipsearch.lab.datasets import load_captioned_set
    from clipsearch.lab.train_data import CaptionPairs, split_train_val

    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, settings.overwrite)
    if settings.epochs < 1 or settings.batch_size < 2:
        raise UsageError("--epochs must be at least 1 and --batch-size at least 2")
    device = resolve_device(settings.device)  # the public entry: resolved here once
    if settings.threads:
        torch.set_num_threads(settings.threads)
    captioned = load_captioned_set(Path(annotations), Path(images_dir))
    data = split_train_val(captioned, settings.val_split, settings.seed, settings.max_val_images)

    torch.manual_seed(settings.seed)
    start = load_start_model(settings, device)
    model = start.model
    pairs = CaptionPairs(data.train, start.tokenizer, start.preprocess)
    steps_per_epoch = max(1, len(pairs) // settings.batch_size if len(pairs) >= settings.batch_size else 1)
    total_steps = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    warmup = settings.warmup_steps if settings.warmup_steps is not None else max(1, total_steps // 20)
    base_lr = settings.resolved_lr()
    optimizer = make_optimizer(model, base_lr, settings.weight_decay)
    runner = StepRunner(model, device, settings.precision, settings.micro_batch_size)

    report = TrainReport(
        out_dir=str(out_dir),
        data={
            "annotations": str(annotations),
            "images": str(images_dir),
            "format": captioned.source_format,
            "train_images": len(data.train),
            "train_captions": sum(len(item.captions) for item in data.train),
            "val_images": len(data.val),
            "val_source": data.val_source,
        },
        start=start.description,
        settings={
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
            "device": device.torch_name,
            "lr": base_lr,
            "warmup_steps": warmup,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "loss": "symmetric InfoNCE, learnable temperature",
            "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6), linear warm-up then cosine decay",
        },
        environment=_environment(device),
    )

    def validate() -> dict[str, float] | None:
        if not data.val:
            return None
        return evaluate_recall(
            model,
            start.preprocess,
            start.tokenizer,
            data.val,
            device,
            settings.recall_ks,
            workers=settings.workers,
            runner=runner,
        )

    state = _ClipLoop(settings, runner, optimizer, pairs, steps_per_epoch, total_steps, warmup, base_lr)

    def judge(stats: EpochStats) -> Verdict:
        record = EpochRecord(
            epoch=stats.epoch,
            train_loss=stats.mean_loss,
            learning_rate=optimizer.param_groups[0]["lr"],
            logit_scale=float(model.logit_scale.detach().exp()),
            images_per_second=stats.samples_per_second,
            seconds=stats.seconds,
            val=validate(),
        )
        report.epochs.append(record)
        return Verdict(_score(record.val), _epoch_line(record))

    def keep(epoch: int) -> None:
        report.best_epoch = epoch
        state.best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    began = time.perf_counter()
    report.initial_val = validate()
    model.train()
    loop = EpochLoop(settings.epochs, state.batches, state.step, judge, keep, state.steps_in, rate_label="img_s")
    result = fit(loop, progress, baseline=_score(report.initial_val) if report.initial_val else None)
    report.interrupted = result.interrupted
    if state.best is not None:
        model.load_state_dict(state.best)
    model.eval()
    report.seconds = time.perf_counter() - began
    save_trained_model(model, start.model_cfg, out_dir, fp16=settings.save_fp16)
    report.write(out_dir / REPORT_FILE)
    if report.interrupted:
        raise KeyboardInterrupt
    return report


@dataclass
class _ClipLoop:
    """CLIP training's part of the epoch skeleton (``clipsearch.lab.epochs``): batches within the step budget, one
    optimiser step each on the learning-rate schedule."""

    settings: TrainSettings
    runner: StepRunner
    optimizer: Any
    pairs: Any
    steps_per_epoch: int
    total_steps: int
    warmup: int
    base_lr: float
    step_count: int = 0
    best: dict[str, Any] | None = None  # the kept epoch's weights, on the CPU

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - self.step_count)

    def batches(self, epoch: int) -> Iterable[Any]:
        from clipsearch.lab.train_data import pair_loader

        s = self.settings
        for batch in pair_loader(self.pairs, s.batch_size, s.seed, epoch, s.workers):
            if self.step_count >= self.total_steps:
                return
            yield batch

    def step(self, batch: Any) -> Step | None:
        if batch is None:  # nothing in it could be decoded
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step_count, self.total_steps, self.warmup, self.base_lr)
        loss = self.runner.backward(*batch)
        self.runner.optimizer_step(self.optimizer, self.settings.grad_clip_norm)
        self.step_count += 1
        return Step(loss, len(batch[0]))


def _epoch_line(record: EpochRecord) -> str:
    line = (
        f"epoch {record.epoch}: loss {record.train_loss:.4f}, {record.images_per_second:.0f} images/s, "
        f"temperature 1/{record.logit_scale:.1f}"
    )
    if record.val:
        t2i = ", ".join(f"R@{k} {100 * record.val[f'text_to_image_recall@{k}']:.1f}" for k in _ks(record.val))
        line += f"; val text→image {t2i}"
    return line


def _ks(val: dict[str, float]) -> list[int]:
    return sorted(int(key.split("@")[1]) for key in val if key.startswith("text_to_image_recall@"))
