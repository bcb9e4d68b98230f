"""Validation on whole volumes of the held-out fold: 3D Dice per dataset and label, gate statistics.

Slices of each validation case are predicted in batches and stacked; Dice is computed per case and
label on the volume in the cache's (fitted) slice space, which is what model selection needs. Labels
empty in both the reference and the prediction give NaN and are left out of the means.

Each label is also scored after keeping only its largest connected component. Where that raises a
dataset's mean Dice for the label, the label is listed under ``postprocessing`` (the choice
``predict`` applies, as nnU-Net picks its post-processing on cross-validation) and the
``*_postprocessed`` figures use it. The choice is made on the very cases it is scored on, so those
figures are optimistic by construction; the plain ``dice`` figures are not.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from ..data.loader import SliceCache
from ..data.postprocess import keep_largest_components
from ..eval.routing import routing_figures
from ..infer.engine import SliceEngine, SliceRequest
from ..model.base import SegmentationModel
from ..model.head import class_argmax


def volume_dice(pred: np.ndarray, ref: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Dice of each class index between two label volumes; NaN where both are empty."""
    out = {}
    for k in classes:
        p, r = pred == k, ref == k
        total = int(p.sum()) + int(r.sum())
        out[k] = float("nan") if total == 0 else 2.0 * int((p & r).sum()) / total
    return out


def largest_component_dice(pred: np.ndarray, ref: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Dice of each class after keeping only its largest connected component in ``pred`` (classes are
    cut independently: a voxel cut from one class becomes background, never another class)."""
    return volume_dice(keep_largest_components(pred, classes), ref, classes)


def choose_postprocessing(plain: dict[str, dict[str, float]], largest: dict[str, dict[str, float]]) -> dict:
    """Per dataset, the labels whose mean Dice over its cases (``plain``) rises when only their largest
    component is kept (``largest``); strictly: a tie keeps the prediction as it is."""
    return {
        name: [label for label, dice in labels.items() if largest[name][label] > dice] for name, labels in plain.items()
    }


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def validate(
    model: SegmentationModel,
    cache: SliceCache,
    device: torch.device,
    batch_size: int = 32,
    autocast=contextlib.nullcontext,
    split: str = "val",
    dataset_map: dict[int, int] | None = None,
    modality_map: dict[int, int] | None = None,
    class_map: np.ndarray | None = None,
) -> dict:
    """Predict every case of ``split`` and score it.

    ``dataset_map`` / ``modality_map`` translate the cache's dataset / modality indices to the
    model's (for a model trained on a subset of the cache's datasets, e.g. one modality); cases of
    datasets the model does not know are skipped. ``class_map`` maps the model's class indices to
    the cache's.
    """
    was_training = model.training
    model.eval()
    names = cache.dataset_names
    class_names = cache.class_names
    per_case, gate_sums, gate_counts = [], {}, {}
    engine = SliceEngine(model, device, batch_size, autocast=autocast)  # the model's own dtype: fp32
    for case in cache.cases(split):
        d = names.index(case["dataset"])
        if dataset_map is not None and d not in dataset_map:
            continue
        start, n = case["slice_start"], case["num_slices"]
        images, labels = cache.read(np.arange(start, start + n))
        modality = int(cache.index["modality"][start])
        model_d = dataset_map[d] if dataset_map else d
        model_m = modality_map[modality] if modality_map else modality
        preds = []
        for part in engine.batches(torch.from_numpy(images), SliceRequest(model_m, model_d)):
            preds.append(class_argmax(part.scores).cpu())
            if part.gate_sums is not None:
                key = cache.modalities[modality]
                gate_sums[key] = gate_sums.get(key, 0) + part.gate_sums.cpu()  # [blocks, E]
                gate_counts[key] = gate_counts.get(key, 0) + part.size
        pred = torch.cat(preds).numpy()
        if class_map is not None:
            pred = class_map[pred]
        own = [class_names.index(c) for c in cache.label_sets[case["dataset"]][1:]]
        dice = volume_dice(pred, labels, own)
        largest = largest_component_dice(pred, labels, own)
        per_case.append(
            {
                "dataset": case["dataset"],
                "case_id": case["case_id"],
                "dice": {class_names[k]: v for k, v in dice.items()},
                "dice_largest": {class_names[k]: v for k, v in largest.items()},
            }
        )
    model.train(was_training)
    result = summarise(per_case, gate_sums, gate_counts)
    result["routing"] = routing_figures(result["gates"], model.modalities, model.gate_names())
    return result


def summarise(per_case: list[dict], gate_sums: dict, gate_counts: dict) -> dict:
    datasets = _per_label(per_case, "dice")
    largest = _per_label(per_case, "dice_largest")
    postprocessing = choose_postprocessing(datasets, largest)
    post = {
        name: {label: (largest if label in postprocessing[name] else datasets)[name][label] for label in labels}
        for name, labels in datasets.items()
    }
    dataset_mean = {name: _nanmean(values.values()) for name, values in datasets.items()}
    post_mean = {name: _nanmean(values.values()) for name, values in post.items()}
    gates = {m: (gate_sums[m] / gate_counts[m]).tolist() for m in gate_sums}
    return {
        "mean_dice": _nanmean(dataset_mean.values()),
        "dataset_mean_dice": dataset_mean,
        "dice": datasets,
        "postprocessing": postprocessing,
        "mean_dice_postprocessed": _nanmean(post_mean.values()),
        "dataset_mean_dice_postprocessed": post_mean,
        "dice_postprocessed": post,
        "cases": per_case,
        "gates": gates,
    }


def _per_label(per_case: list[dict], key: str) -> dict[str, dict[str, float]]:
    """Mean over cases of ``case[key][label]``, per dataset and label."""
    datasets: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(c["dataset"] for c in per_case):
        cases = [c for c in per_case if c["dataset"] == name]
        datasets[name] = {label: _nanmean(c[key][label] for c in cases) for label in cases[0][key]}
    return datasets
