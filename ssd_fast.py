"""The fast engine: the algorithm of ssd.py (AR, SD, SSD with all of Saguaro), built for speed.

What changes from the reference, and why:
- Weights are re-laid for fewer launches (fused QKV and gate-up matrices) in bf16 on the GPU.
- The hot paths run Triton kernels (ssd_kernels.py): attention over a slot-indexed KV cache for decode
  and verify, tree attention with an implicit mask for SSD's speculation tree, fused add + RMSNorm,
  RoPE fused with the KV-cache write, and the fused verify / residual sampling by exponential race
  (no host synchronization).
- KV caches are preallocated; rolling back a rejected suffix is a change of length, never a copy.
- Every steady-state forward (target decode and verify, draft steps, glue pass, each tree depth) is
  captured once as a CUDA graph per (batch bucket, shape) and replayed.
- The sequence state (token history, lengths, the speculation cache and its lookup) lives on the
  device; the host reads one small tensor per round (accepted counts, new tokens, hit flags) from a
  pinned buffer. Rounds are pipelined: the next round is launched before this one is read back, so the
  host's bookkeeping overlaps the GPU's work.
- SSD with the draft on the target's device (one GPU, or the CPU) runs ssd_round.SSDRound: the lookup, the
  backup merged by selection, the draft side and the target side over persistent device tensors, on a GPU
  one CUDA graph per shape, captured before the first round, the draft side a second stream inside it.
- Batches are padded to a bucket size; padding rows are frozen and write only their own cache rows.
  Rows finish at different times; `Engine.start(...).admit(prompt)` puts a new sequence into a
  finished or padding row between rounds (continuous batching).
- With the draft on its own GPU (`draft_device`) or a tensor-parallel target, SSD's draft side (glue pass,
  fork, tree decode) runs on a worker thread with its own CUDA stream on the draft's GPU, where the
  speculation cache lives and is looked up (the handshake: the outcome key one way, the K tokens, and their
  q rows only when some row samples at temperature > 0, the other); its speculation budget is sized to what
  the verify leaves (`fit_budget`). If the draft fails, the run finishes as AR.
- `k="auto"` measures the step times and picks the K whose drafting fits inside the verify.
- Random numbers: one generator per sampling site (target: first token, AR sampling, the verify's uniforms and
  recovery noise; draft: SD proposals and the speculation tree; backup: the jit backup), each on the device that
  draws from it, seeded from the user's seed by ssd.derive_seed and registered with the CUDA graphs that draw
  from it. Independence: the verifier's uniforms come from a stream that nothing else draws from and whose seed
  is unrelated to the draft's, so they are independent of the proposals they judge (two generators seeded alike
  advance in lockstep and would hand the verifier the draft's own numbers). Reproducibility: the choices that
  change the output (the backup, the fan-out, the budget) follow rules, not timings, unless k="auto" is asked
  for, so the same seed and arguments give the same tokens.
- Rows that stop ride along frozen: their positions are clamped inside the cache, the context limit is also
  enforced on the device (a pipelined round never moves a row past it), and the fused RoPE/KV write masks slots
  outside the cache.

On a machine without CUDA the same code runs with the kernels' PyTorch references in float32 (it
says so once), and gives the same greedy tokens as ssd.py.
"""
from __future__ import annotations

from ssd_engine.bootstrap import load_pair  # noqa: F401  (ssd_fast.load_pair: the models for the Python API)
from ssd_engine.engine import Batch, DraftWorker, Engine, _Run, saguaro_rescale_masked  # noqa: F401  (ssd_fast.Engine: the Python API)
from ssd_engine.fast_model import BUCKETS, FastCache, FastModel, Graphed, Ops, Runner, bucket  # noqa: F401
from ssd_engine.policy import (COST, SD_OVER_AR_MARGIN, SSD_BUDGET_ONE_GPU, choose_mode, forward_cost,  # noqa: F401
                               jit_cost_ratio, ssd_lookahead)

if __name__ == "__main__":  # the command line (ssd_engine/cli.py): python ssd_fast.py --help
    import sys

    if "--serve" in sys.argv[1:]:   # the OpenAI-compatible HTTP server: python ssd_fast.py --serve --help
        from ssd_engine import server
        sys.exit(server.main(sys.argv[1:]))
    from ssd_engine import cli
    sys.exit(cli.run(sys.argv[1:]))
