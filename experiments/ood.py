"""Out-of-distribution check: a bundle on the TotalSegmentator sample scans, which no m4oe model
trains on (a CT in Hounsfield units and an abdominal MRI, both 3 mm, from other scanners than BTCV's
and CHAOS's), scored against TotalSegmentator's own masks for the organs the model knows.

    python experiments/ood.py -m RUN/train/last --data ../shared/data [--json OUT.json]

TotalSegmentator's masks are a strong model's output, not expert labels: a fair check of whether an
organ is found at all. The headline is the mean over liver, spleen, both kidneys and aorta on the CT
(issue #30's target: 0.75) and over the four CHAOS organs on the MRI. ``predict``'s defaults are used
(``--dataset``, automatic orientation, its intensity checks); its warnings are reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SAMPLES = "samples/totalsegmentator"
# scan, its TotalSegmentator mask, the class map's task, the dataset asked for, the organs of the headline
CASES = {
    "CT": ("example_ct_sm.nii.gz", "example_seg.nii.gz", "total", "BTCV",
           ["liver", "spleen", "right_kidney", "left_kidney", "aorta"]),
    "MR": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "total_mr", "CHAOS",
           ["liver", "spleen", "right_kidney", "left_kidney"]),
}  # fmt: skip


def m4oe_name(totalseg_name: str) -> str:
    """TotalSegmentator's ``kidney_right`` is m4oe's (BTCV's) ``right_kidney``; other names agree."""
    for side in ("right", "left"):
        if totalseg_name.endswith(f"_{side}"):
            return f"{side}_{totalseg_name.removesuffix(f'_{side}')}"
    return totalseg_name


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else float("nan")


def score_samples(bundle: str | Path, data: str | Path) -> dict:
    """Per sample scan: Dice per organ the model and TotalSegmentator share, the headline mean, the
    warnings ``predict`` gave; a scan whose dataset the model lacks is left out."""
    from m4oe import load_bundle
    from m4oe.data.io import read_volume
    from m4oe.infer.predict import Predictor

    folder = Path(data) / SAMPLES
    class_maps = json.loads((folder / "class_maps_total_and_total_mr.json").read_text())
    predictor = Predictor(load_bundle(bundle), device="cpu")
    out = {}
    for kind, (scan, mask, task, dataset, headline) in CASES.items():
        if dataset not in predictor.model.dataset_names:
            continue
        result = predictor.predict_volume(read_volume(folder / scan), dataset)
        reference = read_volume(folder / mask).array
        ours = dict(zip(result.class_names, result.label_values, strict=True))
        organs = {}
        for value, name in class_maps[task].items():
            name = m4oe_name(name)
            if name in ours and name != "background":
                organs[name] = round(dice(result.labels == ours[name], reference == int(value)), 4)
        mean = float(np.mean([organs[o] for o in headline]))
        out[kind] = {"scan": scan, "dataset": dataset, "organs": organs, "headline": headline,
                     "mean": round(mean, 4), "warnings": result.warnings}  # fmt: skip
    return out


def markdown(scores: dict) -> str:
    lines = ["| sample scan | --dataset | mean Dice (headline organs) | per organ |", "|---|---|---:|---|"]
    for entry in scores.values():
        organs = ", ".join(f"{k} {v:.2f}" for k, v in entry["organs"].items())
        lines.append(f"| {entry['scan']} | {entry['dataset']} | {entry['mean']:.3f} ({', '.join(entry['headline'])}) "
                     f"| {organs} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", type=Path, required=True, help="model bundle (e.g. RUN/train/last)")
    parser.add_argument("--data", type=Path, required=True, help="the folder holding samples/totalsegmentator")
    parser.add_argument("--json", type=Path, help="also write the scores here")
    args = parser.parse_args()
    scores = score_samples(args.model, args.data)
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2))
    print(markdown(scores), end="")
    for entry in scores.values():
        for text in entry["warnings"]:
            print(f"{entry['scan']}: {text}")


if __name__ == "__main__":
    main()
