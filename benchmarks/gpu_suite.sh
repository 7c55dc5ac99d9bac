#!/usr/bin/env bash
# The whole GPU check in one call (for the lent GPU machine, where nothing can be installed): build the
# package in place against the machine's torch, run the GPU tests and every benchmark on the GPU, and
# leave the CSVs and logs in $OUT (default: benchmarks/results/gpu-run) for committing.
#   bash benchmarks/gpu_suite.sh            # build + tests + benchmarks
#   SKIP_TESTS=1 bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT"
log() { echo "== $* ==" | tee -a "$OUT/suite.log"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$OUT/suite.log"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/suite.log"

log "build (sm_90 only, in place)"
start=$(date +%s)
DAGAN_FAST_CUDA=1 DAGAN_FAST_CUDA_ARCHS="${DAGAN_FAST_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" \
  python setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
log "build took $(( $(date +%s) - start )) s"
python -c "import dagan_fast; print(dagan_fast.ops.available_backends())" | tee -a "$OUT/suite.log"

if [ -z "${SKIP_TESTS:-}" ]; then
  log "GPU tests"
  # no TRITON_INTERPRET: with a GPU present the triton backend compiles for it
  python -m pytest -q -x -m "gpu" tests 2>&1 | tail -30 | tee -a "$OUT/suite.log"
  log "op tests on every backend"
  python -m pytest -q tests/test_warp_ops.py tests/test_attention_ops.py tests/test_motion_ops.py \
    2>&1 | tail -30 | tee -a "$OUT/suite.log"
fi

log "kernel benchmarks"
python benchmarks/kernels.py all --device cuda --csv "$OUT/kernels-gpu.csv" 2>&1 | tee -a "$OUT/suite.log"
log "latency benchmarks"
for dtype in fp16 fp32; do
  python benchmarks/latency.py --device cuda --dtype "$dtype" --batch 32 --csv "$OUT/latency-gpu.csv" 2>&1 \
    | tee -a "$OUT/suite.log"
done
log "done: results in $OUT"
