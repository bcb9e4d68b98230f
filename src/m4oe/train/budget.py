"""A wall-clock budget for a run (``train.minutes``): the number of optimiser steps is fitted to the
time left, and fitted again every few steps while the run goes.

The run keeps its ``train.epochs`` validation points; how many steps each epoch gets is what the
budget decides. Every :data:`~m4oe.train.loop.LOOK_EVERY` steps the loop hands the budget the step
and the clock; the budget measures the seconds per step over the last :data:`WINDOW` steps, takes
off what the epochs' ends still cost (validations and checkpoints, measured once they have run, an
estimate before), and re-fits the total number of steps, each remaining epoch's end, and so the
learning-rate schedule of the remaining steps. A machine that slows down mid-run, or that other work
slows, still ends inside the budget.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
import torch.distributed as dist

from .runtime import Runtime
from .schedule import lr_lambda

MARGIN = 0.02  # of the budget kept back for what the estimate cannot see (the end of the command)
FIRST_STEPS = 5  # steps left out of the speed: memory and kernel set-up make the first ones slow
WINDOW = 200  # steps over which the speed is measured (a drift shows within a few hundred steps)
CHECKPOINT_GUESS_S = 2.0  # an epoch end without validation, until one has been timed
VALIDATION_SPEEDUP = 3.0  # a training slice costs about this many validation slices (measured 3x), until timed


class BudgetTooShort(ValueError):
    """The time left cannot hold one step per epoch and the epochs' ends."""


class TimeBudget:
    """The steps of a run that must end at ``deadline`` (a ``time.perf_counter()`` value).

    Args:
        deadline: when the run must be over.
        epochs: the run's epochs (its validation points).
        validates: per epoch, whether it ends with a validation.
        validation_slices: slices one validation runs through the model (its first cost estimate).
        batch_size: slices per step.
        warmup_epochs: the learning-rate warm-up, in epochs of the fitted length.
        provisional_steps: steps per epoch assumed until the speed has been measured.
        runtime: with several processes, the main one decides and the others follow.
    """

    def __init__(self, deadline: float, epochs: int, validates: list[bool], validation_slices: int,
                 batch_size: int, warmup_epochs: float, provisional_steps: int, runtime: Runtime) -> None:  # fmt: skip
        self.deadline, self.epochs, self.validates = deadline, epochs, validates
        self.validation_slices, self.batch_size, self.warmup_epochs = validation_slices, batch_size, warmup_epochs
        self.runtime = runtime
        self.total_steps = epochs * provisional_steps
        self.step_seconds: float | None = None
        self.end_seconds: dict[bool, float | None] = {True: None, False: None}  # with / without validation
        self.marks: deque[tuple[int, float]] = deque(maxlen=WINDOW // 10 + 1)
        self.epoch, self.epoch_start, self.epoch_end = 0, 0, provisional_steps
        # the clock's guard beside the steps: an epoch also ends when its share of the time is spent
        # (before the speed is measured, or when the machine slows between two looks)
        self.epoch_start_time, self.epoch_deadline = time.perf_counter(), math.inf
        self.run_start, self.clock = time.perf_counter(), time.perf_counter  # set by the loop (a clock for tests)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_epochs * self.total_steps / self.epochs)

    def lr_factor(self, base_lr: float, min_lr: float, schedule: str):
        """The scheduler's multiplier at a step, on the schedule as last fitted; where the clock is further
        on than the steps (a machine slower than its last measurement), the clock's share of the budget
        sets the decay, so the rate still reaches its floor when the time is up."""

        def factor(step: int) -> float:
            total, warmup = self.total_steps, self.warmup_steps
            share = self.time_share()
            if share > 0 and step > warmup:
                total = min(total, warmup + int((step - warmup) / share))
            return lr_lambda(total, warmup, base_lr, min_lr, schedule)(step)

        return factor

    def time_share(self) -> float:
        """The share of the run's time spent, 0 to 1."""
        if not math.isfinite(self.deadline) or self.deadline <= self.run_start:
            return 0.0
        return min(1.0, max(0.0, (self.clock() - self.run_start) / (self.deadline - self.run_start)))

    def start_epoch(self, epoch: int, step: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.epoch, self.epoch_start, self.epoch_start_time = epoch, step, now
        self.marks.clear()  # the time between epochs is not training speed
        self.refit(step, now)

    def look(self, step: int, now: float | None = None) -> None:
        """Note the clock at ``step`` and fit the remaining steps again."""
        now = time.perf_counter() if now is None else now
        if step >= FIRST_STEPS:
            self.marks.append((step, now))
        if len(self.marks) >= 2:
            (first, then), (last, latest) = self.marks[0], self.marks[-1]
            if last > first and latest > then:
                self.step_seconds = (latest - then) / (last - first)
        self.refit(step, now)

    def epoch_ended(self, validated: bool, seconds: float, steps: int = 0, step_time: float = 0.0) -> None:
        """The measured cost of an epoch's end (validation, history, checkpoint); ``steps`` taken in
        ``step_time`` seconds measure the speed when the epoch was too short to measure it."""
        self.end_seconds[validated] = seconds
        if self.step_seconds is None and steps > 0:
            self.step_seconds = step_time / steps

    def epoch_done(self, step: int, now: float | None = None) -> bool:
        """Whether the epoch ends before ``step``: its planned steps are done, or (one process) its
        share of the time is spent; never before one step."""
        if step <= self.epoch_start:
            return False
        if step >= self.epoch_end:
            return True
        if self.runtime.distributed:  # the processes agree on steps only (their clocks differ)
            return False
        return (time.perf_counter() if now is None else now) >= self.epoch_deadline

    def refit(self, step: int, now: float) -> None:
        ends = self._ends_left()
        epochs_left = self.epochs - self.epoch
        self.epoch_deadline = self.epoch_start_time + (self.deadline - ends - self.epoch_start_time) / epochs_left
        if self.step_seconds is not None:
            left = self.deadline - now - ends
            steps_left = max(0, int(left / self.step_seconds))
            self.total_steps = step + steps_left
            self.epoch_end = self.epoch_start + max(1, round((self.total_steps - self.epoch_start) / epochs_left))
        self._agree()

    def _ends_left(self) -> float:
        """Seconds the remaining epochs' ends should take."""
        seconds = 0.0
        for validates in self.validates[self.epoch :]:
            measured = self.end_seconds[validates]
            if measured is None:
                measured = CHECKPOINT_GUESS_S
                if validates and self.step_seconds is not None:
                    per_slice = self.step_seconds / self.batch_size
                    measured += self.validation_slices * per_slice / VALIDATION_SPEEDUP
            seconds += measured
        return seconds

    def _agree(self) -> None:
        """Every process takes the main one's plan (their clocks differ a little)."""
        if not self.runtime.distributed:
            return
        plan = torch.tensor([self.total_steps, self.epoch_end], dtype=torch.long, device=self.runtime.device)
        dist.broadcast(plan, src=0)
        self.total_steps, self.epoch_end = (int(v) for v in plan.tolist())

    def state(self) -> dict:
        return {"total_steps": self.total_steps, "epoch_end": self.epoch_end, "step_seconds": self.step_seconds,
                "end_seconds": [self.end_seconds[True], self.end_seconds[False]]}  # fmt: skip

    def load_state(self, state: dict) -> None:
        self.total_steps, self.epoch_end = state["total_steps"], state["epoch_end"]
        self.step_seconds = state["step_seconds"]
        self.end_seconds = {True: state["end_seconds"][0], False: state["end_seconds"][1]}


def check_fits(budget: TimeBudget, now: float | None = None) -> None:
    """Refuse a budget that has no time left for the run at all (before any step is taken)."""
    now = time.perf_counter() if now is None else now
    if budget.deadline - now <= 0:
        raise BudgetTooShort(
            f"train.minutes: the budget was spent {now - budget.deadline:.0f} s before this run could start "
            "(by the --init run, or by the run before a resume); give more minutes"
        )
