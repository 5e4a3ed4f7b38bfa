#!/usr/bin/env bash
# The benchmark on the device machine (one GPU, no internet), from the repository root:
#   bash bench/run.sh ["VARIANT ... GEN ..."] [BUDGET_SECONDS]
# Needs .whl/ and .shared-data/ (bash ../shared/tools/device-wheels.sh, here) carried along. Each variant runs in a
# fresh process (its own peak memory); GEN is the generation benchmark, EVAL the evaluation backends old vs new
# (bench/generate_bench.py: $OUT/eval_bench.json, eval_table.md). Writes $OUT/{env.json,results.jsonl,
# generate.json,table.md,log.txt} and prints the table last.
set -u
VARS="${1:-A fast balanced low_memory GEN L1 L2 L3 L4 fast_pack}"
BUDGET="${2:-560}"
T0=$(date +%s)
cd "$(dirname "$0")/.."
source bench/device_env.sh
LOG=$OUT/log.txt
elapsed() { echo $(( $(date +%s) - T0 )); }
"$PY" bench/bench.py env >> "$LOG" 2>&1; echo "env rc=$? t=$(elapsed)s"
"$PY" -c "import json; d = json.load(open('$OUT/env.json')); print({k: d.get(k) for k in ('gpu', 'nvidia_smi', 'torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'bf16_matmul_flops')})"
if [ ! -f "$BENCH_MODEL/config.json" ]; then
  "$PY" bench/bench.py make_model >> "$LOG" 2>&1; echo "make_model rc=$? t=$(elapsed)s"
fi
for V in $VARS; do
  LEFT=$(( BUDGET - $(elapsed) ))
  if [ "$LEFT" -lt "${MINLEFT:-45}" ]; then echo "SKIP $V (${LEFT}s left)"; continue; fi
  CAP=$(case "$V" in GEN) echo 210;; EVAL) echo "${EVAL_CAP:-400}";; *) echo 150;; esac); TO=$(( LEFT < CAP ? LEFT : CAP ))
  echo "== $V (timeout ${TO}s, t=$(elapsed)s)" >> "$LOG"
  if [ "$V" = GEN ]; then timeout "$TO" "$PY" bench/bench.py generate >> "$LOG" 2>&1
  elif [ "$V" = EVAL ]; then BENCH_BUDGET=$(( TO - 60 )) timeout "$TO" "$PY" bench/generate_bench.py >> "$LOG" 2>&1
    cat "$OUT/eval_table.md" 2>/dev/null
  else timeout "$TO" "$PY" bench/bench.py train "$V" >> "$LOG" 2>&1; fi
  RC=$?
  echo "$V rc=$RC t=$(elapsed)s"
  if [ "$RC" -ne 0 ]; then
    sed -n "/^== $V /,\$p" "$LOG" | grep -v -i warn | grep -iE "error|exception|out of memory|killed" | tail -4 | cut -c1-400
  fi
done
"$PY" bench/bench.py table
echo "total t=$(elapsed)s"
