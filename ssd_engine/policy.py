"""The engine's cost policy: each rule that decides from the models' sizes, once. A forward's cost by a roofline,
the mode of `--mode auto`, SSD's default lookahead and speculation budget, the jit backup's relative cost. The
rules read configs only (no timing), so a seed reproduces a run; the measured choices (`--k auto`, the budget of
a concurrent draft side) time the engine's own steps."""
from __future__ import annotations

# A forward's cost by a roofline with a per-layer floor: max(weight bytes / bandwidth, FLOPs / rate) plus a fixed
# cost per layer (kernel launches and small reductions that do not shrink with the model). GPU: the H200's measured
# ceilings (bf16 matrix ~750 TFLOP/s, copies ~4 TB/s; shared/DESIGN.md) and ~12 us per graphed layer; CPU: float32
# on one thread (the default on a 2-core machine), fitted to the embedded pair's measured steps there (a target
# step ~70 ms, a verify of 5 positions ~147 ms, a draft step ~27 ms). Only ratios of such costs are used, to decide,
# never to report.
COST = {True: dict(bandwidth=4.0e12, flops=7.5e14, per_layer=12e-6, bytes_per_param=2),
        False: dict(bandwidth=1.5e10, flops=1.2e10, per_layer=1.2e-3, bytes_per_param=4)}


def forward_cost(cfg, batch: int, tokens: int, on_gpu: bool) -> float:
    """Seconds of one forward over batch x tokens positions, by the COST roofline."""
    c = COST[on_gpu]
    params = cfg.num_hidden_layers * (cfg.hidden_size * cfg.head_dim * (2 * cfg.num_attention_heads +
                                                                        2 * cfg.num_key_value_heads)
                                      + 3 * cfg.hidden_size * cfg.intermediate_size) + cfg.vocab_size * cfg.hidden_size
    return max(params * c["bytes_per_param"] / c["bandwidth"], 2 * params * batch * tokens / c["flops"]) \
        + cfg.num_hidden_layers * c["per_layer"]


def jit_cost_ratio(target_cfg, draft_cfg, k: int, batch: int, on_gpu: bool) -> float:
    """The jit backup's cost (K draft steps) over the verify's (K + 1 target positions), for the batch-aware
    backup choice (ssd.choose_backup). A rule from the configs, not a timing: a seed reproduces a run."""
    return k * forward_cost(draft_cfg, batch, 1, on_gpu) / forward_cost(target_cfg, batch, k + 1, on_gpu)


SD_OVER_AR_MARGIN = 1.2
SSD_SIDE_FITS = 0.8        # the draft side (glue + K tree steps) predicted at most this share of the verify
SSD_BUDGET_ONE_GPU = 64    # speculation budget per row when the draft side runs concurrently inside the round's graph
SSD_HIT_RATE, SSD_MISS_TOKENS, SSD_HIT_ROUND = 0.8, 1.2, 1.05   # measured on one H200 (BENCHMARKS.md)


def ssd_lookahead(target_cfg, draft_cfg, batch: int, on_gpu: bool, k_max: int = 4) -> int:
    """SSD's K when none is given: the largest K <= k_max whose draft side (glue pass over K + 1 tokens and K tree
    steps over SSD_BUDGET_ONE_GPU branches), by the COST roofline, takes at most SSD_SIDE_FITS of the verify, so
    the draft hides under it (at least 2). Measured on one H200: the embedded 135M target (predicted side/verify
    0.76 at K = 2, 1.27 at K = 4) ran SSD fastest at K = 2 (hit rounds 1.17x the verify, 1.82x at K = 4); the 7B
    expanded target (0.08-0.14) at K = 4 (hit rounds 1.03-1.06x the verify)."""
    verify = lambda k: forward_cost(target_cfg, batch, k + 1, on_gpu)  # noqa: E731
    fits = [k for k in range(2, k_max + 1) if ssd_side_cost(draft_cfg, batch, k, on_gpu) <= SSD_SIDE_FITS * verify(k)]
    return max(fits) if fits else 2


def ssd_side_cost(draft_cfg, batch: int, k: int, on_gpu: bool) -> float:
    """Seconds of SSD's draft side by the COST roofline: the glue pass over K + 1 tokens and K tree steps over
    SSD_BUDGET_ONE_GPU branches per row."""
    return forward_cost(draft_cfg, batch, k + 1, on_gpu) + k * forward_cost(draft_cfg, batch * SSD_BUDGET_ONE_GPU, 1,
                                                                             on_gpu)


def choose_mode(target_cfg, draft_cfg, k: int, batch: int, on_gpu: bool, accept_rate: float = 0.6,
                ssd_round: bool = False) -> tuple:
    """The mode of `--mode auto`, by a rule from the configs (no timing: a seed reproduces a run).
    SSD where its round runs as a CUDA graph on the device (`ssd_round`: a GPU, graphs on) and the batch is one
    row: there it measured faster than our SD on both pairs at T = 0 and T = 1 (BENCHMARKS.md); at batch 4 it
    measured at most SD's speed at T = 0 and slower at T = 1, at batch 16 slower: SD or AR there. SSD is chosen when
    its predicted speed is SD_OVER_AR_MARGIN x AR's: a hit rate SSD_HIT_RATE (misses make SSD_MISS_TOKENS tokens),
    a round SSD_HIT_ROUND x the verify of the K of ssd_lookahead, or the draft side when it is longer.
    SD against AR: tokens per second by the COST roofline, SD making E = (1 - a^(K+1)) / (1 - a) tokens per round
    (Leviathan et al. 2023, eq. 1) at an assumed acceptance a, in a verify of K + 1 positions plus K draft steps;
    SD is chosen when it is predicted SD_OVER_AR_MARGIN faster than AR. The margin is what the roofline leaves out
    (a round's sampling and launches): measured/predicted SD/AR was 1.13 (135M pair, 2-core CPU, the constants
    fitted there), 0.82 (135M pair, H200) and 0.83 (7B pair, H200). Returns (mode, its predicted speed over AR's)."""
    if draft_cfg is None:
        return "ar", None
    a = accept_rate

    def expected(k):
        return (1 - a ** (k + 1)) / (1 - a)
    t_ar = forward_cost(target_cfg, batch, 1, on_gpu)
    if ssd_round and on_gpu and batch == 1:
        ks = ssd_lookahead(target_cfg, draft_cfg, batch, on_gpu)
        t_round = SSD_HIT_ROUND * max(forward_cost(target_cfg, batch, ks + 1, on_gpu),
                                      ssd_side_cost(draft_cfg, batch, ks, on_gpu))
        tokens = SSD_HIT_RATE * expected(ks) + (1 - SSD_HIT_RATE) * SSD_MISS_TOKENS
        gain = tokens / t_round * t_ar
        if gain >= SD_OVER_AR_MARGIN:
            return "ssd", gain
    t_round = forward_cost(target_cfg, batch, k + 1, on_gpu) + k * forward_cost(draft_cfg, batch, 1, on_gpu)
    gain = (expected(k) / t_round) * t_ar
    return ("sd" if gain >= SD_OVER_AR_MARGIN else "ar"), gain
