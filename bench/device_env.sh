# Sourced by bench/run.sh and bench/dist_run.sh from the repository root: the device machine's setup. Its image
# lacks trl, bitsandbytes, datasets, ... : they come as wheels from .whl/ (unless PYTHON names a ready interpreter).
PY="${PYTHON:-python3}"
if [ -d .whl ] && [ -z "${PYTHON:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 BITSANDBYTES_NOWELCOME=1 TQDM_DISABLE=1 \
  OMP_NUM_THREADS="${BENCH_THREADS:-8}"
export OUT="${OUT:-/tmp/bench_out}" BENCH_MODEL="${BENCH_MODEL:-/tmp/phi2rand}"
mkdir -p "$OUT"
