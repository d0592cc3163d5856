#!/usr/bin/env bash
# The GPU checks in one prepared, time-boxed run (for a lent GPU; CI has none): the CUDA tests, then the benchmark
# of docs/benchmarks.md. Logs go to $OUT (default /tmp/gpu-check). Run from the repository root:
#   bash scripts/gpu-check.sh [EPOCHS]
set -u
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 CCAR_NATIVE_BF16=0
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  2>&1 | tee "$OUT/tests.log" | tail -n 25
(cd benchmarks && timeout 330 python3 gpu_recipe.py --epochs "${1:-200}" ${2:+--only "$2"}) 2>&1 | tee "$OUT/bench.log"
