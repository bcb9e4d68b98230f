#!/bin/bash
# The hour-long reference runs of docs/results.md section 1 (results/cpu_reference_hu_seed0/, _seed1/,
# results/cpu_reference_hard_seed0/, _seed1/): phase 1 and phase 2 of configs/cpu_reference.yaml with one seed,
# the wall time of each stamped around the commands (RUN/t0, t1, t2; the kept wall.txt is t1 - t0 and t2 - t0).
# Words after RUN go to phase 2 only, e.g. --set train.routing=hard (phase 1 does not depend on them).
# Usage: bash results/cpu_reference_hu.sh SEED CACHE RUN [--set SECTION.KEY=VALUE ...]
set -e
SEED=$1; CACHE=$2; R=$3
shift 3
cd "$(dirname "$0")/.."
mkdir -p "$R"
date +%s > "$R/t0"
m4oe pretrain configs/cpu_reference.yaml -o "$R/pretrain" --cache "$CACHE" --set train.seed="$SEED"
date +%s > "$R/t1"
m4oe train configs/cpu_reference.yaml -o "$R/train" --cache "$CACHE" --init "$R/pretrain" --set train.seed="$SEED" "$@"
date +%s > "$R/t2"
