"""fp32 vs bf16 prediction with a trained bundle: time per volume, voxel agreement and Dice of each.

    python benchmarks/precision.py --model RUN/best --data ../shared/data/Dataset002_CHAOS_T2 \
        --dataset CHAOS --cases chaos_33 chaos_36 chaos_37 [--device cpu] [--routing hard]

Each case is predicted with the same bundle in both precisions (``Predictor(precision=...)``); Dice
is per foreground class against the case's reference label map, averaged over the classes present
in either map. Prints one line per case and precision and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from m4oe import load_bundle
from m4oe.data.io import read_volume
from m4oe.eval.metrics import nanmean
from m4oe.infer.predict import Predictor
from m4oe.train.validate import volume_dice


def dice(pred: np.ndarray, ref: np.ndarray, values: list[int]) -> float:
    """Mean Dice over the label values present in either map."""
    return nanmean(volume_dice(pred, ref, values).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="nnU-Net raw dataset folder")
    parser.add_argument("--dataset", required=True, help="the bundle's dataset name (label set, statistics)")
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--routing", default=None)
    args = parser.parse_args()
    predictors = {p: Predictor(load_bundle(args.model), args.device, routing=args.routing, precision=p)
                  for p in ("fp32", "bf16")}  # fmt: skip
    rows = []
    for case in args.cases:
        volume = read_volume(args.data / "imagesTr" / f"{case}_0000.nii.gz")
        reference = read_volume(args.data / "labelsTr" / f"{case}.nii.gz").array.astype(np.int64)
        maps = {}
        for precision, predictor in predictors.items():
            predictor.predict_volume(volume, args.dataset)  # warm-up: first-call allocations
            started = time.perf_counter()
            result = predictor.predict_volume(volume, args.dataset)
            seconds = time.perf_counter() - started
            maps[precision] = result.labels
            values = [v for v in result.label_values if v != 0]
            rows.append({"case": case, "precision": precision, "seconds": round(seconds, 2),
                         "dice": round(dice(result.labels, reference, values), 4)})  # fmt: skip
            print(f"{case:>28} {precision}: {seconds:6.2f} s  Dice {rows[-1]['dice']:.4f}")
        agreement = float((maps["fp32"] == maps["bf16"]).mean())
        rows[-1]["agreement_with_fp32"] = round(agreement, 6)
        print(f"{case:>28} voxels with the same label in both: {agreement:.4%}")
    summary = {}
    for precision in ("fp32", "bf16"):
        mine = [r for r in rows if r["precision"] == precision]
        summary[precision] = {"seconds": round(sum(r["seconds"] for r in mine), 2),
                              "mean_dice": round(float(np.nanmean([r["dice"] for r in mine])), 4)}  # fmt: skip
    summary["speedup"] = round(summary["fp32"]["seconds"] / summary["bf16"]["seconds"], 2)
    summary["min_agreement"] = min(r["agreement_with_fp32"] for r in rows if "agreement_with_fp32" in r)
    print(json.dumps({"cases": rows, "summary": summary}))


if __name__ == "__main__":
    main()
