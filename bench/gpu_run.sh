#!/usr/bin/env bash
# One device run of bench/gpu_bench.py (issue 7): install the carried wheels, run every section under one time
# budget, leave gpu_bench.json and the log in $OUT. About 6-7 minutes on an H100; never over 8.
#   run(command="bash bench/gpu_run.sh", carry=[".whl"])       # .whl/ = the cp312 pydantic wheels (and pandas's,
#                                                              # which the round section needs, where it is missing)
# BENCH_BUDGET_S (default 360) is the bench's own budget; the hard stop is 80 s above it.
set -uo pipefail
OUT=${OUT:-bench/results}
BUDGET=${BENCH_BUDGET_S:-360}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
if ! python3 -c "import pydantic, pandas" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import pydantic" 2>/dev/null || { echo "no pydantic and no wheels of it in $WHEELS/ (carry .whl)"; exit 1; }
python3 -c "import pandas" 2>/dev/null \
  || echo "no pandas: the round section (pipeline.rounds.gft) will record an error; carry its wheels in $WHEELS/"
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"
timeout -k 10 $((BUDGET + 80)) python3 bench/gpu_bench.py --out "$OUT" --budget-s "$BUDGET" "$@" 2>&1 \
  | tee "$OUT/gpu_bench.log"
status=${PIPESTATUS[0]}
ls -la "$OUT"
exit "$status"
