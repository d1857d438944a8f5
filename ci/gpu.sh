#!/usr/bin/env bash
# One GPU run: the full test suite with the cuda backend, a compute-sanitizer memcheck pass,
# and a short benchmark table. Logs go to $OUT when set (the lent machine), else ./out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FLASHDEC_CACHE_DIR=${FLASHDEC_CACHE_DIR:-/tmp/flashdec-cache}
status=0
step() { echo "=== $1"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import cuda.core, cuda.bindings, torch; print('cuda-core', cuda.core.__version__, 'torch', torch.__version__)" | tee -a "$OUT/device.txt"
python3 -m flashdec info | tee -a "$OUT/device.txt"

step "precompile (cold cache timing)"
python3 -c "import time, flashdec.backends.cuda as c; t=time.time(); n=c.precompile(dtypes=['bfloat16'], head_dims=[128], group_sizes=[4]); print(n, 'kernels in', round(time.time()-t,1), 's')"

step "tests"
# CI compiles every specialization (tests/cuda/test_kernels.py); here the GPU-facing tests run.
python3 -m pytest -q --maxfail=25 -p no:cacheprovider -k "${PYTEST_K:-not every_shipped}" 2>&1 | tee "$OUT/pytest.txt" | tail -40 || status=1

step "compute-sanitizer memcheck"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 python3 ci/sanitize_cases.py 2>&1 | tee "$OUT/memcheck.txt" | tail -8 || status=1

step "bench"
python3 -m flashdec bench ${BENCH_ARGS:---quick} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
exit $status
