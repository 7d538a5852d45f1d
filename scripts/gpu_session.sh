#!/usr/bin/env bash
# Every GPU run of one session on the lent 4-GPU H200 machine (nvidia-h200-x4), in three device calls that
# follow each other while the machine is warm (files under ~ survive between them):
#
#   phase 1, carry [".stage/a"]:          bash scripts/gpu_session.sh tests
#       stage GGUF part 0 and the distillation text; GPU tests (GPUs 0,1: tests/test_fast.py incl. the
#       two-GPU ones; GPU 2: tests/test_kernels.py and tests/test_tp.py); the 8B step profile (GPU 3)
#   phase 2, carry [".stage/b", ".whl"]:  bash scripts/gpu_session.sh baselines
#       join the GGUF, convert SmolLM2 once; in parallel: the draft distillation (GPU 3), the
#       draft-independent baselines: transformers on the expanded pair (GPU 0), random8b and the
#       SmolLM2 pair's transformers/AR (GPUs 1,2)
#   phase 3, carry [".stage/b", ".whl"]:  bash scripts/gpu_session.sh bench      (after phase 1)
#       join the GGUF, convert SmolLM2 once; our AR/SD/SSD (SSD's draft on its own GPU) and transformers'
#       assisted generation: expanded T=0 (GPUs 0,1), expanded T=1 then the SmolLM2 pair (GPUs 2,3)
# On the 2-GPU machine (nvidia-h200-x2) the session of 2026-11-28 (third) ran four calls in a row instead:
#   check,    carry [".stage/b", ".whl"]: stage GGUF part 1, the wheel and the draft; GPU tests (both GPUs),
#             then the 8B step profile alone (GPU 0)
#   gen,      carry [".stage/a"] (the draft's weights and tokenizer.json moved out): join the GGUF; sample the target for the distillation
#             (GPU 0, saved under ~/stage/gen); random8b AR/SD/transformers and the expanded pair's AR/SD (GPU 1)
#   distill,  no carry: train the draft shapes on those samples (GPU 0, ~9 min); the SmolLM2 pair (GPU 1)
#   ssdbench, no carry: the best new draft into models/smollm2-draft (on the device), SSD with it (both GPUs)
#   skinny,   no carry (a later, fresh call): GPU tests, then the 8B step profile (the one-row Triton GEMV
#             against cuBLAS)
# The tree (~20 MB) and a carried part must stay under 64 MiB: for phase 1, move
# models/smollm2-draft/model.safetensors out of the tree for the call (no phase-1 job needs it).
#
# The jobs of one phase run side by side on different GPUs (BENCHMARKS.md says which ran next to which).
# Results: bench directories under ~/bench, packed into $OUT/PHASE.tgz after each phase; unpack them all
# and merge with `python scripts/bench.py --report-only --out DIR --merge ...`.
set -o pipefail
export PYTHONUNBUFFERED=1
phase=${1:?tests, baselines, bench, tp, tpbench, check, gen, distill or ssdbench}
OUT=${OUT:-out}
R=$HOME/bench/$phase
mkdir -p "$R" ~/stage
export SSD_CACHE_DIR=$HOME/ssd-cache
on() { local gpus=$1 name=$2; shift 2; (CUDA_VISIBLE_DEVICES=$gpus "$@" > "$R/$name.log" 2>&1; echo "[$name: exit $?]" >> "$R/$name.log") & }
if [ -d ~/site ]; then export PYTHONPATH=$HOME/site; fi
if [ -f ~/stage/smollm2.gguf ]; then export SSD_GGUF=$HOME/stage/smollm2.gguf; fi
B="timeout 510 python3 scripts/bench.py --new-tokens 128"
# The SmolLM2 GGUF from its two staged parts (part 0 copied to ~/stage by an earlier call), the gguf wheel,
# and the one-time conversion into $SSD_CACHE_DIR.
stage_gguf() {
  cp -n .stage/a/* .stage/b/* ~/stage/ 2>/dev/null; mkdir -p ~/stage/whl; cp -n .whl/*.whl ~/stage/whl/ 2>/dev/null
  cat ~/stage/gguf.part.[0-9] > ~/stage/smollm2.gguf || return 1
  echo "$(cat ~/stage/gguf.sha256)  $HOME/stage/smollm2.gguf" | sha256sum -c || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site ~/stage/whl/*.whl || return 1
  export PYTHONPATH=$HOME/site SSD_GGUF=$HOME/stage/smollm2.gguf
  python3 -c "import embedded; embedded.ensure_target()" 2>&1 | tail -1
}

case $phase in
tests)
  cp .stage/a/* ~/stage/ 2>/dev/null
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$R/gpus.txt"
  on 0,1 gpu_tests_fast timeout 460 python3 -m pytest -q -m gpu tests/test_fast.py
  on 2 gpu_tests_kernels timeout 460 python3 -m pytest -q -m gpu tests/test_kernels.py $(ls tests/test_tp.py 2>/dev/null)
  on 3 profile_step timeout 300 python3 scripts/profile_step.py --out "$R"
  ;;
baselines)
  stage_gguf || exit 1
  on 3 distill timeout 540 python3 scripts/distill_draft.py train --gguf ~/stage/smollm2.gguf --pd-text ~/stage/pd_text.jsonl.gz \
      --out "$R/distill" --seed 0 --shapes ${SHAPE:-d384_l4_h6_kv2_i1280} --n-samples 16384 --budget-seconds 450 \
      --reserve-seconds 80
  on 0 hf_expanded $B --out ~/bench/hf_expanded --pairs expanded --systems hf,hf_static --batch-sizes 1,4,16 \
      --temperatures 0,1 --budget-s 400
  on 1,2 random8b_smollm2 bash -c "$B --out ~/bench/random8b --pairs random8b --systems ar,sd,ssd,hf,hf_static \
      --batch-sizes 1,4,16 --temperatures 0 --ks 2,4 --ks-batched 2,4 --budget-s 230; \
      $B --out ~/bench/smollm2_base --pairs smollm2 --systems hf,hf_static,ar --batch-sizes 1,4,16 --temperatures 0,1 \
      --budget-s 160"
  ;;
bench)
  stage_gguf || exit 1
  on 0,1 expanded_t0 $B --out ~/bench/expanded_t0 --pairs expanded --systems ar,sd,ssd,ssd_seq,hf_assisted \
      --batch-sizes 1,4,16 --temperatures 0 --ks 2,4,6,8 --ks-batched 2,4,auto --budget-s 420
  on 2,3 expanded_t1_smollm2 bash -c "$B --out ~/bench/expanded_t1 --pairs expanded --systems ar,sd,ssd,hf_assisted \
      --batch-sizes 1,4 --temperatures 1 --ks 2,4,6 --ks-batched 4 --budget-s 230; \
      $B --out ~/bench/smollm2 --pairs smollm2 --systems ref,ar,sd,ssd,hf_assisted,hf --batch-sizes 1,4,16 \
      --temperatures 0,1 --ks 2,4,6 --ks-batched 4,auto --budget-s 170"
  ;;
tp)      # carry [".stage/a"]: stage part 0; the TP GPU tests (GPUs 0,1) and the fast engine's (GPUs 2,3)
  cp .stage/a/* ~/stage/ 2>/dev/null
  on 0,1 gpu_tests_tp timeout 280 python3 -m pytest -q -m gpu tests/test_tp.py
  on 2,3 gpu_tests_fast timeout 280 python3 -m pytest -q -m gpu tests/test_fast.py
  ;;
tpbench) # carry [".stage/b", ".whl"]: AR/SD/SSD with TP = ${TPS:-1,2,3} targets (expanded SmolLM2), draft on the next GPU
  stage_gguf || exit 1
  on 0,1,2,3 bench_tp timeout 500 python3 scripts/bench_tp.py --out ~/bench/tp --tp ${TPS:-1,2,3} --prompts 4 \
      --repeats 1 --config-timeout-s 150 --budget-s 330
  ;;
check)   # carry [".stage/b", ".whl"]
  cp .stage/b/* ~/stage/ && mkdir -p ~/stage/whl && cp .whl/*.whl ~/stage/whl/ && cp models/smollm2-draft/model.safetensors ~/stage/draft.safetensors \
    && cp models/smollm2-draft/tokenizer.json ~/stage/draft_tokenizer.json
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$R/gpus.txt"
  on 1 gpu_tests_kernels timeout 300 python3 -m pytest -q -m gpu tests/test_kernels.py
  on 0,1 gpu_tests_fast_tp bash -c "timeout 300 python3 -m pytest -q -m gpu tests/test_fast.py tests/test_tp.py"
  wait
  on 0 profile_step timeout 240 python3 scripts/profile_step.py --out "$R"
  ;;
gen)     # carry [".stage/a"] with models/smollm2-draft/{model.safetensors,tokenizer.json} moved out of the tree
  cp ~/stage/draft.safetensors models/smollm2-draft/model.safetensors
  cp ~/stage/draft_tokenizer.json models/smollm2-draft/tokenizer.json
  stage_gguf || exit 1
  on 0 distill_gen timeout 470 python3 scripts/distill_draft.py train --gen-only --gguf ~/stage/smollm2.gguf \
      --out ~/stage/gen --seed 0 --n-samples 98304 --greedy-frac 0.07 --gen-batch 4096 --gen-seconds 340
  on 1 random8b_expanded timeout 480 bash -c "$B --out ~/bench/random8b --pairs random8b --systems ar,sd,hf,hf_static \
      --batch-sizes 1 --temperatures 0 --ks 4 --budget-s 250; \
      $B --out ~/bench/expanded_arsd --pairs expanded --systems ar,sd --batch-sizes 1,4 --temperatures 0 --ks 2,4 \
      --ks-batched 4 --budget-s 150"
  ;;
distill) # no carry: the machine is still warm from `gen`
  cp ~/stage/draft.safetensors models/smollm2-draft/model.safetensors
  on 0 distill timeout 560 python3 scripts/distill_draft.py train --samples ~/stage/gen/samples.pt \
      --gguf ~/stage/smollm2.gguf --pd-text ~/stage/pd_text.jsonl.gz --out "$R/distill" --seed 0 \
      --shapes ${SHAPES:-d384_l4_h6_kv2_i1280,d256_l14_h4_kv2_i1024,d320_l8_h5_kv1_i1024} \
      --budget-seconds 540 --reserve-seconds 95
  on 1 smollm2 timeout 500 $B --out ~/bench/smollm2 --pairs smollm2 --systems ar,sd,hf,hf_static,hf_assisted \
      --batch-sizes 1,4 --temperatures 0 --ks 2,4 --ks-batched 4 --budget-s 420
  wait
  mkdir -p "$OUT/draft" && python3 scripts/distill_draft.py pick "$R/distill" "$OUT/draft" | tee "$R/pick.log"
  cp "$R/distill.log" "$OUT/draft/distill_train.log"
  ;;
skinny)  # no carry, any machine with 2 GPUs: GPU tests, then the 8B step profile (skinny linear vs cuBLAS)
  on 1 gpu_tests_kernels timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py
  on 0,1 gpu_tests_fast timeout 170 python3 -m pytest -q -m gpu tests/test_fast.py
  wait
  on 0 profile_step timeout 170 python3 scripts/profile_step.py --out "$R"
  ;;
ssdbench) # no carry: after `distill`
  cp ~/stage/draft.safetensors models/smollm2-draft/model.safetensors
  python3 scripts/distill_draft.py pick ~/bench/distill/distill models/smollm2-draft
  on 0,1 expanded_ssd $B --out ~/bench/expanded_ssd --pairs expanded --systems ar,sd,ssd --batch-sizes 1 \
      --temperatures 0,1 --ks 4 --budget-s 250
  ;;
esac
wait
for f in "$R"/*.log; do echo "== $f"; grep -v "it/s\]\|run/s\]\|s/run\]" "$f" | tail -n 12; done
tar czf "$OUT/$phase.tgz" --exclude='*.safetensors' -C "$HOME/bench" . 2>/dev/null
if [ "$phase" = baselines ] && [ -d "$R/distill" ]; then mkdir -p "$OUT/distill" && cp -r "$R"/distill/* "$OUT/distill/" 2>/dev/null; fi
ls -la "$OUT"
