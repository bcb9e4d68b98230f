#!/usr/bin/env bash
# docs/results.md's GPU-scale table A (m4oe-t, 224 px) in one device call, once the cache has come in two parts
# (results/log.md, "How to run"). Run from the repository root on the device machine:
#   bash experiments/gpu_table_a.sh PART_AA PART_AB OUT [SECONDS]
# SECONDS bounds the training (default 450); the rows finish cheapest first (experiments/run_tables.py), and
# whatever finished comes back in OUT/runs.tgz (no weights), with the routing report of each M4oE row.
# SCALE=smoke checks the script on a CPU in a minute (a 64 px cache of experiments/base.yaml).
# REUSE=results/gpu_tables/session22/runs starts from the rows an earlier device session kept (their
# timing.json and validation.json are all table A reads), so only the missing rows are trained.
set -u
AA=$1; AB=$2; OUT=$3; BUDGET=${4:-450}
export PYTHONPATH=src PYTHONUNBUFFERED=1
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
cat "$AA" "$AB" | xz -d -T0 | tar xf - -C /tmp || { echo "cache did not unpack"; exit 1; }
echo "cache unpacked in $(( $(date +%s) - start )) s"
if [ -n "${REUSE:-}" ]; then mkdir -p /tmp/tables/runs && cp -r "$REUSE"/. /tmp/tables/runs/; fi
timeout "$BUDGET" python experiments/run_tables.py --table A --scale "${SCALE:-gpu}" --cache /tmp/base --out /tmp/tables > "$OUT/table_A.log" 2>&1
echo "table A: exit $? after $(( $(date +%s) - start )) s"
grep -v -i "warn" "$OUT/table_A.log" | tail -n 40
(cd /tmp/tables && tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='*.pt' .)
for row in m4oe m4oe_two_phase; do
  [ -f "/tmp/tables/runs/$row/last/model.safetensors" ] || continue  # not trained here (reused, or cut)
  timeout 60 python -m m4oe.cli routing -m "/tmp/tables/runs/$row/last" --cache /tmp/base \
      -o "$OUT/routing_$row.json" > "/tmp/routing_$row.log" 2>&1
  echo "routing $row: exit $?"; tail -n 3 "/tmp/routing_$row.log"
done
echo "total $(( $(date +%s) - start )) s"
