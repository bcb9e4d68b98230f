"""The time budget of a run (``train.minutes``): the plan against hand-computed numbers on a fake
clock, the endless sampler a budget run draws from, and whole runs on phantoms whose steps are slowed
on purpose, so the budget, not the machine, sets how long they take."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from m4oe.config import ConfigError, TrainConfig
from m4oe.train.budget import CHECKPOINT_GUESS_S, VALIDATION_SPEEDUP, BudgetTooShort, TimeBudget
from m4oe.train.runtime import Runtime
from m4oe.train.schedule import lr_lambda

CPU = Runtime(torch.device("cpu"))


def budget(deadline=100.0, epochs=2, validates=(True, True), slices=0, provisional=30) -> TimeBudget:
    plan = TimeBudget(deadline, epochs, list(validates), slices, 4, 0.0, provisional, CPU)
    plan.run_start, plan.clock = 0.0, lambda: 0.0
    plan.start_epoch(0, 0, now=0.0)
    return plan


def test_before_the_speed_is_known_the_plan_is_the_provisional_one():
    plan = budget(provisional=30)
    assert (plan.total_steps, plan.epoch_end) == (60, 30)
    plan.look(10, now=1.0)  # one mark after the first steps: no speed yet
    assert (plan.total_steps, plan.epoch_end) == (60, 30)


def test_the_steps_fit_the_time_left_less_the_epochs_ends():
    plan = budget()
    plan.look(10, now=1.0)
    plan.look(20, now=2.0)  # 0.1 s per step
    # 100 s - 2 s now - two epoch ends of CHECKPOINT_GUESS_S (no validation slices): 94 s = 940 steps
    assert (CHECKPOINT_GUESS_S, VALIDATION_SPEEDUP) == (2.0, 3.0)  # the numbers below are computed with these
    assert plan.step_seconds == pytest.approx(0.1)
    assert plan.total_steps == 20 + 940
    assert plan.epoch_end == round(960 / 2)


def test_a_validation_is_estimated_from_its_slices_until_it_has_been_timed():
    plan = budget(slices=400)
    plan.look(10, now=1.0)
    plan.look(20, now=2.0)  # 0.1 s per step of 4 slices: 0.025 s per slice, a third of that per validation slice
    validation = CHECKPOINT_GUESS_S + 400 * 0.025 / 3
    assert plan.total_steps == 20 + int((100 - 2 - 2 * validation) / 0.1)


def test_a_machine_that_slows_down_gets_fewer_steps_and_a_refitted_schedule():
    plan = budget()
    plan.look(10, now=1.0)
    plan.look(20, now=2.0)
    plan.epoch_ended(True, 5.0)  # the first epoch's end (a validation) took 5 s
    plan.start_epoch(1, 480, now=50.0)
    assert plan.total_steps == 480 + int((100 - 50 - 5) / 0.1)  # the measured end, not the guess
    assert plan.epoch_end == plan.total_steps  # the last epoch takes all that is left
    plan.look(490, now=52.0)
    plan.look(500, now=54.0)  # now 0.2 s per step
    assert plan.total_steps == 500 + int((100 - 54 - 5) / 0.2)
    factor = plan.lr_factor(1.0, 0.0, "cosine")
    plan.clock = lambda: 54.0  # the clock's share (0.54) is behind the steps' (600 of 705): the steps decide
    assert factor(600) == pytest.approx(0.5 * (1 + math.cos(math.pi * 600 / 705)))
    assert factor(600) == lr_lambda(705, 0, 1.0, 0.0)(600)
    plan.clock = lambda: 90.0  # the machine crawled: 90 % of the time is spent at step 600, the clock decides
    assert factor(600) == pytest.approx(lr_lambda(int(600 / 0.9), 0, 1.0, 0.0)(600))
    plan.clock = lambda: 100.0
    assert factor(600) == pytest.approx(0.0)  # time is up: the floor


def test_no_time_left_still_gives_each_epoch_one_step():
    plan = budget(deadline=3.0)
    plan.look(10, now=1.0)
    plan.look(20, now=2.0)
    assert plan.total_steps == 20 and plan.epoch_done(20, now=2.0)  # over budget: the epoch ends now
    plan.start_epoch(1, 20, now=2.5)
    assert plan.epoch_end == 21  # an epoch always ends after at least one step


def test_the_clock_ends_an_epoch_whose_time_is_spent_before_its_steps():
    plan = budget(provisional=30)  # 100 s, two epochs each ending with a 2 s guess: 48 s for the first
    assert plan.epoch_deadline == pytest.approx((100 - 2 * CHECKPOINT_GUESS_S) / 2)
    assert not plan.epoch_done(5, now=10.0)
    assert plan.epoch_done(5, now=48.5)  # no speed measured yet (a machine slowed to a crawl): the clock decides
    assert not plan.epoch_done(0, now=99.0)  # never before one step
    plan.epoch_ended(True, 1.0)
    plan.start_epoch(1, 5, now=60.0)  # the last epoch: what is left, less its own end (the measured 1 s)
    assert plan.epoch_deadline == pytest.approx(100 - 1.0)


def test_an_epoch_too_short_to_measure_gives_the_speed_at_its_end():
    plan = budget()
    plan.look(10, now=1.0)  # one mark only
    plan.epoch_ended(True, 2.0, steps=12, step_time=3.0)
    assert plan.step_seconds == pytest.approx(0.25)


def test_minutes_must_be_positive():
    with pytest.raises(ConfigError, match="train.minutes must be a positive number"):
        TrainConfig(minutes=0)
    with pytest.raises(ConfigError, match="train.minutes must be a finite number"):
        TrainConfig(minutes=float("nan"))
    assert TrainConfig(minutes=None).minutes is None


def test_an_endless_epoch_continues_exactly_where_a_resume_starts_it(tmp_path):
    from m4oe.data.cache_format import synthetic_cache
    from m4oe.data.loader import ENDLESS_CHUNK, BalancedBatchSampler, SliceCache

    cache = SliceCache(synthetic_cache(tmp_path / "cache", slices=150, size=16))
    sampler = BalancedBatchSampler(cache, 4, samples_per_epoch=8, seed=3)
    sampler.endless = True
    sampler.set_epoch(2)
    whole = [b for _, b in zip(range(ENDLESS_CHUNK + 40), sampler, strict=False)]
    assert len(whole) == ENDLESS_CHUNK + 40  # runs past its nominal 2 batches and past one chunk
    sampler.set_epoch(2, start_batch=ENDLESS_CHUNK - 5)
    resumed = [b for _, b in zip(range(45), sampler, strict=False)]
    assert all(np.array_equal(a, b) for a, b in zip(resumed, whole[ENDLESS_CHUNK - 5 :], strict=True))
    sampler.endless = False  # a run without a budget: the epoch's fixed batches, as before
    sampler.set_epoch(2, start_batch=1)
    assert np.array_equal(np.stack(list(sampler)), sampler.epoch_batches(2)[1:])
    assert len(sampler.epoch_batches(2)) == 2


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from .data_helpers import make_dataset

    root = tmp_path_factory.mktemp("budget")
    make_dataset(root / "synthetic" / "BTCV", n=4)
    make_dataset(root / "synthetic" / "CHAOS", n=4, modality="MRI")
    return root, root / "cache"


def slowed(monkeypatch, extra_seconds):
    """Make every phase-2 step sleep ``extra_seconds(seconds since the first step)``; the steps taken
    with a sleep are counted."""
    from m4oe.train import finetune

    real, calls = finetune.segmentation_loss, {"slowed": 0, "first": None}

    def slow(*args, **kwargs):
        now = time.perf_counter()
        calls["first"] = calls["first"] or now
        extra = extra_seconds(now - calls["first"])
        calls["slowed"] += extra > 0
        time.sleep(extra)
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "segmentation_loss", slow)
    return calls


@pytest.mark.slow
def test_a_run_under_a_budget_ends_within_it_when_the_machine_slows_down(phantoms, monkeypatch):
    from m4oe.train.checkpoint import run_seconds
    from m4oe.train.finetune import run_train

    from .test_train import experiment

    workdir, cache_dir = phantoms
    minutes = 0.25  # 15 s
    exp = experiment(workdir, epochs=3, val_every=1, batch_size=2, minutes=minutes)
    run_train(experiment(workdir, epochs=1, samples_per_epoch=8, val_every=0), workdir / "warm", cache_dir,
              progress=False)  # the cache is prepared outside the timed run  # fmt: skip
    calls = slowed(monkeypatch, lambda seconds: 0.0 if seconds < 2 else 0.15)  # after 2 s, 0.15 s more per step
    started = time.perf_counter()
    history = run_train(exp, workdir / "budget", cache_dir, progress=False)["all"]
    elapsed = time.perf_counter() - started
    assert calls["slowed"] >= 3  # the slow-down happened inside the run, and the run went on
    # within the budget, up to how much the epochs' ends vary from their last measurement (a crowded CI
    # machine: 15.9 s of 15); before the clock's guard such runs took twice their budget
    assert run_seconds(workdir / "budget") <= 1.1 * minutes * 60
    assert elapsed <= 1.1 * minutes * 60 + 3.0  # + opening the cache and building the model, outside the run's clock
    assert run_seconds(workdir / "budget") >= 0.75 * minutes * 60  # the budget was used, not cut short
    assert [row["epoch"] for row in history.rows] == [1, 2, 3] and all("val_dice" in row for row in history.rows)
    lr = [row["lr"] for row in history.rows]
    assert lr[-1] < 0.02 * exp.training.lr < lr[0]  # the schedule reached its end with the run


@pytest.mark.slow
def test_phase_2_gets_what_the_phase_1_run_left_of_the_budget(phantoms, capsys):
    from m4oe.train.checkpoint import run_seconds
    from m4oe.train.finetune import run_train
    from m4oe.train.pretrain import run_pretrain

    from .test_train import experiment

    workdir, cache_dir = phantoms
    run_pretrain(experiment(workdir, pretrain_epochs=1, pretrain_samples_per_epoch=16), workdir / "pre", cache_dir,
                 progress=False)  # fmt: skip
    phase1 = run_seconds(workdir / "pre")
    assert phase1 > 0
    too_short = experiment(workdir, epochs=1, minutes=phase1 / 60 / 2)
    with pytest.raises(BudgetTooShort, match="the phase-1 run .* took longer"):
        run_train(too_short, workdir / "short", cache_dir, init=workdir / "pre", progress=False)
    assert not (workdir / "short").exists()  # refused before anything was written
    exp = experiment(workdir, epochs=1, val_every=0, minutes=(phase1 + 9) / 60)
    run_train(exp, workdir / "after", cache_dir, init=workdir / "pre", progress=False)
    assert "phase 2 gets 0.1" in capsys.readouterr().out  # 9 s
    assert 4.5 <= run_seconds(workdir / "after") <= 1.1 * 9.0
