#!/usr/bin/env bash
# All GPU figures of docs/benchmarks.md in one run (one device session). Usage:
#   bash benchmarks/gpu_suite.sh OUT_DIR [BUDGET_SECONDS]
# Runs from the repository root with PYTHONPATH=src (no install needed); each step has its own time
# limit and later steps are skipped when the budget is spent, so partial results still come back.
set -u
OUT=${1:-/tmp/m4oe_gpu}
BUDGET=${2:-540}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
START=$(date +%s)
PEAK=${PEAK_TFLOPS:-790}
if [ "$QUICK" = 1 ]; then P=tiny; EXTRA="--batch 4 --infer-batch 4 --steps 2 --warmup 1"; DEV="--device cpu"; else P=m4oe-t; EXTRA=""; DEV=""; fi
if [ "$QUICK" = 1 ]; then LITE=tiny; DENSE=tiny; else LITE=m4oe-t-lite; DENSE=swin-unet; fi

step() {  # step NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped (budget spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?"
  tail -n 30 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step eager_bf16 150 python -m m4oe.cli bench --preset $P,$DENSE,$LITE --precision bf16 --peak-tflops $PEAK $EXTRA $DEV --json "$OUT/eager_bf16.json"
step eager_hard 60 python -m m4oe.cli bench --preset $P,$LITE --routing hard --precision bf16 --peak-tflops $PEAK $EXTRA $DEV --json "$OUT/eager_hard.json"
step eager_fp32 90 python -m m4oe.cli bench --preset $P,$DENSE --precision fp32 $EXTRA $DEV --json "$OUT/eager_fp32.json"
step profile 60 python benchmarks/profile_step.py --preset $P $( [ "$QUICK" = 1 ] && echo "--batch 4 --device cpu" )
step compiled_soft 200 python -m m4oe.cli bench --preset $P --precision bf16 --compile --peak-tflops $PEAK $EXTRA $DEV --json "$OUT/compiled_soft.json"
step compiled_hard 150 python -m m4oe.cli bench --preset $P --routing hard --precision bf16 --compile --peak-tflops $PEAK $EXTRA $DEV --json "$OUT/compiled_hard.json"
step loader 60 python benchmarks/loader.py --synthetic $( [ "$QUICK" = 1 ] && echo 300 || echo 4000 ) --workers 8 --batch 36 --batches 40 $DEV
echo "total $(( $(date +%s) - START ))s"
