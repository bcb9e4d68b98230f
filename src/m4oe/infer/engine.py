"""The one forward pass over a volume's slices, used by ``predict``, training's validation and the
expert maps: slices in, scores (and gate weights) out, a batch at a time.

It owns what every caller would otherwise repeat: batching with each slice's ``slice_context``
neighbours, the input's device and dtype, an optional autocast, the test-time views (left-right
mirror with paired classes swapped back, in-plane rotations each rotated back) and the per-batch sum
of the gates' mean weights. What a caller does with the scores (resample them to a file's grid, take
the argmax, score them) stays with the caller.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.loader import stack_slice_context
from ..model.base import SegmentationModel


@dataclass
class SliceRequest:
    """Who the slices are for: the model's modality index (``None``: the gate decides alone) and
    dataset index (``None``: the union vocabulary, no label set masked)."""

    modality: int | None = None
    dataset: int | None = None


@dataclass
class SliceBatch:
    """The engine's answer for slices ``start .. start + size``: ``scores [b, K, S, S]`` float32,
    probabilities when test-time views were averaged (``averaged``), else logits; ``gates``: every
    block's ``[b, L, E]`` weights of the plain view; ``gate_sums``: their per-block mean over tokens,
    summed over the batch, ``[blocks, E]`` (None for a model without M4oE layers)."""

    start: int
    size: int
    scores: Tensor
    averaged: bool
    gates: list[Tensor]
    gate_sums: Tensor | None


class SliceEngine:
    """Runs ``model`` over the prepared slices of a volume.

    Args:
        model: a segmentation model, already on ``device`` (and in the dtype it should run in).
        device: where the batches go.
        batch_size: slices per forward pass.
        dtype: the dtype of the input batches (the model's own: fp32, or bf16 for a model cast to bf16).
        autocast: a context manager factory wrapped around each forward pass (training's validation
            runs its bf16 autocast here).
        tta: also average the left-right mirrored view (paired left/right classes swapped back).
        rotations: also average views rotated in-plane by plus and minus each angle (degrees).
    """

    def __init__(self, model: SegmentationModel, device: torch.device, batch_size: int,
                 dtype: torch.dtype = torch.float32, autocast=contextlib.nullcontext, tta: bool = False,
                 rotations: tuple[float, ...] = ()) -> None:  # fmt: skip
        self.model, self.device, self.batch_size, self.dtype = model, device, batch_size, dtype
        self.autocast, self.tta, self.rotations = autocast, tta, tuple(rotations)
        self.mirror_classes = torch.tensor(mirror_permutation(model.class_names), device=device)

    @property
    def averaged(self) -> bool:
        """Whether scores are probabilities averaged over test-time views (else plain logits)."""
        return self.tta or bool(self.rotations)

    def batches(self, slices: Tensor, request: SliceRequest) -> Iterator[SliceBatch]:
        """``slices [Z, S, S]`` (on the host) -> one :class:`SliceBatch` per ``batch_size`` slices, in order."""
        for start in range(0, slices.shape[0], self.batch_size):
            batch = stack_slice_context(slices, self.model.config.slice_context, start, start + self.batch_size)
            yield self.forward(batch.to(self.device, self.dtype), request, start)

    def forward(self, batch: Tensor, request: SliceRequest, start: int = 0) -> SliceBatch:
        """Scores of one model-ready batch ``[b, 1 + 2k, S, S]`` (already on the device)."""
        b = batch.shape[0]
        dataset = None
        if request.dataset is not None:
            dataset = torch.full((b,), request.dataset, dtype=torch.long, device=self.device)
        modality = request.modality  # one int for the whole batch: fast hard routing
        with self.autocast():
            logits, gates = self.model(batch, modality, dataset, return_gates=True)
            if self.averaged:
                logits = self._average_views(batch, logits, modality, dataset)
        scores = logits.float()
        gate_sums = torch.stack([g.float().mean(dim=1).sum(0) for g in gates]) if gates else None
        return SliceBatch(start, b, scores, self.averaged, gates, gate_sums)

    def _average_views(self, batch: Tensor, logits: Tensor, modality, dataset) -> Tensor:
        """Mean softmax over the test-time views of ``batch`` (``logits``: the plain view's), each
        mapped back onto the slice: rotations by plus and minus each angle, and with ``tta`` the
        left-right mirror of every view."""
        total, count = logits.float().softmax(1), 1
        for angle in (0.0, *(sign * a for a in self.rotations for sign in (1, -1))):
            view = rotate_slices(batch, angle) if angle else batch
            if angle:
                total = total + rotate_slices(self.model(view, modality, dataset).float().softmax(1), -angle)
                count += 1
            if self.tta:
                flipped = self.model(view.flip(-1), modality, dataset)
                # in the mirrored slice the right kidney lies where the left one belongs, and the model
                # (trained without flips) calls it left: swap the paired classes back when un-mirroring
                mirrored = flipped.float().flip(-1).softmax(1)[:, self.mirror_classes]
                total = total + (rotate_slices(mirrored, -angle) if angle else mirrored)
                count += 1
        return total / count


def mirror_permutation(class_names: list[str]) -> list[int]:
    """Class order of a left-right mirrored prediction: each class whose name differs from another's
    only by ``left`` / ``right`` takes its partner's place (``left_kidney`` <-> ``right_kidney``)."""
    index = {name: k for k, name in enumerate(class_names)}
    order = []
    for name in class_names:
        swapped = re.sub(r"left|right", lambda m: "right" if m.group(0) == "left" else "left", name)
        order.append(index.get(swapped, index[name]))
    return order


def rotate_slices(x: Tensor, degrees: float) -> Tensor:
    """``[B, C, H, W]`` rotated in-plane about the centre by ``degrees`` (counter-clockwise as an image
    is shown, row 0 at the top), bilinear, edge values repeated outside; computed in float32."""
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype)
