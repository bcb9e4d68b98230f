"""``m4oe pretrain``: phase 1, masked-autoencoder pre-training of each modality's expert."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ExperimentConfig
from ..data.loader import SliceCache
from ..model.base import SegmentationModel
from ..model.mae import MAEPretrainer
from .common import (
    check_resume,
    check_run_folders,
    ensure_cache,
    experiment_datasets,
    inference_metadata,
    model_for,
    sampling_weights,
    write_run_config,
)
from .loop import History, fit, freeze_unused_gates, setup_runtime


class PretrainTask:
    """MAE on images only; each sample routed to its modality's expert."""

    name = "pretrain"

    def __init__(self, model: SegmentationModel, cache: SliceCache, mask_ratio: float, norm_pix_loss: bool) -> None:
        self.model, self.cache = model, cache
        self.module = MAEPretrainer(model, mask_ratio, norm_pix_loss)
        freeze_unused_gates(model, "hard")

    def loss(self, batch: dict[str, Tensor], module: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        loss, _ = module(batch["image"], batch["modality"], batch_mask(self.module, batch["image"]))
        return loss, {}

    def validate(self, autocast) -> dict | None:
        return None

    def bundle_extra(self) -> dict[str, Any]:
        return inference_metadata(self.cache, self.model, "pretrain", {})


def batch_mask(mae: MAEPretrainer, image: Tensor) -> Tensor:
    """MAE mask of a batch, drawn from the global CPU generator (whose state the checkpoints keep)
    and copied to the batch's device without waiting for it."""
    return mae.random_mask(image.shape[0]).to(image.device, non_blocking=True)


def pretrain_mask(cache: SliceCache) -> np.ndarray:
    """Slices phase 1 learns from: training cases, plus every case of unlabeled datasets."""
    unlabeled = ~cache.index["labeled"]
    return cache.slice_mask("train") | unlabeled


def run_pretrain(
    experiment: ExperimentConfig,
    out: str | Path,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
) -> History:
    out = Path(out)
    check_run_folders(experiment, cache_dir, [out], resume)
    runtime = setup_runtime(device)
    cache = ensure_cache(experiment, cache_dir, runtime, progress)
    clock = time.perf_counter()  # the run's time (which a phase-2 budget counts) starts with a ready cache
    config = experiment.training
    torch.manual_seed(config.seed)
    model = model_for(experiment, cache, experiment_datasets(experiment, cache))
    task = PretrainTask(model, cache, config.mask_ratio, config.norm_pix_loss)
    if resume:
        check_resume(out, model, task.bundle_extra(), config)
    if runtime.main:
        write_run_config(out, experiment, {"phase": "pretrain", "cache": str(cache.path)})
    return fit(
        task,
        cache,
        config,
        out,
        runtime,
        epochs=config.pretrain_epochs,
        lr=config.pretrain_lr,
        sampler_mask=pretrain_mask(cache) & cache.dataset_mask(model.dataset_names),
        dataset_weights=sampling_weights(experiment, cache),
        resume=resume,
        validate=False,
        progress=progress,
        stop_at_step=stop_at_step,
        samples_per_epoch=config.pretrain_samples_per_epoch,
        clock=clock,
    )
