"""The epoch skeleton both trainers share: train an epoch with a progress bar, validate, keep the best epoch,
report; optionally stop once validation has not improved for ``patience`` epochs.

A trainer supplies an ``EpochLoop``: its batches, its optimiser step, how an epoch is judged (validation, the
report's record, the printed line, the score that picks the best epoch) and how the best weights are kept. ``fit``
does the rest and says what happened (``FitResult``): which epoch was kept, whether it beat the score before
training (``baseline``), whether patience or a Ctrl-C ended the run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Step:
    """One optimiser step: its loss and how many samples it saw."""

    loss: float
    samples: int


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    losses: list[float]
    samples: int
    seconds: float

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else math.nan

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(1e-9, self.seconds)


@dataclass(frozen=True)
class Verdict:
    """How an epoch did: the score that picks the best epoch (higher is better) and the line printed for it."""

    score: float
    line: str


def _nothing(_result: FitResult) -> None:
    return None


@dataclass(frozen=True)
class EpochLoop:
    """What a trainer supplies to ``fit``."""

    epochs: int
    batches: Callable[[int], Iterable[Any]]  # epoch -> its batches (the trainer stops them at a step budget)
    step: Callable[[Any], Step | None]  # one optimiser step on a batch; None: the batch was skipped
    judge: Callable[[EpochStats], Verdict]  # validate, record the epoch in the report, score it
    keep: Callable[[int], None]  # this epoch is the best so far: keep its weights
    steps_in: Callable[[int], int]  # the steps epoch e will take (its bar's length); 0: the budget is spent
    after_epoch: Callable[[FitResult], None] = _nothing  # once the best is kept: e.g. write the report
    rate_label: str | None = None  # progress bar: samples per second under this name (None: not shown)
    label: str = "epoch"  # progress bar: what one pass of ``fit`` is called ("validation round" for step-based runs)
    stalled: Callable[[], bool] | None = None  # patience ran out: True if the trainer changed course (e.g. cut its
    # learning rate and went back to the best weights) and the run goes on, its patience counted afresh; None: stop


@dataclass
class FitResult:
    best_epoch: int | None = None
    best_score: float = -math.inf
    epochs_run: int = 0
    baseline: float | None = None  # the score before training, when the trainer measured one
    stopped_early: bool = False  # ``patience`` epochs passed without a better score
    interrupted: bool = False  # Ctrl-C after at least one epoch was kept
    history: list[float] = field(default_factory=list)  # every epoch's score

    @property
    def worse_than_baseline(self) -> bool:
        """The kept epoch scores below the model before training (worth saying: training did not help)."""
        return self.baseline is not None and self.best_epoch is not None and self.best_score < self.baseline


def fit(loop: EpochLoop, progress: bool = True, patience: int | None = None, baseline: float | None = None):
    """Run ``loop``'s epochs. ``patience``: stop after that many epochs without a better score (None: run all).
    A Ctrl-C before any epoch was kept is raised; after, the result says ``interrupted`` and the caller saves."""
    result = FitResult(baseline=baseline)
    restarted = 0  # the epoch at which the trainer last changed course: patience counts from it or the best epoch
    try:
        for epoch in range(1, loop.epochs + 1):
            steps = loop.steps_in(epoch)
            if steps <= 0:
                break
            verdict = loop.judge(_train_epoch(loop, epoch, steps, progress))
            if progress:
                print(verdict.line, flush=True)
            result.epochs_run = epoch
            result.history.append(verdict.score)
            if result.best_epoch is None or verdict.score > result.best_score:
                result.best_epoch, result.best_score = epoch, verdict.score
                loop.keep(epoch)
            loop.after_epoch(result)
            if patience is not None and epoch - max(result.best_epoch, restarted) >= patience:
                if loop.stalled is not None and loop.stalled():
                    restarted = epoch
                    continue
                result.stopped_early = True
                break
    except KeyboardInterrupt:
        if result.best_epoch is None:
            raise
        result.interrupted = True
    return result


def shuffled_batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Batches of sample indices forever, for trainers that count steps: each pass over the ``n`` samples in a new
    order, whole batches only."""
    size = min(batch_size, n)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


class PlateauSchedule:
    """A learning rate that warms up linearly to ``lr`` over ``warmup`` steps, then holds until the trainer cuts it
    (``cut``) because validation stopped improving: how long to learn at the full rate is read from the run's own
    validation curve, not fixed by a step budget (a one-cycle schedule anneals on time, learning or not). Steps
    like a torch scheduler (``step()`` after each optimiser step)."""

    def __init__(self, optimizer: Any, lr: float, warmup: int) -> None:
        self.optimizer, self.lr, self.warmup, self.steps = optimizer, lr, max(1, warmup), 0
        self._apply()

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def cut(self, factor: float) -> None:
        self.lr *= factor
        self._apply()

    def _apply(self) -> None:
        rate = self.lr * min(1.0, (self.steps + 1) / self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = rate


def optimiser_step(model: Any, optimizer: Any, schedule: Any, loss: Any, samples: int, clip_norm: float = 1.0) -> Step:
    """Backpropagate ``loss``, clip the gradient norm, step the optimiser and its schedule."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    schedule.step()
    return Step(float(loss.detach()), samples)


def _train_epoch(loop: EpochLoop, epoch: int, steps: int, progress: bool) -> EpochStats:
    from tqdm import tqdm

    began, losses, samples = time.perf_counter(), [], 0
    bar = tqdm(total=steps, desc=f"{loop.label} {epoch}/{loop.epochs}", unit="step", disable=not progress, leave=True)
    for batch in loop.batches(epoch):
        done = loop.step(batch)
        if done is None:
            continue
        losses.append(done.loss)
        samples += done.samples
        postfix = {"loss": f"{done.loss:.3f}"}
        if loop.rate_label:
            postfix[loop.rate_label] = f"{samples / max(1e-9, time.perf_counter() - began):.0f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update()
    bar.close()
    return EpochStats(epoch, losses, samples, time.perf_counter() - began)
