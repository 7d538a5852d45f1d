"""The engine's cost policy: each rule that decides from the models' sizes, once. A forward's cost by a roofline,
the mode of `--mode auto`, SSD's default lookahead and speculation budget, the jit backup's relative cost. The
rules read configs only (no timing), so a seed reproduces a run; the measured choices (`--k auto`, the budget of
a concurrent draft side) time the engine's own steps."""
from __future__ import annotations

from types import SimpleNamespace

import torch

import ssd
from ssd_engine.fast_model import bucket
from ssd_engine.ssd_round import SSDRound

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


def ssd_budget(k: int, draft_side_hides: bool) -> int:
    """Speculations per row and round under Saguaro's automatic fan-out when none is given: ssd.py's 4(K + 1), or,
    where the draft side runs concurrently inside the round's graph and so hides under the verify, more branches for
    more hits (16(K + 1), at most SSD_BUDGET_ONE_GPU; measured in BENCHMARKS.md)."""
    return min(SSD_BUDGET_ONE_GPU, 16 * (k + 1)) if draft_side_hides else 4 * (k + 1)


# ---------------------------------------------------------------------------------------------
# Measured choices (asked for with k="auto"): they time the engine's own steps
# ---------------------------------------------------------------------------------------------

def choose_lookahead(eng, batch=1, mode="ssd", k_max=8, accept_rate=0.7, budgets=(4, 8, 12, 16, 20, 24, 32, 48)):
    """--k auto, and the speculation budget for --fan-out auto. SSD hides the draft only when its glue pass and K
    tree steps fit inside the target's verify, so measure at this batch size the verify (K+1 tokens), the glue pass
    (K+1 tokens) and a tree step (one token per branch; timed as a draft step over N tokens) and take, among the
    (K, N) that fit, the K with the most expected tokens per second of verify, E[tokens | a, K] / t_verify(K) with
    E = (1 - a^(K+1)) / (1 - a) (Leviathan et al. 2023, eq. 1), and the largest budget N for it. When nothing fits,
    the target waits: the score is E / (t_glue + K t_tree). SD has no overlap: E / (t_verify + K t_draft).
    Returns (K, N, table of the measurements in ms)."""
    Bb = bucket(batch)
    key = ("lookahead", Bb, mode, k_max, accept_rate, tuple(budgets))
    if key in eng.calibrated:
        return eng.calibrated[key]
    tc, dc = eng.cache(eng.target, "target", Bb), eng.cache(eng.draft, "draft", Bb)
    memo = {}

    def timed(run, cache, T, device):
        if (id(cache), T) not in memo:   # the last T slots: no row has reached them yet
            pos = (cache.slots - T + torch.arange(T, device=device))[None].expand(Bb, -1).contiguous()
            tok = torch.zeros(Bb, T, dtype=torch.long, device=device)
            memo[(id(cache), T)] = eng.time(lambda: run.step(cache, tok, pos))
        return memo[(id(cache), T)]
    a = min(max(accept_rate, 1e-3), 1 - 1e-3)
    best, table = None, []
    for k in range(1, k_max + 1):
        expected = (1 - a ** (k + 1)) / (1 - a)
        t_verify = timed(eng.t_run, tc, k + 1, eng.device)
        if mode == "sd":
            t_draft = timed(eng.d_run, dc, 2, eng.draft_device) + (k - 1) * timed(eng.d_run, dc, 1, eng.draft_device)
            score, n = expected / (t_verify + t_draft), 0
        else:
            t_glue = timed(eng.d_run, dc, k + 1, eng.draft_device)
            fits = [n for n in budgets if t_glue + k * timed(eng.d_run, dc, n, eng.draft_device) <= t_verify]
            n = max(fits) if fits else budgets[0]
            t_draft = t_glue + k * timed(eng.d_run, dc, n, eng.draft_device)
            score = expected / max(t_verify, t_draft)
        table.append(dict(k=k, budget=n, verify_ms=1e3 * t_verify, draft_ms=1e3 * t_draft, hidden=t_draft <= t_verify,
                          tokens_per_ms=score / 1e3))
        if best is None or score > best[0]:
            best = (score, k, n)
    eng.calibrated[key] = (best[1], best[2], table)
    return eng.calibrated[key]


def fit_budget(eng, batch, k, c=1.0, top_k=0, top_p=1.0, margin=0.85, budgets=(8, 12, 16, 24, 32, 48, 64, 96, 128)):
    """The speculation budget (branches per row) for SSD with the draft side running concurrently on a worker: the
    largest whose real draft side (glue pass, fork, K tree steps: SSDRound.draft_side, timed as it runs) takes at
    most `margin` of the target's verify at this batch size. More branches cover more outcomes (a higher hit rate,
    fewer backups); past the verify they make the target wait."""
    Bb = bucket(batch)
    key = ("budget", Bb, k, c, top_k, top_p, margin, tuple(budgets))
    if key in eng.calibrated:
        return eng.calibrated[key]
    dev, dd, V = eng.device, eng.draft_device, eng.target.cfg.vocab_size
    tc = eng.cache(eng.target, "target", Bb)
    S = tc.slots
    pos = (S - k - 2 + torch.arange(k + 1, device=dev))[None].expand(Bb, -1).contiguous()
    t_verify = eng.time(lambda: eng.t_run.step(tc, torch.zeros_like(pos), pos))
    # the request fields the draft side reads, to time it outside a generation
    req = SimpleNamespace(k=k, c=c, top_k=top_k, top_p=top_p, fan=None, t_draft=torch.zeros(Bb, device=dd))
    saved, best = eng.dc, budgets[0]
    try:
        for n in budgets:
            n = min(n, V - 1)
            eng.dc = eng.cache(eng.draft, "draft", Bb, n, k)
            rnd = SSDRound(eng, Bb, k, n, False, n, layout="worker")
            rnd.req = req
            rnd.d_m1.fill_(S - k - 2)
            fan = ssd.geometric_fan_out(k, n, 0.6)
            rnd.set_fan(fan)
            side = eng.time(lambda: eng.d_run.run(("ssd-draft", id(rnd), "fit"), lambda: rnd.draft_side(fan)))
            eng.d_run.graphs = {g: v for g, v in eng.d_run.graphs.items() if g[1] != id(rnd)}
            if side > margin * t_verify:
                break
            best = n
    finally:
        eng.dc = saved
    for n in budgets:   # keep only the tree buffers the run will use
        cache = eng.caches.get(("draft", Bb, n, k))
        if n != best and cache is not None and cache is not saved:
            # its graphs go too: they write into its buffers, and a later cache may reuse its id()
            eng.d_run.graphs = {g: v for g, v in eng.d_run.graphs.items() if g[1] != id(cache)}
            del eng.caches[("draft", Bb, n, k)]
    eng.log(f"ssd_fast: speculation budget {best} per row (verify {1e3 * t_verify:.2f} ms at batch {Bb}, K={k})")
    eng.calibrated[key] = best
    return best
