#!/usr/bin/env bash
# The device check, in one call on a lent GPU machine (torch 2.11 in its own
# python3, no network, 16 cores): build for the visible GPU with all cores,
# then the self-check, the CUDA tests, compute-sanitizer (memcheck, racecheck,
# synccheck, initcheck: the GPU's verdict on what the emulator checks on the
# CPU) on a small subset, Nsight Compute's DRAM bytes per step (the GPU's
# answer to tools/traffic_model.py), the CUDA benchmark subset and one
# profiler trace.
# Every step has a time limit (under 10 minutes in all) and its time is logged; a
# failing step is reported and the next one runs. At most 8 files in $OUT:
#   log.txt        every step's output and time, the GPU, the sanitizer's verdict,
#                  the traffic table (benchmarks/gpu_traffic.py)
#   tests.txt      pytest's report of the CUDA tests
#   bench/         table.txt table.md results.json results.csv speedup.png
#   trace.json     torch.profiler trace of one Batch Norm and one LayerNorm step
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine
#   BNEXT_GPU_CHECK_STANDIN=1 bash benchmarks/gpu_check.sh
#       runs every step on the CPU instead (a stand-in that proves the plumbing)
#   BNEXT_GPU_CHECK_PREBUILT=DIR bash benchmarks/gpu_check.sh
#       takes torch_bnext's libraries and _build_info.py from DIR/torch_bnext
#       and ptxas's report from DIR/resource-usage instead of compiling there:
#       benchmarks/gpu_prebuild.sh makes DIR elsewhere, against the GPU
#       machine's torch (the CPU variants alone outlast the build's limit);
#       compiles after all if they do not import
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench_out/gpu_check}
STANDIN=${BNEXT_GPU_CHECK_STANDIN:-0}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
status=0
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs its
# output and time; a failure is recorded and the check goes on.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  if [ $rc -eq 0 ]; then
    echo "=== $name: ok in ${took}s" | tee -a "$LOG"
  else
    [ $rc -eq 124 ] && echo "=== $name: TIMED OUT after ${took}s" | tee -a "$LOG" \
                    || echo "=== $name: FAILED (exit $rc) in ${took}s" | tee -a "$LOG"
    status=1
  fi
  return 0
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOG"
if [ "$STANDIN" = 1 ]; then
  echo "STAND-IN: every GPU step runs on the CPU" | tee -a "$LOG"
  DEVICE=cpu BUILD_ENV="BNEXT_CUDA=0" TEST_SELECT="schedule"
  BENCH_SELECT="--ops batchnorm --shapes 8x64x14x14"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device is visible')" \
    || exit 2
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$LOG"
  # Only the visible GPU's architecture: one device-code pass instead of several.
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  DEVICE=cuda BUILD_ENV="BNEXT_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH" TEST_SELECT="cuda and not emulated and not test_emulator"
  BENCH_SELECT=""
fi

PREBUILT=${BNEXT_GPU_CHECK_PREBUILT:-}
if [ -n "$PREBUILT" ] && cp "$PREBUILT"/torch_bnext/* torch_bnext/ \
    && mkdir -p build && rm -rf build/resource-usage && cp -r "$PREBUILT"/resource-usage build/ \
    && "$PY" -c "import torch_bnext, torch_bnext._build_info as b; print('prebuilt against', b.TORCH_VERSION)" \
      2>&1 | tee -a "$LOG"; then
  echo "=== build: prebuilt libraries from $PREBUILT" | tee -a "$LOG"
else
  # Only the default CPU variant: each variant is a sequential build of its own.
  step build 240 env $BUILD_ENV BNEXT_CPU_VARIANTS=default MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace
fi
step import 30 "$PY" -c "import torch_bnext as tb; print('CUDA kernels:', tb.HAS_CUDA_KERNELS)"
step self-check 90 "$PY" -m torch_bnext.check --device "$DEVICE"
# pytest-timeout, where installed (the GPU machine has it), turns a hung test into a failure.
PER_TEST=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")
# pytest-xdist, where installed: 12 workers share the GPU (on an H200 the 886
# CUDA tests took 63 s on 14 workers and outlasted 180 s on 4).
WORKERS=$("$PY" -c "import xdist" 2>/dev/null && [ "$STANDIN" != 1 ] && echo "-n 12")
step tests 180 bash -c "'$PY' -m pytest tests -q -p no:cacheprovider -rs -k '$TEST_SELECT' \
  $PER_TEST $WORKERS 2>&1 | tee '$OUT/tests.txt' | tail -3; exit \${PIPESTATUS[0]}"

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ "$STANDIN" = 1 ] || [ ! -x "$SANITIZER" ]; then
  echo "=== compute-sanitizer: not available here (skipped)" | tee -a "$LOG"
else
  for tool in memcheck racecheck synccheck initcheck; do
    # The benchmark after these needs its time within the 10-minute command.
    if [ $SECONDS -gt 360 ]; then
      echo "=== compute-sanitizer $tool: skipped (${SECONDS}s spent)" | tee -a "$LOG"; continue
    fi
    # Some hosts refuse the sanitizer ("Device not supported"): reported, not a failure.
    if ! timeout 45 "$SANITIZER" --tool "$tool" --error-exitcode 3 "$PY" benchmarks/sanitize_subset.py \
        >>"$LOG" 2>&1; then
      rc=$?
      if [ $rc -eq 3 ]; then echo "=== compute-sanitizer $tool: ERRORS FOUND" | tee -a "$LOG"; status=1
      else echo "=== compute-sanitizer $tool: could not run here (exit $rc; see log)" | tee -a "$LOG"; fi
    else
      echo "=== compute-sanitizer $tool: clean" | tee -a "$LOG"
    fi
  done
fi

# Nsight Compute's DRAM bytes per step, against tools/traffic_model.py's passes.
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
if [ "$STANDIN" = 1 ] || [ -z "$NCU" ]; then
  echo "=== traffic: no ncu here (skipped)" | tee -a "$LOG"
else
  step traffic 90 bash -c "'$NCU' --clock-control none --profile-from-start off --csv \
    --print-units base --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
    '$PY' benchmarks/gpu_traffic.py > /tmp/ncu.csv && '$PY' benchmarks/gpu_traffic.py --summarize /tmp/ncu.csv"
fi
step bench 100 "$PY" benchmarks/run.py --device "$DEVICE" --min-run-time 0.05 --out "$OUT/bench" \
  $BENCH_SELECT "$@"
step trace 25 "$PY" -c "
import torch, torch_bnext as tb
from torch.profiler import ProfilerActivity, profile
dev = '$DEVICE'
x = torch.randn(64, 256, 28, 28, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_()
h = torch.randn(4096, 1024, device=dev, requires_grad=True)
bn, ln = tb.BatchNorm2d(256).to(dev), tb.LayerNorm(1024).to(dev)
for _ in range(2):
    bn(x).sum().backward(); ln(h).sum().backward()
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == 'cuda' else [])
with profile(activities=acts) as prof:
    bn(x).sum().backward(); ln(h).sum().backward()
    if dev == 'cuda': torch.cuda.synchronize()
prof.export_chrome_trace('$OUT/trace.json')
print(prof.key_averages().table(sort_by='self_cuda_time_total' if dev == 'cuda' else 'self_cpu_time_total', row_limit=12))
"
echo "=== files in $OUT:" | tee -a "$LOG"
(cd "$OUT" && find . -type f | sort) | tee -a "$LOG"
echo "=== gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED) in ${SECONDS}s" | tee -a "$LOG"
exit $status
