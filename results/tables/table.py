"""The tables of issue #29 from the small files results/tables/run.sh keeps (ROW_seedSEED/).

Per row: the last validation's mean Dice per dataset (the mean of the seeds, with the spread max - min),
the mean over the three datasets, and for M4oE rows the routing report: specialisation, and hard
routing's Dice minus soft routing's per dataset (the cost of the fast path); Table 3 also gives each seed's
wall minutes (of the addition alone for the add rows). Writes tables.md beside it.
Usage: python results/tables/table.py
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

HERE = Path(__file__).parent
DATASETS = ("BTCV", "CHAOS", "ACDC")
TABLES = {
    "Table 2 analogue: M4oE against its dense twin, one model per modality, and without phase 1": [
        "m4oe", "shared", "route", "route_2threads", "hard", "dense", "per_modality", "no_phase1", "hard_no_phase1"],
    "Table 4 analogue (no phase 1 in every row): where the experts are, and the gate": [
        "no_phase1", "enc_only", "dec_only", "uniform"],
}  # fmt: skip


def read_metrics(folder: Path) -> tuple[dict[str, float], float | None]:
    """From every metrics.csv under ``folder`` (per-modality runs: one per sub-run), read once: the Dice per
    dataset at the last validation, and the training slices/s of the fastest epoch (runs shared the machine;
    the fastest is the least disturbed)."""
    dice, speeds = {}, []
    for path in sorted(folder.glob("**/metrics.csv")):
        rows = list(csv.DictReader(path.open()))
        speeds += [float(r["slices_per_s"]) for r in rows]
        validated = [r for r in rows if r.get("val_dice")]
        for d in DATASETS:
            if validated and validated[-1].get(f"val_dice_{d}"):
                dice[d] = float(validated[-1][f"val_dice_{d}"])
    return dice, max(speeds) if speeds else None


def runs() -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for folder in sorted(HERE.iterdir()):
        match = re.fullmatch(r"(\w+)_seed(\d+)", folder.name)
        if not match or not folder.is_dir():
            continue
        dice, speed = read_metrics(folder)
        run = {"seed": int(match[2]), "dice": dice, "speed": speed}
        if (folder / "wall_seconds").is_file():
            run["minutes"] = int((folder / "wall_seconds").read_text()) / 60
        if (folder / "added.json").is_file():
            run["added"] = json.loads((folder / "added.json").read_text())["total"]
        if (folder / "routing.json").is_file():
            run["routing"] = json.loads((folder / "routing.json").read_text())
        found.setdefault(match[1], []).append(run)
    return found


def cell(values: list[float]) -> str:
    if not values:
        return ""
    mean = sum(values) / len(values)
    return f"{mean:.3f} ({max(values) - min(values):.3f})" if len(values) > 1 else f"{mean:.3f} (one seed)"


def row_cells(name: str, seeds: list[dict]) -> list[str]:
    dice = [cell([s["dice"][d] for s in seeds if d in s["dice"]]) for d in DATASETS]
    means = [sum(s["dice"][d] for d in DATASETS) / 3 for s in seeds if all(d in s["dice"] for d in DATASETS)]
    routed = [s["routing"] for s in seeds if "routing" in s]
    spec = cell([r["specialisation"] for r in routed if r.get("specialisation") is not None])
    cost = " / ".join(cell([r["dice"]["hard"][d] - r["dice"]["soft"][d] for r in routed]) for d in DATASETS)
    if routed and all(r.get("routing") == "hard" for r in routed):
        spec, cost = "1 (trained hard)", "0 (its own routing)"
    speed = [s["speed"] for s in seeds if s.get("speed")]
    return [name, ", ".join(str(s["seed"]) for s in seeds), *dice, cell(means), spec, cost if routed else "",
            " / ".join(f"{v:.1f}" for v in speed)]  # fmt: skip


def main() -> None:
    found = runs()
    lines = ["Mean validation Dice of the last validation (mean of the seeds, spread max - min in brackets); hard - "
             "soft: Dice under hard routing minus soft routing (BTCV / CHAOS / ACDC); slices/s: training slices/s "
             "of each seed's fastest epoch, two runs sharing the 2 cores (one thread each).", ""]  # fmt: skip
    for title, names in TABLES.items():
        lines += [f"### {title}", "", "| row | seeds | " + " | ".join(DATASETS) + " | mean | specialisation | "
                  "hard - soft | slices/s |", "|---|---|" + "---:|" * 5 + "---|---:|"]  # fmt: skip
        lines += ["| " + " | ".join(row_cells(n, found[n])) + " |" for n in names if n in found]
        lines.append("")
    lines += ["### Table 3 analogue: a CT + MRI model (BTCV + CHAOS) given cine MRI (ACDC) by add-modality",
              "", "| row | seeds | " + " | ".join(DATASETS) + " | parameters added | minutes | slices/s |",
              "|---|---|" + "---:|" * 3 + "---:|---:|---:|"]  # fmt: skip
    for name in ("ct_mri", "add_freeze_old", "add_full", "hard"):  # hard: the recipe's joint model
        if name in found:
            cells = row_cells(name, found[name])
            added = {s.get("added") for s in found[name]} - {None}
            minutes = " / ".join(f"{s['minutes']:.1f}" for s in found[name] if "minutes" in s)
            cells = [*cells[:5], f"{added.pop():,}" if added else "", minutes, cells[-1]]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    (HERE / "tables.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
