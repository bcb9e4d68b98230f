"""Do the experts specialise by modality? The routing report of a model on a set of cases.

Per M4oE block and per modality, the mean gate weight of every expert over the modality's tokens
(soft routing); from it, per block, a **specialisation** figure: the mutual information between the
sample's modality (the modalities weighed equally) and the expert a token is sent to, divided by its
largest possible value ``log M``. It is 0 when every modality gets the same mixture and 1 when each
modality uses an expert of its own only. The **own-expert weight** is the mean weight a modality gives
the expert named after it (what phase 1 trained for it; 1 / E for a uniform mixture). And the Dice of
the same cases under ``soft`` (the gate), ``hard`` (each modality through its own expert) and
``uniform`` (the mean of the experts) routing: whether the model depends on its gate, and whether its
experts can serve their own modality alone.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from ..config import ROUTING_MODES
from ..data.loader import SliceCache
from ..model.base import SegmentationModel


def specialisation(weights: np.ndarray) -> float:
    """``weights [M, E]``: the mean gate weight of each expert for each of M modalities (rows sum to
    1). Mutual information between modality (uniform) and expert over ``log M``, in [0, 1]."""
    weights = np.asarray(weights, dtype=np.float64)
    modalities = weights.shape[0]
    if modalities < 2:
        return float("nan")  # one modality: nothing to tell apart
    joint = weights / weights.sum(axis=1, keepdims=True) / modalities
    expert = joint.sum(axis=0, keepdims=True)
    ratio = np.divide(joint, expert / modalities, out=np.ones_like(joint), where=joint > 0)
    return float(np.sum(joint * np.log(ratio)) / math.log(modalities))


def routing_figures(gates: dict[str, list], experts: list[str], blocks: list[str]) -> dict[str, Any]:
    """The report's gate part from ``gates`` (modality -> ``[blocks, E]`` mean weights, as validation
    records them): per block the weights, the specialisation and the own-expert weight, and both
    figures over all blocks (the mean of the blocks')."""
    modalities = [m for m in gates if m in experts]
    if not modalities:
        return {}
    table = np.stack([np.asarray(gates[m], dtype=np.float64) for m in modalities])  # [M, blocks, E]
    own = [experts.index(m) for m in modalities]
    per_block = []
    for b, name in enumerate(blocks):
        weights = table[:, b]
        per_block.append({
            "block": name,
            "weights": {m: [round(float(w), 4) for w in weights[i]] for i, m in enumerate(modalities)},
            "specialisation": round(specialisation(weights), 4),
            "own_expert_weight": round(float(np.mean([weights[i, e] for i, e in enumerate(own)])), 4),
        })  # fmt: skip
    told_apart = [b["specialisation"] for b in per_block if not math.isnan(b["specialisation"])]
    return {
        "experts": list(experts),
        "modalities": modalities,
        # NaN with one modality: there is nothing to tell apart
        "specialisation": round(float(np.mean(told_apart)), 4) if told_apart else float("nan"),
        "own_expert_weight": round(float(np.mean([b["own_expert_weight"] for b in per_block])), 4),
        "blocks": per_block,
    }


def routing_report(model: SegmentationModel, cache: SliceCache, device: torch.device, batch_size: int = 32,
                   split: str = "val", autocast=contextlib.nullcontext) -> dict[str, Any]:  # fmt: skip
    """Gate figures (soft routing) and the Dice per dataset under every routing mode, on the cases of
    ``split`` in ``cache`` that the model knows. The model's own routing is restored afterwards."""
    from ..train.finetune import SegmentationTask
    from ..train.validate import validate

    if cache.img_size != model.config.img_size:
        raise ValueError(f"{cache.path}: cache slices are {cache.img_size} px but the model takes "
                         f"{model.config.img_size} px; prepare a cache at the model's size")  # fmt: skip
    known = [n for n in model.dataset_names if n in cache.dataset_names]
    if not known:
        raise ValueError(f"{cache.path}: holds none of the model's datasets {model.dataset_names}")
    before = model.config.routing
    maps = SegmentationTask(model, cache, "soft", 1.0, 1.0, device)  # cache <-> model indices
    dice, gates = {}, {}
    try:
        for routing in ROUTING_MODES:
            model.set_routing(routing)
            result = validate(model, cache, device, batch_size, autocast, split, maps.dataset_map, maps.modality_map,
                              maps.model_to_cache_class)  # fmt: skip
            dice[routing] = {k: round(v, 4) for k, v in result["dataset_mean_dice"].items()}
            if routing == "soft":
                gates = result["gates"]
    finally:
        model.set_routing(before)
    report = routing_figures(gates, model.modalities, model.gate_names())
    report["dice"] = dice
    report["routing"] = before  # the model's own mode: what predict uses unless told otherwise
    report["datasets"] = known
    report["split"] = split
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as two tables: Dice per routing mode, then the gates per block."""
    datasets = report["datasets"]
    lines = ["| routing | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for routing, values in report["dice"].items():
        lines.append(f"| {routing} | " + " | ".join(f"{values.get(d, float('nan')):.3f}" for d in datasets) + " |")
    unused = report.get("routing") in ("hard", "uniform")
    if report.get("routing") == "hard":
        lines += ["", "This model routes hard (it was trained so): each modality through its own expert alone, so "
                  "its specialisation is 1, modality experts by construction. The gate figures below describe "
                  "its unused gate."]  # fmt: skip
    elif report.get("routing") == "uniform":
        lines += ["", "This model mixes its experts uniformly (it was trained so); its gate is unused."]
    if report.get("blocks"):
        experts, modalities = report["experts"], report["modalities"]
        lines += ["", ("Its unused gate: specialisation " if unused else "Specialisation ")
                  + f"{report['specialisation']:.3f} (0: every modality gets the same mixture, 1: "
                  f"each modality its own expert only); own-expert weight {report['own_expert_weight']:.3f} "
                  f"(uniform: {1 / len(experts):.3f}).", "",
                  "| block | specialisation | own expert | " + " | ".join(f"{m} -> ({', '.join(experts)})"
                                                                  for m in modalities) + " |",
                  "|---|---:|---:|" + "---|" * len(modalities)]  # fmt: skip
        for block in report["blocks"]:
            cells = [" / ".join(f"{w:.2f}" for w in block["weights"][m]) for m in modalities]
            lines.append(f"| {block['block']} | {block['specialisation']:.3f} | {block['own_expert_weight']:.3f} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"
