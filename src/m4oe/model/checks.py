"""Index checks that read tensor values back only where that costs nothing.

Reading a GPU tensor's values (``int(t)``, ``.item()``, ``bool(t)``) waits for every queued kernel,
so a check inside the training step would stall the GPU at every step. Values are therefore checked
on host tensors in eager mode; on an accelerator the indices come from code that makes them in
range (the training tasks' lookup tables, the Predictor's name resolution).
"""

from __future__ import annotations

import torch
from torch import Tensor

HOST_DEVICES = frozenset({"cpu"})  # devices whose tensors are read back without a device sync


def values_readable(tensor: Tensor) -> bool:
    """Whether reading ``tensor``'s values is free: a host tensor, outside ``torch.compile``."""
    return tensor.device.type in HOST_DEVICES and not torch.compiler.is_compiling()


def check_index_range(name: str, ids: Tensor, count: int) -> None:
    """Raise ``ValueError`` if a readable ``ids`` holds an index outside ``[0, count)``."""
    if values_readable(ids) and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= count):
        raise ValueError(f"{name} index out of range [0, {count}): {ids.tolist()}")
