#!/usr/bin/env bash
# All GPU figures of docs/benchmarks.md, in one run (one device session). Usage:
#   bash benchmarks/gpu_suite.sh OUT_DIR [BUDGET_SECONDS]
#   STEPS="eager_bf16 profile" bash benchmarks/gpu_suite.sh OUT_DIR   # a subset of the steps
#   QUICK=1 bash benchmarks/gpu_suite.sh /tmp/q                      # tiny model on CPU: checks the script
#   STEPS="ab_attention ab_hard cudagraphs train_loop" bash benchmarks/gpu_suite.sh OUT   # benchmarks.md's open questions
# Runs from the repository root with PYTHONPATH=src (no install needed). Each step has its own time
# limit, and steps are skipped once the budget is spent, so partial results still come back.
set -u
OUT=${1:-/tmp/m4oe_gpu}
BUDGET=${2:-540}
QUICK=${QUICK:-0}
STEPS=${STEPS:-"eager_bf16 eager_hard eager_fp32 profile compiled_soft compiled_infer train_loop predict_volume loader"}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
START=$(date +%s)
PEAK=${PEAK_TFLOPS:-790}
if [ "$QUICK" = 1 ]; then
  M=tiny; LITE=tiny; DENSE=tiny; EXTRA="--batch 4 --infer-batch 4 --steps 2 --warmup 1 --device cpu"
  PROFILE="--batch 4 --device cpu"; LOADER="--synthetic 300 --device cpu"
  LOOP="--preset tiny --batch 4 --steps 3 --workers 0 --device cpu"
  VOLUME="--preset tiny --slices 4 --size 64 --device cpu"
else
  M=m4oe-t; LITE=m4oe-t-lite; DENSE=swin-unet; EXTRA=""; PROFILE=""; LOADER="--synthetic 4000"
  LOOP="--preset m4oe-t --batch 36 --steps 150 --workers 8"
  VOLUME="--preset m4oe-t --slices 100 --size 512"
fi
BENCH="python -m m4oe.cli bench --peak-tflops $PEAK $EXTRA"

step() {  # step NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped (budget spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?"
  grep -v -i "warn\|online softmax\|split the\|important use\|^$\|softmax\.$" "$OUT/$name.log" | tail -n 30
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step eager_bf16 150 $BENCH --preset $M,$DENSE,$LITE --precision bf16 --json "$OUT/eager_bf16.json"
step eager_hard 60 $BENCH --preset $M,$LITE --routing hard --precision bf16 --json "$OUT/eager_hard.json"
step eager_fp32 90 $BENCH --preset $M,$DENSE --precision fp32 --json "$OUT/eager_fp32.json"
step profile 60 python benchmarks/profile_step.py --preset $M $PROFILE
step compiled_soft 200 $BENCH --preset $M --precision bf16 --compile --pure-bf16 --json "$OUT/compiled_soft.json"
step compiled_infer 150 $BENCH --preset $M,$LITE --routing hard --precision bf16 --compile --pure-bf16 --no-train --json "$OUT/compiled_infer.json"
# not in the default list: the A/B runs of docs/benchmarks.md's open questions
step ab_attention 240 $BENCH --preset $M --precision bf16 --compile --pure-bf16 --attention sdpa,explicit --json "$OUT/ab_attention.json"
step ab_hard 200 $BENCH --preset $M --routing hard --precision bf16 --compile --hard-kernel onehot,grouped --json "$OUT/ab_hard.json"
step cudagraphs 200 $BENCH --preset $M --precision bf16 --compile --compile-mode reduce-overhead --pure-bf16 --json "$OUT/cudagraphs.json"
# the whole m4oe train step (loader, augmentation, loss, AdamW, compile), not just the model
step train_loop 240 python benchmarks/train_loop.py $LOOP
# one 512 x 512 x 100 CT segmented in memory (m4oe predict without the file I/O), batch 16 and 64
step predict_volume 90 bash -c "python benchmarks/predict_volume.py $VOLUME && python benchmarks/predict_volume.py $VOLUME --batch-size 64"
step loader 60 python benchmarks/loader.py $LOADER --workers 8 --batch 36 --batches 40
echo "total $(( $(date +%s) - START ))s"
