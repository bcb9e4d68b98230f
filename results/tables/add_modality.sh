#!/bin/bash
# Issue #29, the paper's Table 3 analogue: a CT + MRI model (BTCV + CHAOS: phase 1 on its two modalities, then
# phase 2 for 28,000 slices of configs/cpu_reference.yaml without ACDC) given cine MRI (ACDC) with
# `m4oe add-modality` for 9,335 slices (5 x 1,867, ACDC's third of a joint run), with the old experts frozen
# (--freeze-old) or everything fine-tuned with BTCV and CHAOS replayed (--full), all with the recipe's routing
# (hard since session 20). The joint model trained on all three from the start is results/tables/run.sh's hard row.
# Usage: bash results/tables/add_modality.sh SEED CACHE RUNS   (CACHE: the reference cache, all three datasets)
set -e
SEED=$1; CACHE=$2; RUNS=$3
cd "$(dirname "$0")/../.."
config=$RUNS/ct_mri.yaml
python3 - "$config" <<'PY'
import sys, yaml
recipe = yaml.safe_load(open("configs/cpu_reference.yaml"))
recipe["datasets"] = [d for d in recipe["datasets"] if d["name"] != "ACDC"]
for d in recipe["datasets"]:  # paths stay those of the recipe, written from where the new file lies
    d["path"] = str((__import__("pathlib").Path("configs") / d["path"]).resolve())
open(sys.argv[1], "w").write(yaml.safe_dump(recipe, sort_keys=False))
PY
budget=(--set train.minutes=null --set train.epochs=5 --set train.seed="$SEED")
pre=$RUNS/pretrain_ctmri_seed$SEED; base=$RUNS/ct_mri_seed$SEED
[ -d "$pre/last" ] || m4oe pretrain "$config" -o "$pre" --cache "$CACHE" --set train.seed="$SEED"
if [ ! -f "$base/done" ]; then
  start=$(date +%s)
  m4oe train "$config" -o "$base" --cache "$CACHE" --init "$pre" "${budget[@]}" --set train.samples_per_epoch=5600
  echo $(( $(date +%s) - start )) > "$base/done"
fi
for mode in freeze-old full; do
  out=$RUNS/add_${mode/-/_}_seed$SEED
  if [ ! -f "$out/done" ]; then
    start=$(date +%s)
    m4oe add-modality --model "$base/last" --config configs/cpu_reference.yaml -o "$out" --cache "$CACHE" --$mode \
        "${budget[@]}" --set train.samples_per_epoch=1867
    echo $(( $(date +%s) - start )) > "$out/done"
  fi
done
for run in ct_mri add_freeze_old add_full; do
  keep=results/tables/${run}_seed$SEED; mkdir -p "$keep"
  cp "$RUNS/${run}_seed$SEED/metrics.csv" "$keep/"
  cp "$RUNS/${run}_seed$SEED/done" "$keep/wall_seconds"
  if [ -f "$RUNS/${run}_seed$SEED/added.json" ]; then cp "$RUNS/${run}_seed$SEED/added.json" "$keep/"; fi
done
