"""Per structure and case: the uncertainty score of `predict --uncertainty --statistics` against the
Dice of `m4oe evaluate`; the Dice of the most uncertain quarter against the rest, and rank correlations."""

import csv
import json
import sys
from pathlib import Path

import numpy as np

work = Path(sys.argv[1])
rows = []
for dataset in ("BTCV", "CHAOS", "ACDC"):
    summary = json.loads((work / dataset / "summary.json").read_text())
    dice = {}
    for case in summary["metric_per_case"]:
        name = Path(case["prediction_file"]).name.removesuffix(".nii.gz")
        for label, metrics in case["metrics"].items():
            dice[(name, int(label))] = metrics["Dice"]
    with open(work / dataset / "pred" / "statistics.csv") as f:
        for r in csv.DictReader(f):
            key = (r["case"], int(r["label"]))
            if r["entropy_mean"] and key in dice and dice[key] == dice[key]:  # predicted and scored
                rows.append((dataset, float(r["entropy_mean"]), float(r["disagreement_mean"] or "nan"), dice[key]))


def ranks(x):
    return np.argsort(np.argsort(x)).astype(float)


def spearman(a, b):
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


print(
    "| cases | structures | score | Dice, most uncertain quarter | Dice, other three quarters | Spearman (score, Dice) |"
)
print("|---|---:|---|---:|---:|---:|")
for name, subset in (("all", rows), *((d, [r for r in rows if r[0] == d]) for d in ("BTCV", "CHAOS", "ACDC"))):
    if len(subset) < 4:
        continue
    dice = np.array([r[3] for r in subset])
    for label, column in (("entropy", 1), ("disagreement", 2)):
        score = np.array([r[column] for r in subset])
        if np.isnan(score).all():  # a dense or hard-routed model gives the entropy alone
            continue
        top = score >= np.quantile(score, 0.75)
        print(
            f"| {name} | {len(subset)} | {label} | {dice[top].mean():.3f} | {dice[~top].mean():.3f} | "
            f"{spearman(score, dice):+.2f} |"
        )
