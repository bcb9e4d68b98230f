"""``m4oe train``: phase 2, gated end-to-end fine-tuning (or training from scratch), and baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..bundle import load_bundle
from ..config import ExperimentConfig
from ..data.loader import SliceCache
from ..files import write_json
from ..model.base import SegmentationModel
from ..model.mae import load_pretrained
from .common import (
    ensure_cache,
    experiment_datasets,
    inference_metadata,
    model_for,
    sampling_weights,
    write_run_config,
)
from .loop import History, Runtime, fit, freeze_unused_gates, setup_runtime
from .losses import deep_supervision_loss, segmentation_loss
from .validate import validate


class SegmentationTask:
    """Cross-entropy + Dice over each sample's own label set; validation Dice on whole volumes.

    The model may cover a subset of the cache's datasets (the per-modality baseline): cache dataset,
    modality and class indices are translated to the model's.
    """

    name = "train"

    def __init__(self, model: SegmentationModel, cache: SliceCache, routing: str, ce_weight: float,
                 dice_weight: float, device: torch.device, val_batch: int = 32,
                 dice: str = "sample") -> None:  # fmt: skip
        self.model, self.module, self.cache, self.routing = model, model, cache, routing
        self.ce_weight, self.dice_weight, self.device, self.val_batch = ce_weight, dice_weight, device, val_batch
        self.dice = dice
        # the model may know datasets and modalities the cache does not hold (add-modality), and back
        self.dataset_map = {cache.dataset_names.index(n): i for i, n in enumerate(model.dataset_names)
                            if n in cache.dataset_names}  # fmt: skip
        self.modality_map = {
            cache.modalities.index(m): i for i, m in enumerate(model.modalities) if m in cache.modalities
        }
        self.dataset_lut = _lut(self.dataset_map, len(cache.dataset_names)).to(device)
        self.modality_lut = _lut(self.modality_map, len(cache.modalities)).to(device)
        classes = {cache.class_names.index(c): i for i, c in enumerate(model.class_names) if c in cache.class_names}
        self.class_lut = _lut(classes, len(cache.class_names)).to(device)
        self.model_to_cache_class = np.array(
            [cache.class_names.index(c) if c in cache.class_names else 0 for c in model.class_names]
        )
        self.extra_datasets: dict[str, Any] = {}  # metadata of datasets the cache does not hold
        self.postprocessing: dict[str, list[str]] = {}  # chosen by the latest validation
        self.carried_postprocessing: dict[str, list[str]] = {}  # of datasets the cache does not hold
        freeze_unused_gates(model, routing)

    def loss(self, batch: dict[str, Tensor], module: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        dataset = self.dataset_lut[batch["dataset"]]
        modality = self.modality_lut[batch["modality"]]
        classes = self.model.head.label_mask[dataset]
        target = self.class_lut[batch["label"]]
        weights = {"ce_weight": self.ce_weight, "dice_weight": self.dice_weight, "dice": self.dice, "dataset": dataset}
        if self.model.config.deep_supervision:
            logits, aux = module(batch["image"], modality, dataset, routing=self.routing, deep_supervision=True)
            return deep_supervision_loss(logits, aux, target, classes, **weights)
        logits = module(batch["image"], modality, dataset, routing=self.routing)
        return segmentation_loss(logits, target, classes, **weights)

    def validate(self, autocast) -> dict | None:
        self.model.set_routing(self.routing)
        result = validate(
            self.model,
            self.cache,
            self.device,
            batch_size=self.val_batch,
            autocast=autocast,
            dataset_map=self.dataset_map,
            modality_map=self.modality_map,
            class_map=self.model_to_cache_class,
        )
        self.postprocessing = result["postprocessing"]
        return result

    def bundle_extra(self) -> dict[str, Any]:
        extra = inference_metadata(self.cache, self.model, "train", {"routing": self.routing})
        extra["datasets"] = {**self.extra_datasets, **extra["datasets"]}
        extra["postprocessing"] = {"keep_largest": {**self.carried_postprocessing, **self.postprocessing}}
        return extra


def _lut(mapping: dict[int, int], size: int) -> Tensor:
    lut = torch.full((size,), -1, dtype=torch.long)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def run_train(
    experiment: ExperimentConfig,
    out: str | Path,
    cache_dir: str | Path | None = None,
    init: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
) -> dict[str, History]:
    """Train the config's model (or one model per modality) and return the history of each run."""
    out = Path(out)
    runtime = setup_runtime(device)
    cache = ensure_cache(experiment, cache_dir, runtime, progress)
    config = experiment.training
    names = experiment_datasets(experiment, cache)
    if config.baseline == "per_modality":
        modality = cache.dataset_modality
        groups = {m: [n for n in names if modality[n] == m] for m in dict.fromkeys(modality[n] for n in names)}
    else:
        groups = {"": names}
    histories = {}
    for modality, datasets in groups.items():
        run_out = out / modality if modality else out
        histories[modality or "all"] = _train_one(
            experiment, cache, datasets, run_out, runtime, init, resume, progress, stop_at_step
        )
    return histories


def _train_one(experiment, cache, datasets, out: Path, runtime: Runtime, init, resume, progress, stop_at_step):
    config = experiment.training
    torch.manual_seed(config.seed)
    model = model_for(experiment, cache, datasets)
    routing = config.routing or model.config.routing
    report = None
    if init is not None and not resume:
        pretrained = load_bundle(Path(init) / "last")
        report = load_pretrained(model, pretrained)
    task = SegmentationTask(
        model, cache, routing, config.ce_weight, config.dice_weight, runtime.device, dice=config.dice
    )
    if runtime.main:
        write_run_config(out, experiment, {"phase": "train", "cache": str(cache.path), "datasets_in_run": datasets,
                                           "init": str(init) if init else None})  # fmt: skip
        if report is not None:
            counts = {k: len(v) for k, v in report.items()}
            write_json(out / "init_report.json", {"counts": counts, **report})
    in_run = cache.dataset_mask(datasets)
    return fit(
        task,
        cache,
        config,
        out,
        runtime,
        epochs=config.epochs,
        lr=config.lr,
        sampler_mask=cache.slice_mask("train") & in_run & cache.index["labeled"],
        dataset_weights=sampling_weights(experiment, cache),
        resume=resume,
        progress=progress,
        stop_at_step=stop_at_step,
    )
