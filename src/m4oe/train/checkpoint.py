"""Checkpoints of a run: ``RUN/last`` (a model bundle + ``train_state.pt``: optimiser, scheduler,
position, RNG states) written atomically, ``RUN/best``, and what is left of killed writers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..bundle import save_bundle
from ..files import replace_dir

STATE_FILE = "train_state.pt"
# training settings a resume must keep (the checkpoint records them; a run's batches depend on them)
RESUME_KEYS = ("batch_size", "seed", "samples_per_epoch", "pretrain_samples_per_epoch", "minutes")


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


def save_checkpoint(out: Path, name: str, task, state: dict[str, Any] | None) -> None:
    target = out / name
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_bundle(task.model, tmp, extra=task.bundle_extra())
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    replace_dir(tmp, target, "bundle")


def run_seconds(run: Path) -> float:
    """Seconds a finished run took, all its commands together (as its last checkpoint records)."""
    return float(load_train_state(run).get("spent", 0.0))


def load_train_state(run: Path) -> dict[str, Any]:
    path = Path(run) / "last" / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)
