#!/usr/bin/env bash
# Builds torch_bnext against each given torch release, each in a throwaway
# virtual environment and a throwaway copy of this tree (its tracked files as
# they are now, uncommitted edits included), and runs the fast test tier
# (pytest -m "not slow") there. Prints one line per release; non-zero when
# any release failed to install, build or pass.
#
#   tools/torch_range.sh 2.5.0 2.14.1         # the ends of the supported range
#   KEEP=1 tools/torch_range.sh 2.4.1          # keep the folder to look at a failure
#
# The CPU kernels only (BNEXT_CUDA=0; variants default and avx2 unless
# BNEXT_CPU_VARIANTS says otherwise): what is checked is torch's C++ and
# Python API, and CUDA builds need a toolkit matching each torch's CUDA.
# README "Supported torch versions" records the last result.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
[ $# -gt 0 ] || { echo "usage: $0 TORCH_VERSION..." >&2; exit 2; }

# The variants built, for the build and for the tests that check them.
export BNEXT_CPU_VARIANTS=${BNEXT_CPU_VARIANTS:-avx2}
status=0
summary=()
for version in "$@"; do
  work=$(mktemp -d "${TMPDIR:-/tmp}/bnext-torch-$version.XXXX")
  log="$work/log"
  echo "== torch $version in $work (log: $log)"
  start=$SECONDS
  result=""
  # Tracked files, as they are in the working tree.
  git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work" || result="copy failed"
  if [ -z "$result" ]; then
    "$PYTHON" -m venv "$work/venv" >>"$log" 2>&1 &&
      "$work/venv/bin/python" -m pip install -q --progress-bar off \
        "torch==$version" numpy pytest expecttest ninja setuptools wheel >>"$log" 2>&1 ||
      result="install failed"
  fi
  if [ -z "$result" ]; then
    (cd "$work" && BNEXT_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
      venv/bin/python setup.py build_ext --inplace) >>"$log" 2>&1 || result="build failed"
  fi
  if [ -z "$result" ]; then
    (cd "$work" && venv/bin/python -m pytest tests -q -m "not slow") \
      >"$work/pytest.log" 2>&1
    rc=$?
    tail -n 40 "$work/pytest.log" >>"$log"
    result=$(tail -n 1 "$work/pytest.log" | sed 's/=//g; s/^ *//; s/ *$//')
    [ $rc -eq 0 ] || result="tests failed: $result"
  fi
  line="torch $version: $result ($((SECONDS - start)) s)"
  echo "$line"
  summary+=("$line")
  case "$result" in *failed*) status=1; tail -n 30 "$log" >&2 ;; esac
  if [ -z "${KEEP:-}" ]; then rm -rf "$work"; fi
done
echo "== summary ($(git rev-parse --short HEAD)$(git diff --quiet || echo ', with uncommitted edits'))"
printf '%s\n' "${summary[@]}"
exit $status
