#!/bin/bash
# Issue #31, item 5: how the per-structure uncertainty score relates to the structure's Dice, on the
# validation cases of the recipe's cache, with one bundle. Usage:
#   bash results/uncertainty/run.sh BUNDLE CACHE WORK [REPORT]   (WORK: a folder outside the repository;
#   REPORT: the table's file, relative to the repository root; default results/uncertainty/uncertainty_vs_dice.md)
set -e
BUNDLE=$1; CACHE=$2; WORK=$3; REPORT=${4:-results/uncertainty/uncertainty_vs_dice.md}
cd "$(dirname "$0")/../.."
python3 results/link_validation_cases.py "$CACHE" "$WORK"
for name in BTCV CHAOS ACDC; do
  root=$(python3 -c "import json; m=json.load(open('$CACHE/meta.json')); print([d['path'] for d in m['datasets'] if d['name']=='$name'][0])")
  [ -f "$WORK/$name/pred/statistics.csv" ] || m4oe predict -m "$BUNDLE" -i "$WORK/$name/images" -o "$WORK/$name/pred" \
      --dataset "$name" --uncertainty --statistics
  m4oe evaluate --gt "$WORK/$name/labels" --pred "$WORK/$name/pred" --labels "$root/dataset.json" \
      -o "$WORK/$name/summary.json" > /dev/null
done
python3 results/uncertainty/analyse.py "$WORK" > "$REPORT"
cat "$REPORT"
