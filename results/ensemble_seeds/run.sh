#!/bin/bash
# Issue #31: the ensemble of the reference model's two seeds against each seed alone, on the validation
# cases of the recipe's cache, in their own files (m4oe predict + m4oe evaluate, defaults otherwise).
#   bash results/ensemble_seeds/run.sh BUNDLE_SEED0 BUNDLE_SEED1 CACHE WORK [TABLE]   (WORK: outside the repository)
# TABLE: the markdown table to write (default results/ensemble_seeds/ensemble_vs_seeds.md)
set -e
A=$1; B=$2; CACHE=$3; WORK=$4; TABLE=${5:-results/ensemble_seeds/ensemble_vs_seeds.md}
cd "$(dirname "$0")/../.."
python3 results/link_validation_cases.py "$CACHE" "$WORK"
for name in BTCV CHAOS ACDC; do
  root=$(python3 -c "import json; m=json.load(open('$CACHE/meta.json')); print([d['path'] for d in m['datasets'] if d['name']=='$name'][0])")
  for run in seed0 seed1 ensemble; do
    case $run in seed0) models="-m $A";; seed1) models="-m $B";; ensemble) models="-m $A -m $B";; esac
    out="$WORK/$name/$run"
    [ -f "$out/summary.json" ] && continue
    /usr/bin/time -f "%e" -o "$WORK/$name/$run.seconds" m4oe predict $models -i "$WORK/$name/images" -o "$out" \
        --dataset "$name" --precision fp32 > "$WORK/$name/$run.log" 2>&1
    m4oe evaluate --gt "$WORK/$name/labels" --pred "$out" --labels "$root/dataset.json" -o "$out/summary.json" > /dev/null
  done
done
python3 - "$WORK" <<'PY' | tee "$TABLE"
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
synapse = {"aorta", "gallbladder", "right_kidney", "left_kidney", "liver", "pancreas", "spleen", "stomach"}
print("| dataset | seed 0 | seed 1 | ensemble (mean softmax) | predict s (seed 0 / seed 1 / both) |")
print("|---|---:|---:|---:|---:|")
for name in ("BTCV", "BTCV 8 (Synapse)", "CHAOS", "ACDC"):
    folder = name.split()[0]
    cells, secs = [], []
    for run in ("seed0", "seed1", "ensemble"):
        summary = json.loads((work / folder / run / "summary.json").read_text())
        if name.startswith("BTCV 8"):
            names = summary["label_names"]
            dice = [v["Dice"] for k, v in summary["mean"].items() if names.get(k) in synapse]
            cells.append(f"{sum(dice) / len(dice):.4f}")
        else:
            cells.append(f"{summary['foreground_mean']['Dice']:.4f}")
        secs.append((work / folder / f"{run}.seconds").read_text().strip().splitlines()[-1])
    print(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(secs)} |")
PY
