"""``m4oe train``: phase 2, gated end-to-end fine-tuning (or training from scratch), and baselines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..bundle import BundleError, load_bundle
from ..config import ExperimentConfig, TrainConfig
from ..data.datasets import DataError
from ..data.loader import SliceCache
from ..files import mark_output_dir, write_json
from ..model.base import SegmentationModel
from ..model.mae import load_pretrained
from .budget import BudgetTooShort
from .checkpoint import STATE_FILE, run_seconds
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
        self.route_weight, self.route_decay, self.handover = 0.0, 0.0, 0.0
        self.progress = 0.0  # the share of the run done, set by fit before each step
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

    @classmethod
    def from_config(cls, model: SegmentationModel, cache: SliceCache, config: TrainConfig, device: torch.device,
                    **kwargs):  # fmt: skip
        """The task as a run's training config sets it: routing, loss weights and Dice variant (every
        workflow builds its task here, so none can leave a setting out)."""
        routing = config.routing or model.config.routing
        task = cls(model, cache, routing, config.ce_weight, config.dice_weight, device, dice=config.dice, **kwargs)
        task.route_weight, task.route_decay, task.handover = config.route_weight, config.route_decay, config.handover
        return task

    def set_progress(self, progress: float) -> None:
        """Called by the loop before each step with the share of the run done (0 to 1): the routing
        curriculum's share of each sample's own expert follows it."""
        self.progress = progress
        if self.handover and self.routing == "soft":
            self.model.set_own_share(max(0.0, 1.0 - progress / self.handover))

    def routing_loss_weight(self) -> float:
        if not self.route_weight or self.routing != "soft":
            return 0.0
        if not self.route_decay:
            return self.route_weight
        return self.route_weight * max(0.0, 1.0 - self.progress / self.route_decay)

    def loss(self, batch: dict[str, Tensor], module: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        dataset = self.dataset_lut[batch["dataset"]]
        modality = self.modality_lut[batch["modality"]]
        classes = self.model.head.label_mask[dataset]
        target = self.class_lut[batch["label"]]
        weights = {"ce_weight": self.ce_weight, "dice_weight": self.dice_weight, "dice": self.dice, "dataset": dataset}
        route = self.routing_loss_weight()
        options: dict[str, Any] = {"routing": self.routing}
        if route:
            options["return_gates"] = True
        if self.model.config.deep_supervision:
            options["deep_supervision"] = True
        outputs = module(batch["image"], modality, dataset, **options)
        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        logits, gates = outputs[0], outputs[1] if route else None
        if self.model.config.deep_supervision:
            loss, logs = deep_supervision_loss(logits, outputs[-1], target, classes, **weights)
        else:
            loss, logs = segmentation_loss(logits, target, classes, **weights)
        if route:
            routing = own_expert_loss(gates, modality)
            loss, logs = loss + route * routing, {**logs, "route": routing.detach()}
        return loss, logs

    def validation_slices(self) -> int:
        """Slices one validation runs through the model (a time budget's first estimate of its cost)."""
        names = [self.cache.dataset_names[i] for i in self.dataset_map]
        return int((self.cache.slice_mask("val") & self.cache.dataset_mask(names)).sum())

    def validate(self, autocast) -> dict | None:
        self.model.set_routing(self.routing)
        self.model.set_own_share(0.0)  # validated as the bundle will be used: the gate alone
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


def own_expert_loss(gates: list[Tensor], modality: Tensor) -> Tensor:
    """The mean over gated layers, samples and tokens of ``-log`` the gate weight of each sample's own
    modality expert (``gates``: ``[B, L, E]`` per layer; ``modality``: ``[B]`` expert indices)."""
    losses = []
    for layer in gates:
        own = layer.gather(-1, modality.view(-1, 1, 1).expand(-1, layer.shape[1], 1)).squeeze(-1)
        losses.append(-torch.log(own.float().clamp_min(1e-6)).mean())
    return torch.stack(losses).mean()


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
    """Train the config's model (or one model per modality) and return the history of each run.

    Every check (the folders, ``init``, a resume's settings) is made before anything is written to
    ``out``; the cache may be prepared first.
    """
    out = Path(out)
    per_modality = experiment.training.baseline == "per_modality"
    check_run_folders(experiment, cache_dir, [out], resume, states=not per_modality)
    runtime = setup_runtime(device)
    cache = ensure_cache(experiment, cache_dir, runtime, progress)
    clock = time.perf_counter()  # the run's time (which train.minutes counts) starts with a ready cache
    config = experiment.training
    names = experiment_datasets(experiment, cache)
    if per_modality:
        modality = cache.dataset_modality
        groups = {m: [n for n in names if modality[n] == m] for m in dict.fromkeys(modality[n] for n in names)}
    else:
        groups = {"": names}
    check_trainable(cache, names)
    budget = _budget_seconds(config, init, runtime, resume)  # refused before anything is written
    runs = {modality or "all": (out / modality if modality else out, datasets) for modality, datasets in groups.items()}
    check_run_folders(experiment, cache_dir, [run_out for run_out, _ in runs.values()], resume)
    pretrained = _pretrained(init) if init is not None and not resume else None
    tasks = {name: _task(experiment, cache, datasets, runtime, pretrained) for name, (_, datasets) in runs.items()}
    if resume:
        for name, (run_out, _) in runs.items():
            check_resume(run_out, tasks[name][0].model, tasks[name][0].bundle_extra(), config)
    if runtime.main and len(runs) > 1:
        mark_output_dir(out, "run")  # the folder of the per-modality runs
    histories = {}
    for done, (name, (run_out, datasets)) in enumerate(runs.items()):
        task, report = tasks[name]
        now = time.perf_counter()  # this run's start: its share of the budget counts from here
        if runtime.main:
            write_run_config(run_out, experiment, {"phase": "train", "cache": str(cache.path),
                                                   "datasets_in_run": datasets,
                                                   "init": str(init) if init else None})  # fmt: skip
            if report is not None:
                counts = {k: len(v) for k, v in report.items()}
                write_json(run_out / "init_report.json", {"counts": counts, **report})
        histories[name] = fit(
            task,
            cache,
            config,
            run_out,
            runtime,
            epochs=config.epochs,
            lr=config.lr,
            sampler_mask=cache.slice_mask("train") & cache.dataset_mask(datasets) & cache.index["labeled"],
            dataset_weights=sampling_weights(experiment, cache),
            resume=resume,
            progress=progress,
            stop_at_step=stop_at_step,
            # runs one after another (one per modality) share what is left of the budget
            budget_seconds=None if budget is None else (clock + budget - now) / (len(runs) - done),
            clock=None if budget is None else now,
        )
    return histories


def _budget_seconds(config: TrainConfig, init: str | Path | None, runtime: Runtime, resume: bool) -> float | None:
    """Seconds phase 2 may take under ``train.minutes``: the budget less what the phase-1 run
    ``init`` took (its checkpoint records it); ``None`` without a budget."""
    if config.minutes is None:
        return None
    seconds = config.minutes * 60
    if init is not None and (Path(init) / "last" / STATE_FILE).is_file():
        phase1 = run_seconds(Path(init))
        seconds -= phase1
        if runtime.main and not resume:
            print(f"train.minutes {config.minutes:g}: the phase-1 run {init} took {phase1 / 60:.1f} min; phase 2 "
                  f"gets {seconds / 60:.1f}", flush=True)  # fmt: skip
    if seconds <= 0:
        raise BudgetTooShort(f"train.minutes {config.minutes:g}: the phase-1 run {init} took longer "
                             f"({(config.minutes * 60 - seconds) / 60:.1f} min); give more minutes")  # fmt: skip
    return seconds


def check_trainable(cache: SliceCache, datasets: list[str]) -> None:
    """Refuse, naming the cause, a run in which a dataset has nothing to learn from: no labels
    (``labels: none``), no training case (all went to validation), or label maps that are all
    background."""
    problems = []
    train = cache.slice_mask("train")
    for name in datasets:
        own = cache.dataset_mask([name])
        cases = sum(1 for c in cache.info.cases if c["dataset"] == name)
        if not cache.index["labeled"][own].any():
            problems.append(f"{name}: has no labels (labels: none): it can be pre-trained on, not trained on")
        elif not (train & own).any():
            problems.append(
                f"{name}: all its {cases} case(s) are validation cases of its split, none is left to train on; "
                "give it more cases, or name its validation cases in split.val"
            )
        elif not (cache.index["foreground"][own] > 0).any():
            problems.append(f"{name}: every label map is empty (background only); check its labelsTr")
    if problems:
        raise DataError(problems, "nothing to train on")


def _pretrained(init: str | Path) -> SegmentationModel:
    """The phase-1 model of the pretrain run ``init`` (its ``last`` bundle)."""
    folder = Path(init)
    if not (folder / "last").is_dir():
        raise BundleError(f"--init {folder}: not a pretrain run folder (it has no last/ bundle)")
    return load_bundle(folder / "last")


def _task(experiment, cache, datasets, runtime: Runtime, pretrained):
    """The segmentation task of one run (and the report of what ``pretrained`` gave its model)."""
    config = experiment.training
    torch.manual_seed(config.seed)
    model = model_for(experiment, cache, datasets)
    report = load_pretrained(model, pretrained) if pretrained is not None else None
    return SegmentationTask.from_config(model, cache, config, runtime.device), report
