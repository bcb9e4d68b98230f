#!/bin/bash
# Issue #29, build 2: the same fixed-slice reference run (12,000 phase-2 slices, 5,600 phase-1, seed 0)
# with no routing aid, the auxiliary routing loss, and the routing curriculum; then the routing report
# (specialisation, Dice under soft / hard / uniform routing) of each on the validation cases.
# Usage: bash results/specialise/run.sh RUNS CACHE [SEED]   (RUNS: a folder outside the repository)
set -e
RUNS=$1; CACHE=$2; SEED=${3:-0}
cd "$(dirname "$0")/../.."
for variant in "plain:" "route:train.route_weight=0.1" "handover:train.handover=0.5"; do
  name=${variant%%:*}; words=${variant#*:}
  out=$RUNS/${name}_seed$SEED
  [ -f "$out/reference.json" ] || python experiments/cpu_reference.py --out "$out" --cache "$CACHE" \
      --slices 12000 --seed "$SEED" ${words:+--set $words}
  m4oe routing -m "$out/train/last" --cache "$CACHE" -o "$out/routing.json"
  mkdir -p results/specialise/${name}_seed$SEED
  cp "$out/reference.json" "$out/routing.json" "$out/routing.md" "$out/train/metrics.csv" results/specialise/${name}_seed$SEED/
done
