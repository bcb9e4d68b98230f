"""Where the model is unsure (``predict --uncertainty``): per voxel, the entropy of the prediction's
softmax (its own test-time views averaged), and the disagreement between views of the same voxel,
the mutual information ``H(mean of views) - mean of H(view)`` (both divided by ``log C``, so 0 to 1).

The views are the ensemble's members with several models; with one mixture-of-experts model that
routes by its gate, each modality's expert alone (hard routing), one more pass over the slices per
expert. A dense model, a model trained with hard or uniform routing, or the ONNX engine gives the
entropy alone: a hard-trained model's other pathways never saw this modality, so they disagree with
its own everywhere and the map would say nothing about this scan. Per structure, the statistics add
the mean of each map inside it: a structure to review has a high one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .engine import SliceBatch, SliceEngine, SliceRequest

MAPS = ("entropy", "disagreement")


def normalised_entropy(probabilities: Tensor, dim: int = 1) -> Tensor:
    """``-sum p log p / log C`` over ``dim`` (0 for a sure voxel, 1 for a uniform one)."""
    classes = probabilities.shape[dim]
    p = probabilities.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim) / math.log(max(classes, 2))


def disagreement(views: list[Tensor]) -> Tensor:
    """Mutual information between the views (``[b, C, ...]`` probabilities each), normalised."""
    mean = torch.stack([v.float() for v in views]).mean(0)
    spread = normalised_entropy(mean) - torch.stack([normalised_entropy(v) for v in views]).mean(0)
    return spread.clamp_min(0.0)


class UncertaintyMaps:
    """The maps of one volume, filled batch by batch (``[z, y, x]`` float32 each)."""

    def __init__(self, shape: tuple[int, ...], with_views: bool) -> None:
        self.maps = {"entropy": np.zeros(shape, np.float32)}
        if with_views:
            self.maps["disagreement"] = np.zeros(shape, np.float32)

    def add(self, start: int, probabilities: Tensor, views: list[Tensor]) -> None:
        stop = start + probabilities.shape[0]
        self.maps["entropy"][start:stop] = normalised_entropy(probabilities).cpu().numpy()
        if "disagreement" in self.maps and views:
            self.maps["disagreement"][start:stop] = disagreement(views).cpu().numpy()


def has_expert_views(model) -> bool:
    """Whether the model's experts alone are views of its prediction: several, mixed by its gate."""
    gated = callable(getattr(model, "gate_names", None)) and bool(model.gate_names())
    return gated and len(model.modalities) > 1 and model.config.routing == "soft"


def expert_views(model, engine: SliceEngine, slices: Tensor, request: SliceRequest) -> Iterator[list[SliceBatch]]:
    """Per batch of :meth:`SliceEngine.batches`, the batch through each modality's expert alone."""
    runs = [engine.batches(slices, SliceRequest(m, request.dataset)) for m in range(len(model.modalities))]
    routing = model.config.routing
    while True:
        model.set_routing("hard")
        try:
            parts = [next(run) for run in runs]
        except StopIteration:
            return
        finally:
            model.set_routing(routing)
        yield parts


def ensemble_maps(members: list[np.ndarray], chunk: int = 8) -> dict[str, np.ndarray]:
    """The maps of an ensemble from its members' ``[C, z, y, x]`` probabilities, a few slices at a time."""
    shape = members[0].shape[1:]
    entropy, spread = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for start in range(0, shape[0], chunk):
        views = [torch.from_numpy(m[:, start : start + chunk].astype(np.float32)) for m in members]
        mean = torch.stack(views).mean(0)
        entropy[start : start + chunk] = normalised_entropy(mean, dim=0).numpy()
        spread[start : start + chunk] = disagreement([v[None] for v in views])[0].numpy()
    return {"entropy": entropy, "disagreement": spread}
