#!/bin/bash
# Issue #29, build 2 (exploratory, one seed): phase 2 of the reference recipe for 6,000 slices from one
# shared phase-1 run, with no routing aid, the auxiliary routing loss, and the routing curriculum; then
# the routing report (specialisation, Dice under soft / hard / uniform routing) on the validation cases.
# Usage: bash results/specialise/run.sh PRETRAIN_RUN CACHE RUNS   (RUNS: a folder outside the repository)
set -e
PRETRAIN=$1; CACHE=$2; RUNS=$3
cd "$(dirname "$0")/../.."
for variant in "plain:" "route:train.route_weight=0.1" "handover:train.handover=0.5"; do
  name=${variant%%:*}; words=${variant#*:}
  out=$RUNS/$name
  [ -f "$out/last/model.safetensors" ] || m4oe train configs/cpu_reference.yaml -o "$out" --cache "$CACHE" \
      --init "$PRETRAIN" --set train.minutes=null --set train.samples_per_epoch=1200 --set train.seed=0 \
      ${words:+--set $words}
  m4oe routing -m "$out/last" --cache "$CACHE" -o "$out/routing.json"
  mkdir -p results/specialise/$name
  cp "$out/routing.json" "$out/routing.md" "$out/metrics.csv" results/specialise/$name/
done
