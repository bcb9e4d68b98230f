"""The training loop shared by both phases: devices, DDP, AMP, schedule, checkpoints, resume, logs.

A *task* (phase-1 MAE or phase-2 segmentation) supplies the module to optimise, the loss of a batch
and, optionally, a validation. The loop does the rest:

* one process on CPU or GPU, or several through ``torchrun`` (DistributedDataParallel; gloo on CPU,
  NCCL on GPU): each process takes its share of every global batch, so the same command and config
  give the same training whatever the number of processes;
* bf16 autocast on CUDA, optional ``torch.compile``, fused AdamW, gradient clipping,
  linear warm-up + cosine learning rate per step;
* checkpoints written atomically to ``RUN/last`` (model bundle + ``train_state.pt`` with optimizer,
  scheduler, step, epoch and batch position, RNG states) and ``RUN/best``; ``resume`` continues a
  killed run exactly where its last checkpoint left it;
* ``metrics.csv``, ``curve.png`` and a progress bar; a non-finite loss stops the run with a message
  naming the step, keeping the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..bundle import save_bundle
from ..config import TrainConfig
from ..data.augment import AugmentConfig, augment_batch
from ..data.loader import BalancedBatchSampler, SliceCache, make_loader
from ..devices import resolve_device
from ..files import replace_dir, save_figure, write_csv, write_json
from ..model.base import SegmentationModel

STATE_FILE = "train_state.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class RunExists(ValueError):
    """The output folder already holds a run, and ``resume`` was not asked for."""


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove checkpoint folders left half-written by killed processes (``.last.tmp-PID``,
    ``.last.old-PID``; each as large as a checkpoint). Those of a live process are kept."""
    removed = []
    for path in out.glob(".*.*-*"):
        stem, _, pid = path.name.rpartition("-")
        if not (stem.endswith((".tmp", ".old")) and pid.isdigit()) or _alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str | None = None) -> Runtime:
    """Device and process group (when started by ``torchrun``: WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = wanted
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world, local_rank)


def autocast_factory(device: torch.device, amp: str):
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_lambda(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float, schedule: str = "cosine"):
    """Multiplier of the base learning rate at a step: linear warm-up, then cosine (or nnU-Net's
    polynomial ``(1 - progress)^0.9``) down to ``min_lr``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        floor = min_lr / base_lr
        decay = (1 - progress) ** 0.9 if schedule == "poly" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * decay

    return factor


def freeze_unused_gates(model: SegmentationModel, routing: str) -> None:
    """Without soft routing the gates get no gradient: freeze them (DDP needs every trained
    parameter to be used)."""
    for name, param in model.named_parameters():
        if ".gate." in name or "modality_embed" in name:
            param.requires_grad_(routing == "soft")


@dataclass
class History:
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: float = -math.inf

    def write(self, out: Path) -> None:
        if not self.rows:
            return
        write_csv(out / "metrics.csv", self.rows, list(dict.fromkeys(k for row in self.rows for k in row)))
        plot_curves(self.rows, out / "curve.png")


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [r["loss"] for r in rows], label="training loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val = [(r["epoch"], r["val_dice"]) for r in rows if r.get("val_dice") not in (None, "")]
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation Dice")
        twin.set_ylabel("validation Dice")
        twin.set_ylim(0, 1)
        fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _save_checkpoint(out: Path, name: str, task: Task, state: dict[str, Any] | None) -> None:
    target = out / name
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_bundle(task.model, tmp, extra=task.bundle_extra())
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    replace_dir(tmp, target, "bundle")


def load_train_state(run: Path) -> dict[str, Any]:
    path = Path(run) / "last" / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


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
) -> History:
    """Train ``task.module`` on batches from ``cache``; see the module docstring.

    ``dataset_weights`` (in the cache's dataset order) sets how often each dataset is drawn
    (default: balanced). ``stop_at_step`` interrupts the run just before that step (as a kill
    would), for tests.
    """
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "last").exists():
        raise RunExists(
            f"{out} already holds a run (its last/ checkpoint): pass --resume to continue it, or choose another -o"
        )
    if runtime.main:
        remove_stale_temporaries(out)
    torch.manual_seed(config.seed + runtime.rank)
    module = task.module.to(runtime.device)
    if config.batch_size % runtime.world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {runtime.world} processes")
    sampler = BalancedBatchSampler(
        cache,
        config.batch_size,
        mask=sampler_mask,
        dataset_weights=dataset_weights,
        samples_per_epoch=config.samples_per_epoch,
        foreground_fraction=config.foreground_fraction,
        foreground_sampling=config.foreground_sampling,
        seed=config.seed,
    )
    sampler.shard(runtime.rank, runtime.world)  # every process takes its share of each global batch
    steps_per_epoch = len(sampler)
    total_steps = epochs * steps_per_epoch
    params = [p for p in module.parameters() if p.requires_grad]
    fused = runtime.device.type in ("cuda", "cpu")  # one kernel for all parameters, no step-count read-back
    # a task may exempt parameters from weight decay (add-modality keeps frozen slices bit-exact)
    no_decay = {id(p) for p in getattr(task, "no_weight_decay", lambda: [])()}
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.99, nesterov=True, fused=fused)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    schedule = lr_lambda(total_steps, warmup, lr, config.min_lr, config.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator(device=runtime.device).manual_seed(config.seed * 1000 + runtime.rank)
    history, step, start_epoch, start_batch = History(), 0, 0, 0
    resumed_sums: dict[str, Tensor] = {}
    resumed_seen, resumed_seconds = 0, 0.0  # slices and seconds of an interrupted epoch before the resume
    sums: dict[str, Tensor] = {}
    seen, started = 0, time.perf_counter()
    if resume:
        state = load_train_state(out)
        for key in ("batch_size", "seed", "samples_per_epoch"):
            if state["config"].get(key) != getattr(config, key):
                raise ValueError(f"cannot resume {out}: train.{key} changed from {state['config'].get(key)}")
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch"]
        resumed_sums = {k: torch.tensor(v, device=runtime.device) for k, v in state["epoch_sums"].items()}
        resumed_seen, resumed_seconds = state.get("epoch_progress", [0, 0.0])
        history = History(state["history"], state["best"])
        torch.set_rng_state(state["rng"][runtime.rank])
        generator.set_state(state["generator"][runtime.rank])
    train_module: nn.Module = module
    if runtime.distributed:
        ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        train_module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    use_compile = config.compile == "on" or (config.compile == "auto" and runtime.device.type == "cuda")
    loss_module = torch.compile(train_module) if use_compile else train_module
    autocast = autocast_factory(runtime.device, config.amp)
    augment = AugmentConfig() if config.augment else None
    pin_memory, context = runtime.device.type == "cuda", task.model.config.slice_context
    loader = make_loader(cache, sampler, workers=config.workers, pin_memory=pin_memory, context=context)

    divergence = Divergence(runtime.device)

    def checkpoint(epoch: int, batch: int) -> None:
        divergence.check(out)  # never save weights that a non-finite loss has touched
        state = {
            "module": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "epoch_sums": {k: float(v) for k, v in sums.items()} if batch else {},
            "epoch_progress": [seen, time.perf_counter() - started] if batch else [0, 0.0],
            "history": history.rows,
            "config": {k: getattr(config, k) for k in ("batch_size", "seed", "samples_per_epoch")},
            "best": history.best,
            "rng": _gather_state(torch.get_rng_state(), runtime),
            "generator": _gather_state(generator.get_state().cpu(), runtime),
        }
        if runtime.main:
            _save_checkpoint(out, "last", task, state)
        _barrier(runtime)

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        first_batch = sampler.start_batch
        module.train()
        sums = dict(resumed_sums) if epoch == start_epoch else {}
        seen, started = 0, time.perf_counter()
        if epoch == start_epoch:  # the slices and time of the epoch before an interruption count too
            seen, started = resumed_seen, started - resumed_seconds
        bar = _progress(steps_per_epoch - first_batch, f"{task.name} {epoch + 1}/{epochs}", progress and runtime.main)
        for batch_index, batch in enumerate(loader, start=first_batch):
            if stop_at_step is not None and step >= stop_at_step:
                raise KeyboardInterrupt(f"stopped before step {step} (stop_at_step)")
            batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
            if augment is not None:
                batch["image"], batch["label"] = augment_batch(batch["image"], batch["label"], augment, generator)
            with autocast():
                loss, logs = task.loss(batch, loss_module)
            divergence.note(loss.detach(), step, epoch, batch_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seen += config.batch_size
            for key, value in {"loss": loss.detach(), **logs}.items():
                sums[key] = sums.get(key, 0) + value.float()
            bar.update()
            if step % LOOK_EVERY == 0:  # the one read-back of the loss every LOOK_EVERY steps
                divergence.check(out)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", sps=f"{seen / (time.perf_counter() - started):.0f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and batch_index + 1 < steps_per_epoch:
                checkpoint(epoch, batch_index + 1)
        bar.close()
        divergence.check(out)
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step}
        row.update({k: round(float(_all_mean(v, runtime)) / steps_per_epoch, 6) for k, v in sums.items()})
        row.update(
            lr=scheduler.get_last_lr()[0], slices_per_s=round(seen / seconds, 1), epoch_seconds=round(seconds, 2)
        )
        is_last = epoch + 1 == epochs
        if validate and config.val_every and ((epoch + 1) % config.val_every == 0 or is_last):
            result = task.validate(autocast) if runtime.main else None
            if result is not None:
                row["val_dice"] = round(result["mean_dice"], 5)
                row.update({f"val_dice_{k}": round(v, 5) for k, v in result["dataset_mean_dice"].items()})
                post = result.get("dataset_mean_dice_postprocessed", {})
                row.update({f"val_post_{k}": round(v, 5) for k, v in post.items()})
                write_json(out / "validation.json", {"epoch": epoch + 1, **result})
                record_organ_dice(out / "organ_dice.csv", epoch + 1, result)
                if not math.isnan(result["mean_dice"]) and result["mean_dice"] > history.best:
                    history.best = result["mean_dice"]
                    _save_checkpoint(out, "best", task, None)
            _barrier(runtime)
        history.rows.append(row)
        if runtime.main:
            history.write(out)
        checkpoint(epoch + 1, 0)
    return history


ORGAN_DICE_COLUMNS = ("epoch", "dataset", "organ", "dice", "dice_postprocessed")


def record_organ_dice(path: Path, epoch: int, result: dict) -> None:
    """Add one validation's Dice per dataset and organ to ``path`` (one row each), so that an organ
    lost along the way shows when it went; rows of this or later epochs (left by a run that was
    resumed from an earlier checkpoint) are replaced."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
    post = result.get("dice_postprocessed", {})
    for name, organs in result["dice"].items():
        for organ, dice in organs.items():
            rows.append({"epoch": epoch, "dataset": name, "organ": organ, "dice": round(dice, 5),
                         "dice_postprocessed": round(post.get(name, {}).get(organ, float("nan")), 5)})  # fmt: skip
    write_csv(path, rows, ORGAN_DICE_COLUMNS)


def _gather_state(state: Tensor, runtime: Runtime) -> list[Tensor]:
    if not runtime.distributed:
        return [state]
    states = [None] * runtime.world
    dist.all_gather_object(states, state)
    return states


def _all_mean(value: Tensor, runtime: Runtime) -> Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= runtime.world
    return value


def _barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


class _NoBar:
    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)
