#!/usr/bin/env bash
# Every GPU run of a session: `bash scripts/gpu_session.sh PHASE`, one device call per phase, the calls following
# each other while the machine is warm (files under ~ survive between them; the tree is copied afresh each time).
#
# Staging the embedded target (the SmolLM2 GGUF, 98 MB): a call carries at most 64 MiB, the tree is ~30 MB, so the
# GGUF travels in three parts: .stage/a, .stage/b, .stage/c (34 + 34 + 30 MB; .stage/c also holds the public-
# domain text for the distillation), each with the GGUF's sha256. Every call copies the parts it carries (and
# .whl, the gguf wheel) to ~/stage; phases that need the target join them there, so carry
#   [".stage/a", ".whl"], then [".stage/b"], then [".stage/c"]
# on three consecutive calls (any phases; the third must be one that needs the target, or a later call).
# Keep the tree under ~32 MB (git ls-files -co --exclude-standard | xargs du -cb) or re-split the parts.
#
# Phases without the target (any call):
#   check     GPU tests (test_fast + test_tp on GPUs 0,1; test_kernels on GPU 1), then the 8B step profile
#   skinny    the same on 2 GPUs with tighter time limits (the one-row Triton GEMV against cuBLAS)
#   tests     (4 GPUs) GPU tests on GPUs 0-2 and the 8B step profile on GPU 3
#   tp        (4 GPUs) the TP GPU tests (GPUs 0,1) and the fast engine's (GPUs 2,3)
# Phases that need the target (all three parts staged):
#   gen       (2 GPUs) sample the target for the distillation (GPU 0, saved under ~/stage/gen); random8b
#             AR/SD/transformers, then the expanded pair's AR/SD (GPU 1)
#   distill   (2 GPUs, after gen) train the draft shapes on those samples (GPU 0, ~9 min); the SmolLM2 pair
#             (GPU 1); the best draft (distill_draft.py pick) comes back in $OUT/draft. Longer training over
#             several calls: SHAPES=one_shape DISTILL_ARGS="--steps N --until-budget --checkpoint ~/stage/ckpt.pt",
#             then the same with "--resume ~/stage/ckpt.pt" added on each following call
#   ssdbench  (2 GPUs, after distill) the new draft into models/smollm2-draft on the device; SSD with it
#   gen2      (2 GPUs) sample the target on both GPUs (--gen-shard), a share of the prompts self-written; the GPU
#             tests alongside
#   train2    (2 GPUs, after gen2) two candidates continue the shipped draft, one per GPU, over one or more
#             calls (STEPS, A_ARGS, B_ARGS, RESUME=1 on later calls); the better one comes back in $OUT/draft
#   baselines (4 GPUs) the distillation in one run (GPU 3); transformers on the expanded pair (GPU 0);
#             random8b and the SmolLM2 pair's transformers/AR (GPUs 1,2)
#   bench     (4 GPUs) our AR/SD/SSD (SSD's draft on its own GPU) and transformers' assisted generation:
#             expanded T=0 (GPUs 0,1), expanded T=1 then the SmolLM2 pair (GPUs 2,3)
#   tpbench   (4 GPUs) AR/SD/SSD with TP = ${TPS:-1,2,3} targets, the draft on the next GPU
# BENCHMARKS.md says which phases ran in which session and next to what.
#
# The jobs of one phase run side by side on different GPUs. Results: bench directories under ~/bench, packed
# into $OUT/PHASE.tgz after each phase; unpack them all and merge with
# `python scripts/bench.py --report-only --out DIR --merge ...`.
set -o pipefail
export PYTHONUNBUFFERED=1
phase=${1:?check, skinny, tests, tp, gen, distill, ssdbench, gen2, train2, baselines, bench or tpbench}
OUT=${OUT:-out}
R=$HOME/bench/$phase
mkdir -p "$R" ~/stage
export SSD_CACHE_DIR=$HOME/ssd-cache
on() { local gpus=$1 name=$2; shift 2; (CUDA_VISIBLE_DEVICES=$gpus "$@" > "$R/$name.log" 2>&1; echo "[$name: exit $?]" >> "$R/$name.log") & }
if [ -d ~/site ]; then export PYTHONPATH=$HOME/site; fi
if [ -f ~/stage/smollm2.gguf ]; then export SSD_GGUF=$HOME/stage/smollm2.gguf; fi
B="timeout 510 python3 scripts/bench.py --new-tokens 128"
# Whatever parts this call carries go to ~/stage (see the header), then the phase runs.
for d in .stage/*/; do [ -d "$d" ] && cp -n "$d"* ~/stage/ 2>/dev/null; done
if ls .whl/*.whl >/dev/null 2>&1; then mkdir -p ~/stage/whl && cp -n .whl/*.whl ~/stage/whl/; fi
# The SmolLM2 GGUF joined from its staged parts, the gguf wheel, and the one-time conversion into $SSD_CACHE_DIR.
stage_gguf() {
  cat ~/stage/gguf.part.[0-9] > ~/stage/smollm2.gguf 2>/dev/null
  if ! echo "$(cat ~/stage/gguf.sha256 2>/dev/null)  $HOME/stage/smollm2.gguf" | sha256sum -c --quiet; then
    echo "the staged GGUF is incomplete (parts in ~/stage: $(ls ~/stage | grep -c gguf.part)): carry .stage/a," \
         ".stage/b and .stage/c on consecutive calls (header)"; return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site ~/stage/whl/*.whl || return 1
  export PYTHONPATH=$HOME/site SSD_GGUF=$HOME/stage/smollm2.gguf
  python3 -c "import embedded; embedded.ensure_target()" 2>&1 | tail -1
}

case $phase in
tests)
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
tp)      # the TP GPU tests (GPUs 0,1) and the fast engine's (GPUs 2,3)
  on 0,1 gpu_tests_tp timeout 280 python3 -m pytest -q -m gpu tests/test_tp.py
  on 2,3 gpu_tests_fast timeout 280 python3 -m pytest -q -m gpu tests/test_fast.py
  ;;
tpbench) # AR/SD/SSD with TP = ${TPS:-1,2,3} targets (expanded SmolLM2), the draft on the next GPU
  stage_gguf || exit 1
  on 0,1,2,3 bench_tp timeout 500 python3 scripts/bench_tp.py --out ~/bench/tp --tp ${TPS:-1,2,3} --prompts 4 \
      --repeats 1 --config-timeout-s 150 --budget-s 330
  ;;
check)
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$R/gpus.txt"
  on 1 gpu_tests_kernels timeout 300 python3 -m pytest -q -m gpu tests/test_kernels.py
  on 0,1 gpu_tests_fast_tp bash -c "timeout 300 python3 -m pytest -q -m gpu tests/test_fast.py tests/test_tp.py"
  wait
  on 0 profile_step timeout 240 python3 scripts/profile_step.py --out "$R"
  ;;
gen)
  stage_gguf || exit 1
  on 0 distill_gen timeout 470 python3 scripts/distill_draft.py train --gen-only --gguf ~/stage/smollm2.gguf \
      --out ~/stage/gen --seed 0 --n-samples 98304 --greedy-frac 0.07 --gen-batch 4096 --gen-seconds 340
  on 1 random8b_expanded timeout 480 bash -c "$B --out ~/bench/random8b --pairs random8b --systems ar,sd,hf,hf_static \
      --batch-sizes 1 --temperatures 0 --ks 4 --budget-s 250; \
      $B --out ~/bench/expanded_arsd --pairs expanded --systems ar,sd --batch-sizes 1,4 --temperatures 0 --ks 2,4 \
      --ks-batched 4 --budget-s 150"
  ;;
distill) # after gen, on the same warm machine
  on 0 distill timeout 560 python3 scripts/distill_draft.py train --samples ~/stage/gen/samples.pt \
      --gguf ~/stage/smollm2.gguf --pd-text ~/stage/pd_text.jsonl.gz --out "$R/distill" --seed 0 \
      --shapes ${SHAPES:-d384_l4_h6_kv2_i1280,d256_l14_h4_kv2_i1024,d320_l8_h5_kv1_i1024} \
      --budget-seconds 540 --reserve-seconds 95 ${DISTILL_ARGS:-}
  on 1 smollm2 timeout 500 $B --out ~/bench/smollm2 --pairs smollm2 --systems ar,sd,hf,hf_static,hf_assisted \
      --batch-sizes 1,4 --temperatures 0 --ks 2,4 --ks-batched 4 --budget-s 420
  wait
  mkdir -p "$OUT/draft" && python3 scripts/distill_draft.py pick "$R/distill" "$OUT/draft" | tee "$R/pick.log"
  cp "$R/distill.log" "$OUT/draft/distill_train.log"
  # files come back at most 16 MiB each: the weights in parts (here: cat model.safetensors.part.* > model.safetensors)
  (cd "$OUT/draft" && sha256sum model.safetensors > model.safetensors.sha256 \
      && split -b 15000000 model.safetensors model.safetensors.part. && rm model.safetensors)
  ;;
skinny)  # 2 GPUs: GPU tests, then the 8B step profile (skinny linear vs cuBLAS)
  on 1 gpu_tests_kernels timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py
  on 0,1 gpu_tests_fast timeout 170 python3 -m pytest -q -m gpu tests/test_fast.py
  wait
  on 0 profile_step timeout 170 python3 scripts/profile_step.py --out "$R"
  ;;
gen2)     # (2 GPUs) sample the target on both GPUs for longer training (~/stage/gen0, ~/stage/gen1); a share of
          # the chat prompts is written by the target itself (--self-prompt-frac)
  stage_gguf || exit 1
  for k in 0 1; do
    on $k distill_gen$k timeout 480 python3 scripts/distill_draft.py train --gen-only --gguf ~/stage/smollm2.gguf \
        --out ~/stage/gen$k --seed 0 --n-samples 196608 --greedy-frac 0.07 --gen-batch 4096 \
        --gen-seconds ${GEN_SECONDS:-330} --gen-shard $k/2 --self-prompt-frac ${SELF_FRAC:-0.35}
  done
  # the GPU tests share the two GPUs with the sampling (correctness only; nothing here is timed)
  on 0,1 gpu_tests timeout 420 python3 -m pytest -q -m gpu tests/test_fast.py tests/test_tp.py tests/test_kernels.py
  ;;
train2)   # (2 GPUs, after gen2) two candidates continue the shipped draft side by side, A on GPU 0, B on GPU 1,
          # each with its own loss arguments (A_ARGS, B_ARGS) and a fixed schedule of STEPS steps that spans calls:
          # the first call saves ~/stage/ckpt{A,B}.pt, a later one passes RESUME=1. The better one comes back.
  for c in A B; do
    g=0; [ $c = B ] && g=1; args=A_ARGS; [ $c = B ] && args=B_ARGS
    resume=""; [ -n "${RESUME:-}" ] && resume="--resume $HOME/stage/ckpt$c.pt"
    on $g distill_$c timeout ${TRAIN_TIMEOUT:-560} python3 scripts/distill_draft.py train \
        --samples ~/stage/gen0/samples.pt ~/stage/gen1/samples.pt --gguf ~/stage/smollm2.gguf \
        --pd-text ~/stage/pd_text.jsonl.gz --out "$R/$c" --seed 0 --shapes d320_l8_h5_kv1_i1024 \
        --init models/smollm2-draft --steps ${STEPS:?} --until-budget --checkpoint ~/stage/ckpt$c.pt $resume \
        --budget-seconds ${BUDGET:-540} --reserve-seconds 80 ${!args}
  done
  wait
  mkdir -p "$OUT/draft" && python3 scripts/distill_draft.py pick "$R/A" "$R/B" "$OUT/draft" | tee "$R/pick.log"
  # (the logs and both runs' eval.json come back in $OUT/train2.tgz: at most 8 files come back)
  (cd "$OUT/draft" && sha256sum model.safetensors > model.safetensors.sha256 \
      && split -b 15000000 model.safetensors model.safetensors.part. && rm model.safetensors)
  ;;
ssdbench) # after distill, on the same warm machine
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
