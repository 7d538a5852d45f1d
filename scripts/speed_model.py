"""A speed model for AR, SD and SSD: predicted decode tokens/s from measured part times.

The analysis is the expected-speedup argument of speculative decoding (Leviathan et al. 2023, section 3.1
and eq. 1; Chen et al. 2023) extended to SSD as in Kumar, Dao & May (2026), section 3 (a round costs
max(T_verify, T_draft side) on a speculation-cache hit and adds the backup on a miss) and section 4.3 (at
batch B a jit miss of any row stalls the whole round, so the round hits with probability ~h^B).

Symbols (all times in seconds, per round of the whole batch):
  a          per-token acceptance rate (each draft token accepted with probability a, independently)
  K          lookahead: draft tokens per round
  E(a, K)    expected tokens per round and row, (1 - a^(K+1)) / (1 - a)   [Leviathan et al., eq. 1]
  T_step     one target decode step (AR)
  T_verify   one target pass over K+1 tokens per row (plus the exact verify)
  T_draft    one draft decode step (SD drafts K of them before the verify)
  T_glue     SSD's glue pass: one draft pass over the K+1 verified positions
  T_tree     one depth of SSD's tree decode (all branches of all rows at once); K depths per round
  T_handshake  the outcome key to the draft and the cached speculation back (plus the lookup)
  T_backup   a miss: K draft steps now (jit) or a cheap n-gram proposal (fast)
  h          per-row speculation-cache hit rate; P_round = probability that no row needs a backup
  T_overhead host work per round outside the timed parts (measured: round - sum of parts)

  AR:  tokens/s = B / (T_step + T_overhead)
  SD:  tokens/s = B E(a, K) / (T_verify + K T_draft + T_overhead)
  SSD: T_core  = max(T_verify, T_glue + K T_tree) with the draft on its own device (overlap),
                 T_verify + T_glue + K T_tree when both run one after the other (one device)
       T_round = T_handshake + T_core + (1 - P_round) T_backup + T_overhead
       tokens  = E(a, K) per row on a hit and on a jit miss; h E + (1 - h) E_fast with the fast backup
       tokens/s = B tokens / T_round
  When the draft side fits inside the verify this reduces to h max(T_verify, T_glue + K T_tree) +
  (1 - h)(T_verify + T_backup) + T_handshake (at B = 1, P_round = h); when it does not, a miss also waits
  for the draft side (the glue pass and tree decode still run during that round's verify).

`project(...)` applies the same formulas to step times derived from bandwidth floors (bytes of weights /
bandwidth, with a stated efficiency): every output it returns is labelled PROJECTION, never a measurement.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

PROJECTION = "PROJECTION (computed from assumed step times, not measured)"


# ---------------------------------------------------------------------------------------------
# Expected tokens per round, and the acceptance rate from measured rounds
# ---------------------------------------------------------------------------------------------

def expected_tokens(a: float, k: int) -> float:
    """E[tokens per round] when each of K draft tokens is accepted independently with probability a
    until the first rejection, plus the target's own token (Leviathan et al. 2023, eq. 1):
    (1 - a^(K+1)) / (1 - a), which is K + 1 at a = 1 and 1 at a = 0 (AR)."""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {a}")
    if a == 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def acceptance_from_counts(accepted: list[int], k: int) -> float | None:
    """The per-token acceptance a that fits measured rounds under the i.i.d. model: each round is a
    geometric run of acceptances cut at K, so the maximum-likelihood a is accepted / (accepted +
    rejections), a rejection being a round with n < K. (The engine's summary "acceptance_rate" is
    E[n] / K, which is not this a.)"""
    total = sum(accepted)
    rejections = sum(1 for n in accepted if n < k)
    if total + rejections == 0:
        return None
    return total / (total + rejections)


def _get(r, name, default=None):
    return r.get(name, default) if isinstance(r, dict) else getattr(r, name, default)


def round_stats(rounds, k: int) -> dict:
    """What the speed model needs from a measured run's rounds (ssd.RoundStats or their dicts): per-token
    acceptance a (over rounds whose proposal came from the draft: cache hits and jit misses), the per-row
    hit rate h, the fraction of rounds that needed no backup (P_round), the tokens per row of a fast-backup
    miss (E_fast), and the measured tokens per round and row."""
    draft_n, fast_tokens, hits, all_tokens = [], [], [], []
    rounds_total = rounds_clean = 0
    round_s = {True: [], False: []}    # wall time of a round, by "needed no backup"
    for r in rounds:
        accepted, active = _get(r, "accepted") or [], _get(r, "active")
        hit, backup = _get(r, "hit"), _get(r, "backup")
        active = active if active is not None else [True] * len(accepted)
        rounds_total += 1
        rounds_clean += backup is None
        if "round" in (_get(r, "times") or {}):
            round_s[backup is None].append(_get(r, "times")["round"])
        for b, n in enumerate(accepted):
            if not active[b]:
                continue
            all_tokens.append(n + 1)
            if hit is not None:
                hits.append(bool(hit[b]))
                if not hit[b] and backup == "fast":
                    fast_tokens.append(n + 1)
                    continue
            draft_n.append(n)
    return dict(alpha=acceptance_from_counts(draft_n, k) if k else None,
                hit_rate=sum(hits) / len(hits) if hits else None,
                round_hit=rounds_clean / rounds_total if rounds_total else None,
                tokens_fast=statistics.mean(fast_tokens) if fast_tokens else None,
                tokens_per_round=statistics.mean(all_tokens) if all_tokens else None,
                rounds=rounds_total,
                # SSD: a clean round is one where every row hit (no backup); its time against the bare
                # verify says how much of the drafting the overlap hid.
                round_ms_clean=1e3 * statistics.median(round_s[True]) if round_s[True] else None,
                round_ms_backup=1e3 * statistics.median(round_s[False]) if round_s[False] else None)


def parts_from_profile(rounds, skip_first: bool = True) -> dict:
    """Median seconds of each part of a round from a profiled run (engine.generate(..., profile=True):
    every part timed with a device synchronization): verify, draft, glue, tree, lookup, wait_draft, round;
    backup over the rounds that had one; overhead = round minus the sum of the timed parts."""
    rs = list(rounds)[1:] if skip_first and len(rounds) > 2 else list(rounds)
    names = {}
    for r in rs:
        for name, t in (_get(r, "times") or {}).items():
            names.setdefault(name, []).append(t)
    out = {name: statistics.median(v) for name, v in names.items()}
    over = [max(0.0, t["round"] - sum(v for n, v in t.items() if n != "round"))
            for t in (_get(r, "times") or {} for r in rs) if "round" in t]
    out["overhead"] = statistics.median(over) if over else 0.0
    for kind in ("jit", "fast"):
        v = [_get(r, "times")["backup"] for r in rs if _get(r, "backup") == kind and "backup" in (_get(r, "times") or {})]
        if v:
            out[f"backup_{kind}"] = statistics.median(v)
    return out


# ---------------------------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------------------------

def ar_tokens_per_s(t_step: float, batch: int = 1, t_overhead: float = 0.0) -> float:
    """AR: every row gains one token per target step: B / (T_step + T_overhead)."""
    return batch / (t_step + t_overhead)


def sd_tokens_per_s(a: float, k: int, t_verify: float, t_draft_step: float, batch: int = 1,
                    t_overhead: float = 0.0) -> float:
    """SD (Leviathan et al. 2023, section 3.1): the draft proposes K tokens one step at a time, then the
    target verifies them in one pass; B E(a, K) / (T_verify + K T_draft + T_overhead)."""
    return batch * expected_tokens(a, k) / (t_verify + k * t_draft_step + t_overhead)


def ssd_round(a: float, k: int, hit_rate: float, t_verify: float, t_glue: float, t_tree_step: float,
              t_handshake: float, t_backup: float, batch: int = 1, backup: str = "jit",
              tokens_fast: float | None = None, overlap: bool = True, round_hit: float | None = None,
              t_overhead: float = 0.0) -> dict:
    """One SSD round (Kumar, Dao & May 2026, sections 3 and 4.3; see the module docstring):
    T_round = T_handshake + T_core + (1 - P_round) T_backup + T_overhead, with T_core = max(T_verify,
    T_glue + K T_tree) when the draft side runs on its own device during the verify (overlap=True), their
    sum when not. P_round = round_hit if measured, else h^B (one miss makes the round wait: the jit backup
    runs before the verify; the fast backup costs its n-gram proposal). Tokens per row: E(a, K) on a hit
    and on a jit miss; h E + (1 - h) E_fast with the fast backup (E_fast default 1: only the target's
    token). Returns time, tokens (whole batch), tokens_per_s, p_round, draft_side, hidden (whether the
    draft side fits inside the verify)."""
    if backup not in ("jit", "fast"):
        raise ValueError(f"backup must be jit or fast, got {backup!r}")
    e = expected_tokens(a, k)
    draft_side = t_glue + k * t_tree_step
    core = max(t_verify, draft_side) if overlap else t_verify + draft_side
    p_round = round_hit if round_hit is not None else hit_rate ** batch
    time = t_handshake + core + (1.0 - p_round) * t_backup + t_overhead
    per_row = e if backup == "jit" else hit_rate * e + (1.0 - hit_rate) * (1.0 if tokens_fast is None else tokens_fast)
    return dict(time=time, tokens=batch * per_row, tokens_per_s=batch * per_row / time, p_round=p_round,
                draft_side=draft_side, hidden=draft_side <= t_verify)


def ssd_tokens_per_s(*args, **kw) -> float:
    """ssd_round(...)["tokens_per_s"] (same arguments)."""
    return ssd_round(*args, **kw)["tokens_per_s"]


def predict(mode: str, parts: dict, stats: dict, k: int, batch: int = 1, overlap: bool = True,
            t_handshake_extra: float = 0.0, backup: str | None = None) -> float | None:
    """Predicted decode tokens/s of a measured configuration from its parts (`parts_from_profile` of a
    profiled run: verify, draft, glue, tree, lookup, backup, overhead) and its outcome statistics
    (`round_stats` of the measured, unprofiled run: alpha, hit_rate, round_hit, tokens_fast).
    `t_handshake_extra`: a cross-device round trip measured apart (the profiled run may have the draft on
    the target's device). Returns None when an input is missing."""
    if mode not in ("ar", "sd", "ssd"):
        raise ValueError(f"mode must be ar, sd or ssd, got {mode!r}")
    try:
        over = parts.get("overhead", 0.0)
        if mode == "ar":
            return ar_tokens_per_s(parts["verify"], batch, over)
        a = stats["alpha"]
        if a is None:
            return None
        if mode == "sd":
            return sd_tokens_per_s(a, k, parts["verify"], parts["draft"] / k, batch, over)
        if mode == "ssd":
            kind = backup or ("fast" if "backup_fast" in parts and "backup_jit" not in parts else "jit")
            t_backup = parts.get(f"backup_{kind}", parts.get("backup", 0.0))
            return ssd_tokens_per_s(a, k, stats["hit_rate"] or 0.0, parts["verify"], parts.get("glue", 0.0),
                                    parts.get("tree", 0.0) / k, parts.get("lookup", 0.0) + t_handshake_extra,
                                    t_backup, batch, kind, stats.get("tokens_fast"), overlap,
                                    stats.get("round_hit"), over)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


# ---------------------------------------------------------------------------------------------
# Projection to a large pair from bandwidth floors
# ---------------------------------------------------------------------------------------------

def step_time_floor(params: float, bandwidth_Bps: float, bytes_per_param: float = 2.0, n_gpus: int = 1,
                    efficiency: float = 1.0, t_comm: float = 0.0) -> float:
    """Seconds per memory-bound decode step: bytes of weights / (n_gpus x bandwidth x efficiency) plus
    communication (tensor parallelism: all-reduces per layer). At batch 1 and K+1 <= ~16 tokens a
    verify reads the same bytes as a step, so it costs the same (an assumption the caller states)."""
    return params * bytes_per_param / (n_gpus * bandwidth_Bps * efficiency) + t_comm


@dataclass
class Projection:
    """A projected setup: every field is an assumption or a value derived from assumptions."""
    label: str
    assumptions: dict
    ar_tok_s: float
    sd: dict
    ssd: dict
    per_k: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(label=self.label, assumptions=self.assumptions, ar_tok_s=self.ar_tok_s, sd=self.sd,
                    ssd=self.ssd, per_k=self.per_k)


def project(t_target_step: float, t_draft_step: float, a, hit_rate, t_handshake: float,
            k_values=range(1, 9), batch: int = 1, t_tree_step: float | None = None,
            t_glue: float | None = None, assumptions: dict | None = None) -> Projection:
    """PROJECTION of AR, SD and SSD tokens/s for a pair given its step times (e.g. from
    `step_time_floor`), the draft's acceptance a and cache hit rate h (floats, or dicts K -> value when
    measured per K). Assumes T_verify = T_target_step (memory-bound), T_glue = T_tree = T_draft_step
    unless given, jit backup (K draft steps), P_round = h^batch, overlap (the draft on its own GPU).
    Picks the K with the most tokens/s for SD and for SSD separately. The result's label says PROJECTION."""
    t_tree = t_tree_step if t_tree_step is not None else t_draft_step
    t_g = t_glue if t_glue is not None else t_draft_step
    per_k = []
    for k in k_values:
        ak = a[k] if isinstance(a, dict) else a
        hk = hit_rate[k] if isinstance(hit_rate, dict) else hit_rate
        sd = sd_tokens_per_s(ak, k, t_target_step, t_draft_step, batch)
        s = ssd_round(ak, k, hk, t_target_step, t_g, t_tree, t_handshake, k * t_draft_step, batch)
        per_k.append(dict(k=k, a=ak, hit_rate=hk, expected_tokens=expected_tokens(ak, k), sd_tok_s=sd,
                          ssd_tok_s=s["tokens_per_s"], draft_side_hidden=s["hidden"], label=PROJECTION))
    best_sd = max(per_k, key=lambda r: r["sd_tok_s"])
    best_ssd = max(per_k, key=lambda r: r["ssd_tok_s"])
    ar = ar_tokens_per_s(t_target_step, batch)
    return Projection(
        label=PROJECTION,
        assumptions=dict(assumptions or {}, t_target_step_s=t_target_step, t_draft_step_s=t_draft_step,
                         t_handshake_s=t_handshake, batch=batch, verify="= one target step (memory-bound)",
                         draft_side="glue + K tree steps, each = one draft step, on the draft's own GPU",
                         backup="jit (K draft steps)"),
        ar_tok_s=ar,
        sd=dict(k=best_sd["k"], tok_s=best_sd["sd_tok_s"], vs_ar=best_sd["sd_tok_s"] / ar, label=PROJECTION),
        ssd=dict(k=best_ssd["k"], tok_s=best_ssd["ssd_tok_s"], vs_ar=best_ssd["ssd_tok_s"] / ar,
                 vs_sd=best_ssd["ssd_tok_s"] / best_sd["sd_tok_s"], label=PROJECTION),
        per_k=per_k)


def project_70b_1b(bandwidth_Bps: float, a, hit_rate, t_handshake: float = 1e-4, efficiency: float = 0.7,
                   target_params: float = 70.6e9, draft_params: float = 1.24e9, target_gpus: int = 4,
                   layers: int = 80, t_allreduce: float = 8e-6, t_draft_step: float | None = None,
                   k_values=range(1, 9), batch: int = 1) -> Projection:
    """PROJECTION for a Llama-3.1-70B target on `target_gpus` GPUs (tensor parallel) and a Llama-3.2-1B
    draft on one more GPU, each GPU with `bandwidth_Bps`. Stated assumptions: bf16 weights (2 bytes per
    parameter); every step reads all weights once at `efficiency` of the bandwidth (what the engine reaches
    on one GPU); tensor parallelism adds 2 all-reduces per layer of `t_allreduce` each; the draft step is
    its own bandwidth floor at the same efficiency unless a measured `t_draft_step` is given; verify =
    one target step; a and h as given (measured on a smaller pair: the 70B pair's own would differ)."""
    t_target = step_time_floor(target_params, bandwidth_Bps, 2.0, target_gpus, efficiency,
                               t_comm=2 * layers * t_allreduce if target_gpus > 1 else 0.0)
    t_draft = t_draft_step if t_draft_step is not None else step_time_floor(draft_params, bandwidth_Bps, 2.0, 1,
                                                                           efficiency)
    assumptions = dict(target=f"{target_params / 1e9:.1f}B parameters, bf16, tensor parallel on {target_gpus} GPUs",
                       draft=f"{draft_params / 1e9:.2f}B parameters, bf16, on its own GPU",
                       bandwidth_per_gpu_TBps=bandwidth_Bps / 1e12, efficiency=efficiency,
                       allreduce=f"2 per layer x {layers} layers x {t_allreduce * 1e6:.0f} us",
                       draft_step="measured" if t_draft_step is not None else "bandwidth floor / efficiency",
                       acceptance_and_hit_rate="measured on a smaller pair (see the caller)")
    return project(t_target, t_draft, a, hit_rate, t_handshake, k_values, batch, assumptions=assumptions)
