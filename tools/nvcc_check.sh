#!/usr/bin/env bash
# Compiles CUDA sources with the extension's nvcc flags, without building the
# extension: a quick check while editing kernels (one .cu takes minutes, the
# whole CUDA build about 12 on 2 cores). Objects go to build/nvcc-check/.
#   tools/nvcc_check.sh csrc/layer_norm/cuda_kernels.cu [more.cu ...]
# Env: PYTHON (default .venv/bin/python), CUDA_HOME (default /usr/local/cuda),
#      TORCH_CUDA_ARCH_LIST (default 9.0), NVCC_EXTRA (more flags, e.g.
#      "-Xptxas -v" for registers and spills per kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
INCLUDES=$("$PY" - <<'PYEOF'
import os, site, torch
from torch.utils.cpp_extension import include_paths
dirs = include_paths()
for sp in site.getsitepackages() + [os.path.dirname(os.path.dirname(torch.__file__))]:
    for sub in ("cu13", "cu12"):
        d = os.path.join(sp, "nvidia", sub, "include")
        if os.path.isdir(d):
            dirs.append(d)
print(" ".join("-I" + d for d in dirs))
PYEOF
)
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
mkdir -p build/nvcc-check
for src in "$@"; do
  out="build/nvcc-check/$(echo "$src" | tr / _).o"
  echo "nvcc $src"
  "$CUDA_HOME/bin/nvcc" -c "$src" -o "$out" -Icsrc -Icsrc/include $INCLUDES \
    -DBNEXT_WITH_CUDA=1 -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_C \
    -O3 --extended-lambda --expt-relaxed-constexpr -lineinfo -std=c++20 \
    -Xcompiler -fPIC -gencode "arch=compute_${ARCH/./},code=sm_${ARCH/./}" \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ ${NVCC_EXTRA:-}
done
