#!/usr/bin/env bash
# Builds torch_bnext for a lent GPU machine on this one, so that its short
# lease is spent on checks rather than compiling: the committed tree (a git
# worktree of HEAD), against that machine's torch, for its architecture only,
# with the default CPU variant alone, stripped of debug information.
#
#   python3 -m venv /tmp/venv-gpu && /tmp/venv-gpu/bin/pip install torch==2.11.0 numpy ninja setuptools
#   PYTHON=/tmp/venv-gpu/bin/python bash benchmarks/gpu_prebuild.sh gpu_prebuilt 9.0
#   (then, there)  BNEXT_GPU_CHECK_PREBUILT=gpu_prebuilt bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:?usage: gpu_prebuild.sh DEST_DIR [ARCH]}
ARCH=${2:-9.0}
PY=${PYTHON:?set PYTHON to a python with the torch of the GPU machine}
TREE=$(mktemp -d)/tree
git worktree add --detach "$TREE" HEAD >/dev/null
trap 'git worktree remove --force "$TREE"' EXIT
(cd "$TREE" && BNEXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" BNEXT_CPU_VARIANTS=default \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace)
rm -rf "$DEST" && mkdir -p "$DEST/torch_bnext"
for lib in "$TREE"/torch_bnext/_C*.so "$TREE"/torch_bnext/_cpu_default*.so; do
  strip --strip-debug -o "$DEST/torch_bnext/$(basename "$lib")" "$lib"
done
cp "$TREE/torch_bnext/_build_info.py" "$DEST/torch_bnext/"
cp -r "$TREE/build/resource-usage" "$DEST/"
du -sh "$DEST"
