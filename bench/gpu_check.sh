#!/usr/bin/env bash
# One device run for the GFT core: the math and training tests on a GPU (bf16 autocast path), then the
# GFT-vs-SFT step benchmark at the Qwen2-0.5B shape. Needs the pydantic wheels carried in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/unit/test_losses.py tests/unit/test_advantages.py tests/integration/test_training.py 2>&1 | tail -25
timeout 300 python3 bench/train_step.py --device cuda --hidden 896 --layers 24 --heads 14 --kv-heads 2 \
  --intermediate 4864 --vocab 151936 --batch 8 --prompt-len 256,256 --response-len 768,768 \
  --steps 8 --warmup 3 --schedule sequential --json "$OUT/train_step_h100.json" 2>&1 | tail -20
