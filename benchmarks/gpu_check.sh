#!/usr/bin/env bash
# On a machine with a GPU, in one go: build the extension with CUDA for the
# visible GPU, run the whole test suite (the CUDA tests run instead of
# skipping), then the benchmark suite on CUDA. Results land in $OUT
# (default bench_out/): test log, benchmark table, JSON, CSV and PNG.
#
#   bash benchmarks/gpu_check.sh            # uses python3 (or $PYTHON) as it is
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --full      # the whole suite instead of the default subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"

"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q -r requirements-dev.txt
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device is visible')"
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install -q matplotlib || true

# TORCH_CUDA_ARCH_LIST unset: torch builds for the visible GPU's architecture.
BNEXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import torch_bnext, sys; sys.exit(0 if torch_bnext.HAS_CUDA_KERNELS else 'built without CUDA kernels')"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt" || true
status=0
"$PY" -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.txt" || status=$?
"$PY" benchmarks/run.py --device cuda --json "$OUT/cuda.json" --csv "$OUT/cuda.csv" \
  --png "$OUT/cuda.png" --md "$OUT/cuda.md" --no-out "$@" 2>"$OUT/bench_progress.txt" | tee "$OUT/cuda_table.txt" || status=$?
exit $status
