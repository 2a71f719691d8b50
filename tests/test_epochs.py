"""The epoch skeleton both trainers run on (clipsearch.lab.epochs): the best epoch is kept, patience stops a run
that stopped improving (or lets the trainer change course first), a best epoch below the untrained score is said,
Ctrl-C keeps what was kept; and the learning rate that holds until validation stalls."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from clipsearch.lab.epochs import EpochLoop, EpochStats, PlateauSchedule, Step, Verdict, fit


def scripted(scores: list[float], interrupt_at: int | None = None, steps: int = 3):
    """A loop whose epochs score ``scores`` in turn; ``kept`` records which epochs' weights were kept."""
    kept: list[int] = []
    seen: list[EpochStats] = []

    def batches(epoch: int):
        if epoch == interrupt_at:
            raise KeyboardInterrupt
        return [[1, 2], None, [3, 4, 5]][:steps]

    def judge(stats: EpochStats) -> Verdict:
        seen.append(stats)
        return Verdict(scores[stats.epoch - 1], f"epoch {stats.epoch}")

    def step(batch):
        return None if batch is None else Step(loss=float(len(batch)), samples=len(batch))

    loop = EpochLoop(len(scores), batches, step, judge, kept.append, lambda _: steps)
    return loop, kept, seen


def test_the_best_epoch_is_kept_and_each_epoch_is_measured():
    loop, kept, seen = scripted([0.2, 0.5, 0.4])
    result = fit(loop, progress=False)
    assert (result.best_epoch, result.best_score, result.epochs_run) == (2, 0.5, 3)
    assert kept == [1, 2] and not result.stopped_early
    assert (seen[0].losses, seen[0].samples, seen[0].mean_loss) == ([2.0, 3.0], 5, 2.5)  # the None batch skipped


def test_patience_stops_once_validation_has_not_improved_for_that_many_epochs():
    loop, kept, _ = scripted([0.3, 0.6, 0.5, 0.55, 0.9, 1.0])
    result = fit(loop, progress=False, patience=2)
    assert (result.best_epoch, result.epochs_run, result.stopped_early) == (2, 4, True)
    assert fit(scripted([0.3, 0.6, 0.5, 0.55, 0.9, 1.0])[0], progress=False).best_epoch == 6  # off by default


def test_a_trainer_that_changes_course_when_patience_runs_out_gets_patience_afresh():
    loop, kept, _ = scripted([0.3, 0.6, 0.5, 0.55, 0.7, 0.65, 0.6, 0.8])
    changes: list[int] = []

    def stalled() -> bool:  # a trainer with one cut of its learning rate
        changes.append(len(changes))
        return len(changes) == 1

    result = fit(replace(loop, stalled=stalled), progress=False, patience=2)
    # epoch 4: two without a better score, the trainer changes course; epoch 5 is better; 6 and 7 are not, it stops
    assert (result.best_epoch, result.epochs_run, result.stopped_early, changes) == (5, 7, True, [0, 1])
    assert kept == [1, 2, 5]


def test_the_learning_rate_warms_up_then_holds_until_it_is_cut():
    optimizer = SimpleNamespace(param_groups=[{"lr": 1.0}, {"lr": 1.0}])  # what the schedule sets: each group's rate
    schedule = PlateauSchedule(optimizer, 0.01, warmup=4)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(6):
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01])
    schedule.cut(0.2)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.002, 0.002])


def test_a_best_epoch_below_the_untrained_score_is_said():
    assert fit(scripted([0.2, 0.3])[0], progress=False, baseline=0.4).worse_than_baseline
    assert not fit(scripted([0.2, 0.5])[0], progress=False, baseline=0.4).worse_than_baseline


def test_ctrl_c_keeps_the_kept_epoch_and_before_any_is_raised():
    result = fit(scripted([0.2, 0.5, 0.4], interrupt_at=3)[0], progress=False)
    assert (result.interrupted, result.best_epoch) == (True, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(scripted([0.2], interrupt_at=1)[0], progress=False)


def test_an_epoch_with_no_steps_left_ends_the_run():
    loop, kept, _ = scripted([0.1, 0.2], steps=0)
    assert fit(loop, progress=False).epochs_run == 0 and kept == []
