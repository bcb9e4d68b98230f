"""``m4oe experts``: where the gate sends each token, block by block, for a scan.

For the slice with the most predicted foreground, every M4oE block's gate weights are drawn as a map
of the favoured expert (colour) and its weight (opacity) over the token grid. A table gives the mean
gate weight of every expert per block over the whole scan: do the experts specialise by modality?
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..files import check_output_dir, mark_output_dir, save_figure, write_csv, write_text
from ..infer.predict import Predictor
from ..model.head import class_argmax


@torch.no_grad()
def gate_maps(predictor: Predictor, volume, dataset: str | None, modality: str | None):
    """Per block: gates of every slice ``[Z, L, E]``; plus the fitted slices and their predictions."""
    request = predictor.resolve(dataset, modality)
    slices, _ = predictor.prepare(volume, request.normalization, request.flip, request.fov)
    per_block: list[list[torch.Tensor]] = []
    preds = []
    for part in predictor.engine.batches(slices, request.slices):
        preds.append(class_argmax(part.scores).cpu())
        for i, g in enumerate(part.gates):
            if len(per_block) <= i:
                per_block.append([])
            per_block[i].append(g.float().cpu())
    return [torch.cat(g) for g in per_block], slices, torch.cat(preds)


def block_names(model) -> list[str]:
    return model.gate_names()


def render_experts(predictor: Predictor, image: Path, out_dir: Path, dataset: str | None = None,
                   modality: str | None = None) -> dict:  # fmt: skip
    """Write ``experts.png``, ``experts.csv`` and ``experts.md`` for one scan; return the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.io import read_volume

    out_dir = check_output_dir(out_dir, "experts")
    model = predictor.model
    volume = read_volume(image)
    gates, slices, preds = gate_maps(predictor, volume, dataset, modality)
    if not gates:
        raise ValueError("this model has no M4oE layers (a dense baseline): nothing to show")
    names = block_names(model)
    experts = model.modalities
    z = int((preds > 0).flatten(1).sum(1).argmax())
    table = {name: g.mean(dim=(0, 1)).tolist() for name, g in zip(names, gates, strict=True)}
    table["all blocks"] = np.mean([v for v in table.values()], axis=0).tolist()

    colours = plt.get_cmap("tab10")(np.arange(len(experts)))[:, :3]
    cols = 4
    rows = 1 + (len(gates) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    axes[0, 0].imshow(slices[z].numpy(), cmap="gray")
    axes[0, 0].set_title(f"slice {z}")
    axes[0, 1].imshow(slices[z].numpy(), cmap="gray")
    axes[0, 1].imshow(np.ma.masked_equal(preds[z].numpy(), 0), cmap="tab20", alpha=0.5, interpolation="nearest")
    axes[0, 1].set_title("prediction")
    for k, (name, g) in enumerate(zip(names, gates, strict=True)):
        side = int(round(g.shape[1] ** 0.5))
        weights = g[z].view(side, side, -1).numpy()
        rgb = colours[weights.argmax(-1)]
        alpha = (weights.max(-1) - 1 / len(experts)) / (1 - 1 / len(experts) + 1e-9)
        ax = axes[1 + k // cols, k % cols]
        ax.imshow(np.dstack([rgb, np.clip(alpha, 0.15, 1)]), interpolation="nearest")
        ax.set_title(f"{name} ({side}x{side})", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    fig.legend(handles, [f"expert {m}" for m in experts], loc="upper right")
    fig.suptitle(f"{Path(image).name}: favoured expert per token (opacity: gate weight)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    mark_output_dir(out_dir, "experts")
    save_figure(fig, out_dir / "experts.png", dpi=80)
    plt.close(fig)
    _write_table(table, experts, out_dir)
    return table


def _write_table(table: dict[str, list[float]], experts: list[str], out_dir: Path) -> None:
    rows = [{"block": name, **{e: f"{w:.4f}" for e, w in zip(experts, weights, strict=True)}}
            for name, weights in table.items()]  # fmt: skip
    write_csv(out_dir / "experts.csv", rows, ["block", *experts])
    lines = ["| block | " + " | ".join(experts) + " |", "|" + "---|" * (len(experts) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{w:.3f}" for w in weights) + " |" for name, weights in table.items()]
    write_text(out_dir / "experts.md", "\n".join(lines) + "\n")
