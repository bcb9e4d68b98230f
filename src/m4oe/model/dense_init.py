"""Initialise an M4oE model from a dense Swin-UNet checkpoint, experts included.

Parameters that exist in both (attention, norms, embedding, merging, expanding, head when the
vocabularies agree) are copied by name; each dense block MLP initialises all experts of the M4oE
layer at the same place (see :meth:`m4oe.model.moe.MoEMLP.load_dense`). The published code leaves
experts random in this case, wasting the dense pre-training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moe import MoEMLP
from .swin_unet import M4oEUNet


@torch.no_grad()
def init_from_dense(
    model: M4oEUNet, dense_state: dict[str, Tensor], class_names: list[str] | None = None
) -> dict[str, list[str]]:
    """Load ``dense_state`` (a ``swin-unet`` state dict) into ``model``.

    The head is copied row by row for the classes both vocabularies name, when the dense model's
    ``class_names`` are given; otherwise it keeps its fresh initialisation.

    Returns a report: ``copied`` parameter names, ``experts`` (M4oE layers initialised from a dense
    MLP) and ``skipped`` (names absent from the dense state or of another shape, e.g. the head of a
    different vocabulary). The gates keep their fresh initialisation.
    """
    report: dict[str, list[str]] = {"copied": [], "experts": [], "skipped": []}
    own = dict(model.named_parameters())
    gates = model.gate_parameter_names()
    for name, module in model.named_modules():
        if not isinstance(module, MoEMLP):
            continue
        keys = [f"{name}.fc1.weight", f"{name}.fc1.bias", f"{name}.fc2.weight", f"{name}.fc2.bias"]
        if all(k in dense_state for k in keys):
            module.load_dense(*(dense_state[k].to(module.w1) for k in keys))
            report["experts"].append(name)
        else:
            report["skipped"].append(f"{name} (no dense MLP)")
    for key, value in own.items():
        if ".mlp." in key and key.rsplit(".mlp.", 1)[0] + ".mlp" in report["experts"]:
            continue
        if key == "head.proj.weight":
            if class_names is not None and key in dense_state:
                _copy_head_rows(value, dense_state[key], model.class_names, class_names)
                report["copied"].append(key)
            else:
                report["skipped"].append(key)
        elif key in dense_state and dense_state[key].shape == value.shape:
            value.copy_(dense_state[key])
            report["copied"].append(key)
        elif key not in gates:
            report["skipped"].append(key)
    return report


def _copy_head_rows(weight: Tensor, dense_weight: Tensor, names: list[str], dense_names: list[str]) -> None:
    if dense_weight.shape[0] != len(dense_names):
        raise ValueError(f"dense head has {dense_weight.shape[0]} classes but {len(dense_names)} class names")
    for k, name in enumerate(names):
        if name in dense_names:
            weight[k] = dense_weight[dense_names.index(name)]
