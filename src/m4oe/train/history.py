"""What a run records: ``metrics.csv`` and ``curve.png`` per epoch, ``organ_dice.csv`` per validation,
and the progress bar."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import save_figure, write_csv


@dataclass
class History:
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: float = -math.inf

    def write(self, out: Path) -> None:
        if not self.rows:
            return
        write_csv(out / "metrics.csv", self.rows, list(dict.fromkeys(k for row in self.rows for k in row)))
        plot_curves(self.rows, out / "curve.png")


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [r["loss"] for r in rows], label="training loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val = [(r["epoch"], r["val_dice"]) for r in rows if r.get("val_dice") not in (None, "")]
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation Dice")
        twin.set_ylabel("validation Dice")
        twin.set_ylim(0, 1)
        fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


ORGAN_DICE_COLUMNS = ("epoch", "dataset", "organ", "dice", "dice_postprocessed")


def record_organ_dice(path: Path, epoch: int, result: dict) -> None:
    """Add one validation's Dice per dataset and organ to ``path`` (one row each), so that an organ
    lost along the way shows when it went; rows of this or later epochs (left by a run that was
    resumed from an earlier checkpoint) are replaced."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
    post = result.get("dice_postprocessed", {})
    for name, organs in result["dice"].items():
        for organ, dice in organs.items():
            rows.append({"epoch": epoch, "dataset": name, "organ": organ, "dice": round(dice, 5),
                         "dice_postprocessed": round(post.get(name, {}).get(organ, float("nan")), 5)})  # fmt: skip
    write_csv(path, rows, ORGAN_DICE_COLUMNS)


class _NoBar:
    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)
