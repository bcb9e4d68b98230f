#!/bin/bash
# Issue #29, the paper's Tables 2 and 4 at the reference budget: phase 2 of configs/cpu_reference.yaml for a fixed
# 28,000 slices (5 validations of 5,600), one row and seed per call; M4oE rows also get the routing report
# (specialisation; Dice under soft / hard / uniform routing) on the validation cases.
# Usage: bash results/tables/run.sh ROW SEED PRETRAIN CACHE RUNS
#   PRETRAIN: the phase-1 run of that seed (m4oe pretrain configs/cpu_reference.yaml --set train.seed=SEED)
#   RUNS: a folder outside the repository; small files are copied to results/tables/ROW_seedSEED/
# Rows: m4oe (the recipe with its learnt gate, as it was until session 20), route (train.route_weight=0.1),
#       no_phase1, dense (its dense twin, convnext-unet-s),
#       shared (model.shared_expert=true, with its own phase 1 in RUNS/pretrain_shared_seedSEED),
#       hard (trained with each sample through its own modality's expert only: modality experts by construction,
#       the recipe since session 20), hard_no_phase1 (the same without phase 1),
#       per_modality (one dense model per modality, 28,000 slices in all), enc_only / dec_only (experts in one half;
#       no phase 1, against no_phase1), uniform (mean of experts, no gate; no phase 1).
# Each row names its routing, so a row means the same whatever the recipe's default is.
set -e
ROW=$1; SEED=$2; PRETRAIN=$3; CACHE=$4; RUNS=$5
cd "$(dirname "$0")/../.."
init=(--init "$PRETRAIN"); per_epoch=5600; routing=yes
gate=(--set train.routing=soft)
case $ROW in
  m4oe) words=("${gate[@]}") ;;
  route) words=("${gate[@]}" --set train.route_weight=0.1) ;;
  hard) words=(--set train.routing=hard) ;;
  hard_no_phase1) words=(--set train.routing=hard); init=() ;;
  shared) words=("${gate[@]}" --set model.shared_expert=true); init=(--init "$RUNS/pretrain_shared_seed$SEED")
          [ -d "$RUNS/pretrain_shared_seed$SEED/last" ] || m4oe pretrain configs/cpu_reference.yaml \
              -o "$RUNS/pretrain_shared_seed$SEED" --cache "$CACHE" --set train.seed="$SEED" "${words[@]}" ;;
  no_phase1) words=("${gate[@]}"); init=() ;;
  dense) words=(--set model.preset=convnext-unet-s); init=(); routing=no ;;
  per_modality) words=(--set model.preset=convnext-unet-s --set train.baseline=per_modality); init=(); routing=no
                per_epoch=1867 ;;  # x 3 modalities x 5 epochs = 28,005 slices
  enc_only) words=("${gate[@]}" --set model.moe_decoder=false); init=() ;;
  dec_only) words=("${gate[@]}" --set model.moe_encoder=false); init=() ;;
  uniform) words=(--set train.routing=uniform); init=(); routing=no ;;
  *) echo "unknown row $ROW"; exit 2 ;;
esac
out=$RUNS/${ROW}_seed$SEED
keep=results/tables/${ROW}_seed$SEED
if [ ! -f "$out/done" ]; then
  start=$(date +%s)
  m4oe train configs/cpu_reference.yaml -o "$out" --cache "$CACHE" "${init[@]}" --set train.minutes=null \
      --set train.epochs=5 --set train.samples_per_epoch=$per_epoch --set train.seed="$SEED" "${words[@]}"
  echo $(( $(date +%s) - start )) > "$out/done"
fi
mkdir -p "$keep"
cp "$out/done" "$keep/wall_seconds"
for f in $(cd "$out" && find . -name metrics.csv); do mkdir -p "$keep/$(dirname "$f")"; cp "$out/$f" "$keep/$f"; done
if [ $routing = yes ]; then
  [ -f "$out/routing.json" ] || m4oe routing -m "$out/last" --cache "$CACHE" -o "$out/routing.json"
  cp "$out/routing.json" "$out/routing.md" "$keep/"
fi
