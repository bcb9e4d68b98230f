"""The training loop shared by both phases, composed of small parts.

A *task* (phase-1 MAE or phase-2 segmentation) supplies the module to optimise, the loss of a batch
and, optionally, a validation. :func:`fit` does the rest, with the parts of the modules beside it:

* :mod:`.runtime`: one process on CPU or GPU, or several through ``torchrun`` (DistributedDataParallel):
  each process takes its share of every global batch, so the same command and config give the same
  training whatever the number of processes;
* :mod:`.schedule`: fused AdamW (or SGD), linear warm-up + cosine (or poly) learning rate per step;
* :mod:`.checkpoint`: ``RUN/last`` (bundle + optimiser, scheduler, position, RNG states) and ``RUN/best``
  written atomically; ``resume`` continues a killed run exactly where its last checkpoint left it;
* :mod:`.history`: ``metrics.csv``, ``curve.png``, ``organ_dice.csv`` and a progress bar;
* here: bf16 autocast on CUDA, optional ``torch.compile``, gradient clipping, and a non-finite loss
  stopping the run with a message naming the step, keeping the last good checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..config import TrainConfig
from ..data.augment import AugmentConfig, augment_batch
from ..data.loader import BalancedBatchSampler, SliceCache, make_loader
from ..files import write_json
from ..model.base import SegmentationModel
from .budget import MARGIN, TimeBudget, check_fits
from .checkpoint import RESUME_KEYS, STATE_FILE, RunExists, load_train_state, remove_stale_temporaries, save_checkpoint
from .history import History, progress_bar, record_organ_dice
from .runtime import Runtime, all_mean, autocast_factory, barrier, gather_state, setup_runtime
from .schedule import build_optimizer, build_scheduler, lr_lambda

__all__ = ["STATE_FILE", "History", "RunExists", "Runtime", "Task", "TrainingDiverged", "fit",
           "freeze_unused_gates", "lr_lambda", "record_organ_dice", "remove_stale_temporaries",
           "setup_runtime"]  # fmt: skip


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


LOOK_EVERY = 10  # steps between read-backs of the loss (for the divergence check and the progress bar)


class Divergence:
    """Notes the first non-finite loss on the device; :meth:`check` reads it back and raises.

    Reading the loss every step (``loss.item()``) would make the CPU wait for the GPU at every step,
    so the loop only looks every ``LOOK_EVERY`` steps and before writing any checkpoint: the error
    still names the first bad step, and no checkpoint holds weights updated from it.
    """

    def __init__(self, device: torch.device) -> None:
        never = torch.tensor(-1, device=device)
        self.step, self.epoch, self.batch, self.loss = never, never, never, never.double()

    def note(self, loss: Tensor, step: int, epoch: int, batch: int) -> None:
        new = (self.step < 0) & ~torch.isfinite(loss)
        # Python numbers go into the kernels as arguments: no host-to-device copy, which would sync
        self.step, self.epoch = torch.where(new, step, self.step), torch.where(new, epoch, self.epoch)
        self.batch, self.loss = torch.where(new, batch, self.batch), torch.where(new, loss.double(), self.loss)

    def check(self, out: Path) -> None:
        step, epoch, batch, loss = torch.stack([self.step, self.epoch, self.batch, self.loss]).tolist()
        if step >= 0:
            raise TrainingDiverged(
                f"non-finite loss ({loss}) at step {int(step)} (epoch {int(epoch) + 1}, batch {int(batch)}); "
                f"the last good checkpoint is kept in {out / 'last'}"
            )


class Task(Protocol):
    """What a training phase provides to :func:`fit`."""

    model: SegmentationModel  # saved as the bundle
    module: nn.Module  # optimised (may wrap ``model``)
    name: str

    def loss(self, batch: dict[str, Tensor], module: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a batch computed through ``module`` (``self.module``, maybe DDP-wrapped or compiled)."""
        ...

    def validate(self, autocast) -> dict | None: ...

    def bundle_extra(self) -> dict[str, Any]: ...


def freeze_unused_gates(model: SegmentationModel, routing: str) -> None:
    """Without soft routing the gates get no gradient: freeze them (DDP needs every trained
    parameter to be used)."""
    gates = model.gate_parameter_names()
    for name, param in model.named_parameters():
        if name in gates:
            param.requires_grad_(routing == "soft")


@dataclass
class Position:
    """Where a run is: the optimiser step, the epoch and batch it starts from, the sums, slices and
    seconds of the epoch so far (those before an interruption included), and its history."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)
    seen: int = 0
    seconds: float = 0.0
    history: History = field(default_factory=History)
    spent: float = 0.0  # seconds the run's commands took before this one


def fit(
    task: Task,
    cache: SliceCache,
    config: TrainConfig,
    out: Path,
    runtime: Runtime,
    epochs: int,
    lr: float,
    sampler_mask,
    dataset_weights: list[float] | None = None,
    resume: bool = False,
    validate: bool = True,
    progress: bool = True,
    stop_at_step: int | None = None,
    samples_per_epoch: int | None = None,
    budget_seconds: float | None = None,
    clock: float | None = None,
) -> History:
    """Train ``task.module`` on batches from ``cache``; see the module docstring.

    ``dataset_weights`` (in the cache's dataset order) sets how often each dataset is drawn
    (default: balanced). ``samples_per_epoch`` is the epoch size (default the config's). With
    ``budget_seconds`` the epochs' lengths are fitted so that the run, counted from ``clock`` (a
    ``time.perf_counter()`` value, default now) and with the seconds its earlier commands took before a
    resume, ends within that many seconds (:mod:`.budget`). ``stop_at_step`` interrupts the run just
    before that step (as a kill would), for tests.
    """
    command_started = time.perf_counter() if clock is None else clock
    _start_folder(out, resume, runtime)
    torch.manual_seed(config.seed + runtime.rank)
    module = task.module.to(runtime.device)
    sampler = _sampler(cache, config, sampler_mask, dataset_weights, runtime, samples_per_epoch)
    steps_per_epoch = len(sampler)
    params = [p for p in module.parameters() if p.requires_grad]
    # a task may exempt parameters from weight decay (add-modality keeps frozen slices bit-exact)
    optimizer = build_optimizer(params, getattr(task, "no_weight_decay", lambda: [])(), config, lr, runtime.device)
    budget, spent = None, 0.0
    if budget_seconds is not None:
        budget = _budget(task, config, epochs, steps_per_epoch, validate, runtime)
        sampler.endless = True
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.lr_factor(lr, config.min_lr, config.schedule))
    else:
        scheduler = build_scheduler(optimizer, config, lr, epochs * steps_per_epoch, steps_per_epoch)
    generator = torch.Generator(device=runtime.device).manual_seed(config.seed * 1000 + runtime.rank)
    position = Position()
    if resume:
        position = _resume(out, config, module, optimizer, scheduler, generator, runtime, budget)
        spent = position.spent
    if budget is not None:
        budget.deadline = command_started + budget_seconds * (1 - MARGIN) - spent
        budget.run_start = command_started - spent
        check_fits(budget)
        if resume and position.batch:  # the interrupted epoch goes on with its share of the time left
            budget.epoch_start_time = time.perf_counter()
            budget.refit(position.step, budget.epoch_start_time)
    loss_module = _wrap(module, config, runtime)
    autocast = autocast_factory(runtime.device, config.amp)
    augment = AugmentConfig(robust_prob=config.robust_augment) if config.augment else None
    pin_memory, context = runtime.device.type == "cuda", task.model.config.slice_context
    loader = make_loader(cache, sampler, workers=config.workers, pin_memory=pin_memory, context=context)
    divergence = Divergence(runtime.device)
    history = position.history

    def checkpoint(epoch: int, batch: int, sums: dict[str, Tensor], seen: int, started: float) -> None:
        divergence.check(out)  # never save weights that a non-finite loss has touched
        state = {
            "module": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": position.step,
            "epoch": epoch,
            "batch": batch,
            "epoch_sums": {k: float(v) for k, v in sums.items()} if batch else {},
            "epoch_progress": [seen, time.perf_counter() - started] if batch else [0, 0.0],
            "history": history.rows,
            "config": {k: getattr(config, k) for k in RESUME_KEYS},
            "spent": spent + time.perf_counter() - command_started,
            "budget": budget.state() if budget is not None else None,
            "best": history.best,
            "rng": gather_state(torch.get_rng_state(), runtime),
            "generator": gather_state(generator.get_state().cpu(), runtime),
        }
        if runtime.main:
            save_checkpoint(out, "last", task, state)
        barrier(runtime)

    for epoch in range(position.epoch, epochs):
        resumed = epoch == position.epoch
        sampler.set_epoch(epoch, position.batch if resumed else 0)
        first_batch = sampler.start_batch
        module.train()
        sums = dict(position.sums) if resumed else {}
        seen, started = 0, time.perf_counter()
        if resumed:  # the slices and time of the epoch before an interruption count too
            seen, started = position.seen, started - position.seconds
        label = f"{task.name} {epoch + 1}/{epochs}"
        if budget is not None and not (resumed and position.batch):
            budget.start_epoch(epoch, position.step)
        planned = steps_per_epoch if budget is None else budget.epoch_end - budget.epoch_start
        bar = progress_bar(planned - first_batch, label, progress and runtime.main)
        done = first_batch  # the epoch's steps, those before an interruption included
        loop_started = time.perf_counter()
        for batch_index, batch in enumerate(loader, start=first_batch):
            if stop_at_step is not None and position.step >= stop_at_step:
                raise KeyboardInterrupt(f"stopped before step {position.step} (stop_at_step)")
            if hasattr(task, "set_progress"):  # a routing curriculum or a decaying loss follows the run
                total = budget.total_steps if budget is not None else epochs * steps_per_epoch
                task.set_progress(min(1.0, position.step / max(1, total)))
            batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
            if augment is not None:
                batch["image"], batch["label"] = augment_batch(batch["image"], batch["label"], augment, generator)
            with autocast():
                loss, logs = task.loss(batch, loss_module)
            divergence.note(loss.detach(), position.step, epoch, batch_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            position.step += 1
            done += 1
            seen += config.batch_size
            for key, value in {"loss": loss.detach(), **logs}.items():
                sums[key] = sums.get(key, 0) + value.float()
            bar.update()
            if position.step % LOOK_EVERY == 0:  # the one read-back of the loss every LOOK_EVERY steps
                divergence.check(out)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", sps=f"{seen / (time.perf_counter() - started):.0f}")
                if budget is not None:
                    budget.look(position.step)
                    bar.total = budget.epoch_end - budget.epoch_start
            ends = budget.epoch_done(position.step) if budget is not None else done >= steps_per_epoch
            if config.checkpoint_every and position.step % config.checkpoint_every == 0 and not ends:
                checkpoint(epoch, done, sums, seen, started)
            if ends and budget is not None:
                break
        bar.close()
        divergence.check(out)
        ended = time.perf_counter()
        seconds = ended - started
        row: dict[str, Any] = {"epoch": epoch + 1, "step": position.step}
        row.update({k: round(float(all_mean(v, runtime)) / done, 6) for k, v in sums.items()})
        row.update(
            lr=scheduler.get_last_lr()[0], slices_per_s=round(seen / seconds, 1), epoch_seconds=round(seconds, 2)
        )
        validates = _validates(validate, config, epoch, epochs)
        if validates:
            _validate(task, autocast, out, epoch, row, history, runtime)
        history.rows.append(row)
        if runtime.main:
            history.write(out)
        checkpoint(epoch + 1, 0, sums, seen, started)
        if budget is not None:
            budget.epoch_ended(validates, time.perf_counter() - ended, done - first_batch, ended - loop_started)
    return history


def _validates(validate: bool, config: TrainConfig, epoch: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` (from 0) ends with a validation."""
    return bool(validate and config.val_every and ((epoch + 1) % config.val_every == 0 or epoch + 1 == epochs))


def _budget(task: Task, config: TrainConfig, epochs: int, steps_per_epoch: int, validate: bool,
            runtime: Runtime) -> TimeBudget:  # fmt: skip
    """The time budget of a run (its deadline is set once a resume has said what was spent)."""
    validates = [_validates(validate, config, epoch, epochs) for epoch in range(epochs)]
    slices = getattr(task, "validation_slices", lambda: 0)()
    provisional = max(steps_per_epoch, 3 * LOOK_EVERY)  # the speed is measured before the first epoch ends
    return TimeBudget(math.inf, epochs, validates, slices, config.batch_size, config.warmup_epochs, provisional,
                      runtime)  # fmt: skip


def _start_folder(out: Path, resume: bool, runtime: Runtime) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "last").exists():
        raise RunExists(
            f"{out} already holds a run (its last/ checkpoint): pass --resume to continue it, or choose another -o"
        )
    if runtime.main:
        remove_stale_temporaries(out)


def _sampler(cache: SliceCache, config: TrainConfig, mask, dataset_weights, runtime: Runtime,
             samples_per_epoch: int | None = None) -> BalancedBatchSampler:  # fmt: skip
    """The run's batches; each process takes its share of each global batch."""
    if config.batch_size % runtime.world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {runtime.world} processes")
    sampler = BalancedBatchSampler(
        cache,
        config.batch_size,
        mask=mask,
        dataset_weights=dataset_weights,
        samples_per_epoch=samples_per_epoch or config.samples_per_epoch,
        foreground_fraction=config.foreground_fraction,
        foreground_sampling=config.foreground_sampling,
        seed=config.seed,
    )
    sampler.shard(runtime.rank, runtime.world)
    return sampler


def _resume(out: Path, config: TrainConfig, module, optimizer, scheduler, generator, runtime: Runtime,
            budget: TimeBudget | None) -> Position:  # fmt: skip
    """Load the checkpoint of ``out`` into the module, optimiser, scheduler, RNGs and time budget;
    where it stopped."""
    state = load_train_state(out)
    for key in RESUME_KEYS:
        if state["config"].get(key) != getattr(config, key):
            raise ValueError(f"cannot resume {out}: train.{key} changed from {state['config'].get(key)}")
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    seen, seconds = state.get("epoch_progress", [0, 0.0])
    position = Position(
        step=state["step"], epoch=state["epoch"], batch=state["batch"],
        sums={k: torch.tensor(v, device=runtime.device) for k, v in state["epoch_sums"].items()},
        seen=seen, seconds=seconds, history=History(state["history"], state["best"]), spent=state.get("spent", 0.0),
    )  # fmt: skip
    if budget is not None and state.get("budget"):
        budget.load_state(state["budget"])
        budget.epoch, budget.epoch_start = position.epoch, position.step - position.batch
    torch.set_rng_state(state["rng"][runtime.rank])
    generator.set_state(state["generator"][runtime.rank])
    return position


def _wrap(module: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """The module the loss runs through: DDP-wrapped across processes, compiled where asked."""
    train_module: nn.Module = module
    if runtime.distributed:
        ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        train_module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    use_compile = config.compile == "on" or (config.compile == "auto" and runtime.device.type == "cuda")
    return torch.compile(train_module) if use_compile else train_module


def _validate(task: Task, autocast, out: Path, epoch: int, row: dict, history: History, runtime: Runtime) -> None:
    """Validate on the main process: the epoch's row, validation.json, organ_dice.csv, a new best bundle."""
    result = task.validate(autocast) if runtime.main else None
    if result is not None:
        row["val_dice"] = round(result["mean_dice"], 5)
        row.update({f"val_dice_{k}": round(v, 5) for k, v in result["dataset_mean_dice"].items()})
        post = result.get("dataset_mean_dice_postprocessed", {})
        row.update({f"val_post_{k}": round(v, 5) for k, v in post.items()})
        specialisation = result.get("routing", {}).get("specialisation", math.nan)
        if not math.isnan(specialisation):  # 0: every modality the same expert mixture, 1: each its own expert
            row["val_specialisation"] = specialisation
        write_json(out / "validation.json", {"epoch": epoch + 1, **result})
        record_organ_dice(out / "organ_dice.csv", epoch + 1, result)
        if not math.isnan(result["mean_dice"]) and result["mean_dice"] > history.best:
            history.best = result["mean_dice"]
            save_checkpoint(out, "best", task, None)
    barrier(runtime)
