#!/usr/bin/env bash
# Compiles the CPU kernels for aarch64 with the default variant's flags, to
# show that they are portable C++ (ATen's Vectorized<T> gives NEON there).
# Needs a cross compiler (Debian: apt-get install g++-aarch64-linux-gnu) and
# the venv's torch headers (architecture-neutral). Compile only: nothing runs.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-aarch64-linux-gnu-g++}
PY=${PY:-.venv/bin/python}
command -v "$CXX" >/dev/null || { echo "no $CXX (apt-get install g++-aarch64-linux-gnu)" >&2; exit 2; }
TORCH_INCLUDE=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in $("$PY" -c 'import sys; sys.path.insert(0, "tools"); import csrc_sources; print(" ".join(csrc_sources.cpu_kernel_sources()))'); do
  obj="$out/${src//\//__}.o"
  "$CXX" -std=c++20 -O2 -fPIC -fopenmp -DCPU_CAPABILITY=DEFAULT -w -Wno-psabi -Icsrc -Icsrc/include \
    -I"$TORCH_INCLUDE" -I"$TORCH_INCLUDE/torch/csrc/api/include" -c "csrc/$src" -o "$obj"
  echo "ok  $src ($(file -b "$obj" | cut -d, -f2 | xargs))"
done
