#!/usr/bin/env bash
# The whole GPU check in one call, for the lent GPU machine (H100/H200, Python 3.12, torch 2.11+cu130 and
# triton 3.6 preinstalled, nothing installable), from a bare checkout:
#   bash benchmarks/gpu_suite.sh                 # every part, one summary table at the end
#   PARTS="build gpu-tests" bash benchmarks/gpu_suite.sh
# It builds the op library in place against the machine's torch (no pip, nothing installed: the repository
# root goes on PYTHONPATH; PIP_INSTALL=1 uses `pip install --no-build-isolation --no-deps -e .` instead),
# runs the GPU tests, the Triton ahead-of-time check with the machine's Triton, and the kernel and latency
# benchmarks (DaGAN and DaGAN++ at 256x256, fp16 and bf16, CUDA graphs on: the Animator's default).
# CSVs are appended where they are committed (benchmarks/results/); logs go to benchmarks/results/gpu-run/.
#
# Every part runs under its own `timeout`; a failing part is reported and the next one runs. The suite
# keeps to SUITE_BUDGET seconds (default 470, under 8 minutes): a part that cannot get 30 s is skipped.
#
# part          limit  expected on an H100/H200 (16 cores)
# device          30 s    3 s  nvidia-smi, versions
# build          240 s   30 s  CMake, sm_90 only, MAX_JOBS=16. Measured on the 2-core CPU machine: from
#                              scratch 87 s wall / 79 s CPU for sm_80/86/89/90 (idle), 77 s CPU for sm_90
#                              alone (12 compile jobs; the longest, ops_attention.cpp / ops_motion.cpp, 46 s
#                              wall at load 8, ~12 s idle): on 16 cores the longest single job bounds it
# triton-aot     120 s   40 s  every launcher configuration compiled for sm_80/sm_90 by triton 3.6
#                              (410 compiles, 16 processes); CSV gpu-compile-triton<version>.csv. Measured
#                              on the CPU machine: 244 s of CPU for all of them (triton 3.9), i.e. ~0.6 s
#                              a compile on average (warp/motion ~0.2 s, attention up to ~3 s)
# gpu-tests      240 s  150 s  pytest -m gpu: every GPU backend against the reference in fp32/fp16/bf16
#                              (Triton JIT-compiles each configuration it meets, ~100 sequential compiles:
#                              most of the time; the aligned ones come from triton-aot's cache)
# kernels        150 s   60 s  benchmarks/kernels.py all --device cuda (CUDA events, median)
# latency-*      100 s   30 s  each of dagan/daganpp x fp16/bf16 at 256 (100 timed frames per path)
# total                 ~405 s
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
RES="benchmarks/results"
LOGS="$RES/gpu-run"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET                     # with a GPU the triton backend compiles for it
export TRITON_DEFAULT_FP_FUSION=1
SUITE_BUDGET="${SUITE_BUDGET:-470}"
SUITE_START=$(date +%s)
JOBS="${MAX_JOBS:-$(nproc)}"
ARCH="${DAGAN_FAST_CUDA_ARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')}"
ARCH="${ARCH:-90}"
PARTS="${PARTS:-device build triton-aot gpu-tests kernels latency-dagan-fp16 latency-dagan-bf16 latency-daganpp-fp16 latency-daganpp-bf16}"

NAMES=(); RESULTS=(); TIMES=(); NOTES=()

# run_part NAME LIMIT COMMAND: runs COMMAND (a bash string) under timeout, logs to $LOGS/NAME.log.
run_part() {
  local name="$1" limit="$2" cmd="$3"
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( SUITE_BUDGET - ($(date +%s) - SUITE_START) ))
  if [ "$left" -lt 30 ]; then
    NAMES+=("$name"); RESULTS+=("SKIP"); TIMES+=(0); NOTES+=("suite budget of ${SUITE_BUDGET} s spent")
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit="$left"
  echo "== $name (limit ${limit} s) =="
  local start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$LOGS/$name.log" 2>&1
  local rc=$? took=$(( $(date +%s) - start )) result="PASS"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then result="TIMEOUT"; elif [ "$rc" -ne 0 ]; then result="FAIL($rc)"; fi
  tail -n 12 "$LOGS/$name.log"
  NAMES+=("$name"); RESULTS+=("$result"); TIMES+=("$took")
  NOTES+=("$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-90)")
}

run_part device 30 "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,compute_cap --format=csv; \
  $PY -c \"import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available()\""

if [ -n "${PIP_INSTALL:-}" ]; then
  BUILD="$PY -m pip install --no-build-isolation --no-deps -e ."
else
  BUILD="$PY setup.py -q build_ext --inplace"
fi
run_part build 240 "DAGAN_FAST_CUDA=1 DAGAN_FAST_CUDA_ARCHS=$ARCH MAX_JOBS=$JOBS $BUILD && \
  $PY -c \"import dagan_fast; [print(k, v) for k, v in dagan_fast.ops.available_backends().items()]\""

# Before the tests: its compiles land in Triton's cache, where the tests' JIT finds the launches it shares.
run_part triton-aot 120 "$PY -m dagan_fast.ops.triton.aot --jobs $JOBS --arch 80 90 \
  --csv $RES/gpu-compile-triton\$($PY -c 'import triton; print(triton.__version__)').csv"

run_part gpu-tests 240 "$PY -m pytest -q -p no:cacheprovider -m gpu tests"

run_part kernels 150 "$PY benchmarks/kernels.py all --device cuda"

for model in dagan daganpp; do
  for dtype in fp16 bf16; do
    run_part "latency-$model-$dtype" 100 "$PY benchmarks/latency.py --device cuda --model $model --dtype $dtype --size 256"
  done
done

echo
echo "== summary ($(( $(date +%s) - SUITE_START )) s of ${SUITE_BUDGET} s; logs in $LOGS, CSVs in $RES) =="
printf '%-22s %-10s %6s  %s\n' part result secs "last line of its log"
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-22s %-10s %6s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}" "${NOTES[$i]}"
  [ "${RESULTS[$i]}" = "PASS" ] || failed=1
done
exit "$failed"
