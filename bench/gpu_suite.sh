#!/usr/bin/env bash
# Everything a lent GPU machine needs, in one call (device tool, see README "GPU verification"):
#   install without network, build ditkern._C for the GPU, run the whole test suite (GPU-marked tests included),
#   run compute-sanitizer over the CUDA op tests where it exists, run the benchmark suite; logs and results -> $OUT.
# The GPU machine has torch, triton, nvcc, pybind11, ninja and pytest-benchmark but no diffusers and no package index:
# fetch the wheels here first with `bash bench/fetch_wheels.sh` and carry `.whl`.
set -uo pipefail
OUT=${OUT:-/tmp/ditkern-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  DITKERN_CUDA_ARCH=${DITKERN_CUDA_ARCH:-90a} python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  python3 -m ditkern info
} 2>&1 | tee "$OUT/env.log"
python3 -m pytest tests -q -ra 2>&1 | tee "$OUT/tests.log" || python3 -m pytest tests -q -ra 2>&1 | tail -40 >>"$OUT/tests.log"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 1 python3 -m pytest tests/ops -q -k "gpu and cuda" 2>&1 | tail -15
  done | tee "$OUT/sanitizer.log"
fi
python3 -m bench.run --out "$OUT/bench" 2>&1 | tail -60 | tee "$OUT/bench.log"
