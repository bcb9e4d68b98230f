"""Dynamic-selection projection head: one projection to the union label vocabulary, masked per sample.

Each dataset owns a subset of the union vocabulary (always including background, index 0). Logits of
classes outside a sample's own subset are set to the dtype's lowest value, so softmax gives them zero
probability and argmax never picks them. The mask is gathered per sample (no loop over the batch), so
a batch mixing datasets in any order gives every sample the same output as running it alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DynamicHead(nn.Module):
    """1x1 projection ``[B, C, H, W] -> [B, K, H, W]`` with per-dataset logit masking.

    Args:
        dim: input channels.
        label_mask: ``[D, K]`` bool, ``label_mask[d, k]`` true when dataset ``d`` has class ``k``.
    """

    def __init__(self, dim: int, label_mask: Tensor) -> None:
        super().__init__()
        if label_mask.ndim != 2 or label_mask.dtype != torch.bool:
            raise ValueError("label_mask must be a [datasets, classes] bool tensor")
        self.proj = nn.Conv2d(dim, label_mask.shape[1], kernel_size=1, bias=False)
        self.register_buffer("label_mask", label_mask.clone())

    @property
    def num_classes(self) -> int:
        return self.label_mask.shape[1]

    def forward(self, features: Tensor, dataset: Tensor | None) -> Tensor:
        logits = self.proj(features)
        if dataset is None:  # the union vocabulary: nothing masked
            return logits
        keep = self.label_mask[dataset][:, :, None, None]  # [B, K, 1, 1]
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def class_argmax(scores: Tensor, dtype: torch.dtype = torch.long) -> Tensor:
    """``scores.argmax(1)`` (the first maximum wins on ties), computed class by class, as ``dtype``.

    On the CPU, argmax over the strided class dimension of ``[B, K, H, W]`` is several times slower
    than ``K`` passes of contiguous element-wise comparisons (0.74 s vs 0.09 s for 16 x 14 x 512 x 512).
    """
    best = scores[:, 0]
    work = torch.uint8 if scores.shape[1] <= 256 else torch.long
    index = torch.zeros(best.shape, dtype=work, device=scores.device)
    for k in range(1, scores.shape[1]):
        candidate = scores[:, k]
        index.masked_fill_(candidate > best, k)
        best = torch.maximum(best, candidate)
    return index.to(dtype)
