#!/usr/bin/env bash
# The several-GPU benchmark on the device machine, from the repository root (carry .whl and .shared-data):
#   bash bench/dist_run.sh "STEP ..." [BUDGET_SECONDS]
# STEP is VARIANT@GPUS for training (ddp16@2, ddp64@4, fsdp_llama@2), gen@GPUS / greedy@GPUS for evaluation.
# fsdp_llama runs with FSDP_EXTRA (default: a 6 GiB per-GPU budget); BENCH_PROFILE="ddp16" adds a torch.profiler
# table of 3 steps after the measured ones ($OUT/prof.txt).
# Every step is one torchrun launch of the runner's code. Writes $OUT/{dist.jsonl,dist_generate.jsonl,dist_table.md,
# dist_log.txt} and prints the table last.
set -u
STEPS="${1:-ddp16@1 ddp16@2 ddp64@1 ddp64@2 gen@1 gen@2}"
BUDGET="${2:-560}"
T0=$(date +%s)
cd "$(dirname "$0")/.."
BENCH_THREADS=4  # one process per GPU: fewer CPU threads each
source bench/device_env.sh
export BENCH_LLAMA="${BENCH_LLAMA:-/tmp/llama_rand}"
LOG=$OUT/dist_log.txt
elapsed() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ -f "$BENCH_MODEL/config.json" ] || { "$PY" bench/bench.py make_model >> "$LOG" 2>&1; echo "make_model rc=$? t=$(elapsed)s"; }
PORT=29600
for S in $STEPS; do
  V=${S%@*}; G=${S#*@}
  LEFT=$(( BUDGET - $(elapsed) ))
  if [ "$LEFT" -lt "${MINLEFT:-40}" ]; then echo "SKIP $S (${LEFT}s left)"; continue; fi
  if [ "$V" = fsdp_llama ] && [ ! -f "$BENCH_LLAMA/config.json" ]; then
    "$PY" bench/dist_bench.py make_llama >> "$LOG" 2>&1; echo "make_llama rc=$? t=$(elapsed)s"
  fi
  CAP=${CAP:-240}; TO=$(( LEFT < CAP ? LEFT : CAP )); PORT=$((PORT + 1))
  echo "== $S (timeout ${TO}s, t=$(elapsed)s)" >> "$LOG"
  RUN=(timeout "$TO" "$PY" -m torch.distributed.run --nproc-per-node "$G" --master-port "$PORT" bench/dist_bench.py)
  case "$V" in
    gen) "${RUN[@]}" eval sampling >> "$LOG" 2>&1 ;;
    greedy) "${RUN[@]}" eval greedy >> "$LOG" 2>&1 ;;
    fsdp_llama) BENCH_EXTRA="${FSDP_EXTRA:-training.vram_budget_gb=6}" "${RUN[@]}" train "$V" >> "$LOG" 2>&1 ;;
    *) "${RUN[@]}" train "$V" >> "$LOG" 2>&1 ;;
  esac
  RC=$?
  echo "$S rc=$RC t=$(elapsed)s $(grep '^RESULT' "$LOG" | tail -1 | cut -c1-300)"
  if [ "$RC" -ne 0 ]; then
    sed -n "/^== $S /,\$p" "$LOG" | grep -v -i warn | grep -iE "^error|error:|exception|out of memory|killed" | tail -5 | cut -c1-400
  fi
done
"$PY" bench/dist_bench.py table
echo "total t=$(elapsed)s"
