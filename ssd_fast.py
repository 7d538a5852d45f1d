"""The fast engine's front door: the algorithm of ssd.py (AR, SD, SSD with all of Saguaro), built for speed.

    python ssd_fast.py --prompt "The capital of France is"      # the command line (ssd_engine/cli.py)
    python ssd_fast.py --serve                                  # the OpenAI-compatible server (ssd_engine/server.py)

    import ssd_fast
    engine = ssd_fast.Engine(target, draft)                     # the Python API
    engine.generate(prompts, mode="ssd", temperature=0.7).tokens

What changes from the reference, and where (ssd_engine/, read in this order after ssd.py):
- fast_model.py  weights re-laid for fewer launches (fused QKV and gate-up matrices) in bf16 on the GPU; the hot
                 paths run Triton kernels (ssd_kernels.py): attention over a slot-indexed KV cache, tree attention
                 with an implicit mask, fused add + RMSNorm, RoPE fused with the KV-cache write, the fused verify /
                 residual sampling by exponential race. KV caches are preallocated; rolling back a rejected suffix
                 is a change of length, never a copy.
- graphs.py      every steady-state step captured once as a CUDA graph per (batch bucket, shape) and replayed.
- batch.py       the sequence state (token history, lengths, active rows) lives on the device; batches are padded
                 to a bucket size; rows that stop ride along frozen.
- sampling.py    ssd.py's sampling rules with no host synchronization.
- rounds.py      the AR and SD rounds; ssd_round.py the SSD round, written once for every layout: one CUDA graph per
                 round when the draft shares the target's GPU (its draft side a second stream inside it), or the
                 draft side on a worker for a draft on its own GPU or a tensor-parallel target (tp.py).
- run.py         the run loop: one read-back per round, rounds pipelined (round n+1 launched before round n is read
                 back), the running estimates, continuous batching (Run.admit).
- policy.py      the rules that choose from the models' sizes (--mode auto, SSD's K and budget, the jit backup's
                 cost), and the measured ones (--k auto).
- engine.py      the Engine: devices, models, random streams (one generator per sampling site, seeded by
                 ssd.derive_seed: the verifier's uniforms are independent of the draws that made the proposals),
                 caches; generate / stream / start.
- loader.py      checkpoints streamed from disk to the device; bootstrap.py, cli.py, report.py, server.py the
                 command line and the server.

On a machine without CUDA the same code runs with the kernels' PyTorch references in float32 (it says so once),
and gives the same greedy tokens as ssd.py.
"""
from __future__ import annotations

from ssd_engine.bootstrap import load_pair  # noqa: F401  (ssd_fast.load_pair: the models for the Python API)
from ssd_engine.engine import Engine  # noqa: F401  (the Python API: ssd_fast.Engine)

if __name__ == "__main__":  # the command line (ssd_engine/cli.py): python ssd_fast.py --help
    import sys

    if "--serve" in sys.argv[1:]:   # the OpenAI-compatible HTTP server: python ssd_fast.py --serve --help
        from ssd_engine import server
        sys.exit(server.main(sys.argv[1:]))
    from ssd_engine import cli
    sys.exit(cli.run(sys.argv[1:]))
