"""Learning benchmark: validation Dice per dataset along training, at a fixed budget of slices.

Every variant trains on the same data and validation cases (``experiments/base.yaml`` unless
``--config``), the same slice cache (fixed input size) and the same number of training slices, and is
validated at ``--points`` evenly spaced points (a learning curve). It prints and writes, per variant
and seed: Dice per dataset at each point, wall time and slices/s (``learning.json``, ``learning.md``).

A variant is a name followed by ``m4oe train --set`` words (``model.preset=convnext-unet-s``,
``train.lr=0.01``, ``datasets.ACDC.fov=0.8``), in one quoted argument; ``slices=N`` replaces
``--slices`` for that variant (one model per modality at equal total slices: ``slices`` = budget /
modalities). ``--set`` words apply to every variant, before the variant's own. ``--ood DATA`` also
scores each model on the TotalSegmentator sample scans under ``DATA`` (``experiments/ood.py``). Examples::

    python benchmarks/learning.py --cache cache/base128 --slices 14400 --points 4 --seeds 0 1 \\
        --variant "m4oe model.preset=m4oe-convnext-s" --variant "dense model.preset=convnext-unet-s" \\
        --variant "per_modality model.preset=convnext-unet-s train.baseline=per_modality slices=4800" \\
        --out runs/learning
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import yaml

from m4oe.config import ConfigError, apply_overrides, parse_experiment
from m4oe.train.finetune import run_train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
CASE_NAMES = ("CT", "MR")  # experiments/ood.py's sample scans


def parse_variant(text: str) -> tuple[str, list[str], int | None]:
    """``NAME WORD ...`` -> (name, its ``--set`` words, its ``slices=N`` or None)."""
    name, *words = text.split()
    if not name or "=" in name:
        raise SystemExit(f"--variant {text!r}: expected NAME followed by SECTION.KEY=VALUE words")
    budget = [w for w in words if w.startswith("slices=")]
    slices = int(budget[-1].removeprefix("slices=")) if budget else None
    return name, [w for w in words if not w.startswith("slices=")], slices


def curve(run: Path) -> list[dict]:
    """Validation rows of a run's metrics.csv (every per-modality sub-run merged by epoch), with the
    training seconds up to each point (validation excluded; the sub-runs' seconds added up)."""
    files = sorted(run.glob("**/metrics.csv"))
    points: dict[int, dict] = {}
    for path in files:
        elapsed = 0.0
        with open(path) as f:
            for row in csv.DictReader(f):
                elapsed += float(row["epoch_seconds"])
                if not row.get("val_dice"):
                    continue
                point = points.setdefault(int(row["epoch"]), {"epoch": int(row["epoch"]), "seconds": 0.0})
                point["seconds"] = round(point["seconds"] + elapsed, 2)
                for key, value in row.items():
                    if key.startswith("val_dice_") and value:
                        point[key.removeprefix("val_dice_")] = float(value)
    return [points[k] for k in sorted(points)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "experiments" / "base.yaml")
    parser.add_argument("--cache", type=Path, required=True, help="slice cache (its size is the input size)")
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--slices", type=int, default=14400, help="training slices per model")
    parser.add_argument("--points", type=int, default=4, help="validations along training")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--datasets", nargs="*", help="restrict to these dataset names")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                        help="m4oe train --set words shared by every variant, e.g. train.lr=0.01")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ood", type=Path, metavar="DATA", help="score each model on DATA/samples/totalsegmentator")
    args = parser.parse_args()

    base = yaml.safe_load(args.config.read_text())
    if args.datasets:
        base["datasets"] = [d for d in base["datasets"] if d.get("name") in args.datasets]
    results = []
    for text in args.variant:
        name, words, slices = parse_variant(text)
        slices = slices or args.slices
        for seed in args.seeds:
            budget = [f"train.seed={seed}", f"train.epochs={args.points}",
                      f"train.samples_per_epoch={slices // args.points}", "train.val_every=1"]  # fmt: skip
            try:
                values = apply_overrides({**base, "train": {**base.get("train", {}), "workers": 2}},
                                         [*args.set, *words, *budget])  # fmt: skip
                experiment = parse_experiment(values, base_dir=args.config.parent, source=f"{name} seed {seed}")
            except ConfigError as err:
                raise SystemExit(f"--variant {text!r}: {err}") from None
            preset, model, train = experiment.preset, experiment.model_overrides, [*args.set, *words]
            out = args.out / f"{name}_seed{seed}"
            started = time.perf_counter()
            run_train(experiment, out, cache_dir=args.cache, progress=False)
            seconds = time.perf_counter() - started
            models = len(list(out.glob("**/metrics.csv")))  # one per modality for that baseline
            result = {"variant": name, "preset": preset, "model": model, "train": train, "seed": seed,
                      "slices": slices * models, "seconds": round(seconds, 1),
                      "slices_per_s": round(slices * models / seconds, 1), "curve": curve(out)}  # fmt: skip
            if args.ood and (out / "last").is_dir():
                from ood import score_samples

                result["ood"] = {k: v["mean"] for k, v in score_samples(out / "last", args.ood).items()}
            results.append(result)
            print(json.dumps(result), flush=True)
            write(args.out, results)


def write(out: Path, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(results, indent=2))
    datasets = sorted({k for r in results for p in r["curve"] for k in p if k not in ("epoch", "seconds")})
    lines = [
        "| variant | seed | slices seen | training s | " + " | ".join(datasets) + " | wall s | slices/s |",
        "|---|---:|---:|---:|" + "---:|" * len(datasets) + "---:|---:|",
    ]
    for r in results:
        points = len(r["curve"])
        for i, point in enumerate(r["curve"]):
            seen = r["slices"] * point["epoch"] // max(p["epoch"] for p in r["curve"])
            cells = " | ".join(f"{point.get(d, float('nan')):.3f}" for d in datasets)
            timing = f"{r['seconds']} | {r['slices_per_s']}" if i == points - 1 else " | "
            lines.append(f"| {r['variant']} | {r['seed']} | {seen} | {point.get('seconds', '')} | {cells} | {timing} |")
    lines += ["", *summary(results, datasets)]
    if any("ood" in r for r in results):
        lines += [
            "",
            "Out of distribution (experiments/ood.py: TotalSegmentator sample scans, headline mean Dice):",
            "",
            "| variant | seed | " + " | ".join(CASE_NAMES) + " |",
            "|---|---:|" + "---:|" * len(CASE_NAMES),
        ]
        for r in results:
            if "ood" in r:
                lines.append(
                    f"| {r['variant']} | {r['seed']} | "
                    + " | ".join(f"{r['ood'].get(k, float('nan')):.3f}" for k in CASE_NAMES)
                    + " |"
                )
    (out / "learning.md").write_text("\n".join(lines) + "\n")


def summary(results: list[dict], datasets: list[str]) -> list[str]:
    """Per variant, the last point averaged over seeds, with the spread (max - min) between seeds."""
    lines = [
        "| variant | seeds | " + " | ".join(f"{d} (spread)" for d in datasets) + " | training s |",
        "|---|---:|" + "---:|" * len(datasets) + "---:|",
    ]
    for name in dict.fromkeys(r["variant"] for r in results):
        last = [r["curve"][-1] for r in results if r["variant"] == name and r["curve"]]
        if not last:
            continue
        cells = []
        for d in datasets:
            values = [p[d] for p in last if d in p]
            spread = max(values) - min(values) if len(values) > 1 else float("nan")
            cells.append(f"{sum(values) / len(values):.3f} ({spread:.3f})" if values else "")
        seconds = sum(p.get("seconds", 0.0) for p in last) / len(last)
        lines.append(f"| {name} | {len(last)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return lines


if __name__ == "__main__":
    main()
