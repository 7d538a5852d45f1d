#!/usr/bin/env bash
# The GPU tests and the benchmark in one go, on a machine with a CUDA GPU:
#   bash scripts/gpu_run.sh [OUTDIR]
# On the lent H200 (no internet, no gguf package): carry the gguf wheel in .whl/ and the SmolLM2 GGUF
# staged in parts (the previous call copied part 0 to ~/stage; this one brings .stage/b), see BENCHMARKS.md.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${1:-${OUT:-out}}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if [ -f .stage/b/gguf.part.1 ] && [ -f ~/stage/gguf.part.0 ]; then
  cat ~/stage/gguf.part.0 .stage/b/gguf.part.[1-9] > ~/stage/smollm2.gguf
  export SSD_GGUF=~/stage/smollm2.gguf
fi
export SSD_CACHE_DIR=${SSD_CACHE_DIR:-$HOME/ssd-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import embedded; embedded.ensure_target()" 2>&1 | tail -2
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu ${TESTS:-tests/test_fast.py tests/test_kernels.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout ${BENCH_TIMEOUT:-400} python3 scripts/bench_fast.py --out "$OUT/bench_fast.json" ${BENCH_ARGS:-} 2>&1 \
  | grep -v "Loading weights\|de-quantizing" | tee "$OUT/bench.log" | grep -v '^ \|^{\|^}'
