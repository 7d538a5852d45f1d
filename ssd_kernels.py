"""Triton kernels for the fast SSD engine, each next to the plain PyTorch reference it must equal.

Layout, in the style of the Triton tutorials: for every kernel first ``*_ref`` (the definition, plain torch),
then the ``@triton.jit`` kernel, then the Python wrapper that checks shapes and launches it.

    cache_attention   decode / verify attention over a KV cache, causal over the T new queries, GQA
    tree_attention    SSD tree decode step: shared trunk+glue in the cache, one private chain per branch,
                      implicit mask, the two parts merged by log-sum-exp
    add_rmsnorm       fused residual add + RMSNorm (and plain ``rmsnorm``, also used for Qwen3 q/k-norm)
    rope              rotate-half rotary embedding, gathering cos/sin rows by per-token position
    rope_kv_write     RoPE on q and k fused with the KV-cache write of a decode / verify step (one launch)
    sample_exponential_race / sample_from_logits
                      exact sampling without a host sync: argmax_i p_i / E_i with E_i ~ Exp(1)
    verify            the exact speculative-sampling step (accept while u*q(s) < p(s), residual sample)
    silu_mul          SwiGLU's gate: silu(gate) * up from the fused gate-up projection, one pass
    skinny_linear     x @ W^T for one row (a decode step at batch 1) without split-K; the engine uses it
                      per projection only where it timed faster than cuBLAS

Every wrapper also runs on CPU tensors under the Triton interpreter: set ``TRITON_INTERPRET=1`` before
triton is imported (the tests do this when no GPU is present).  Nothing here synchronizes with the host:
data-dependent lengths (cache_lens, trunk_lens, branch_glue, n_accepted) stay on the device and are only
used inside kernels, so every wrapper can be captured in a CUDA graph.  Only Triton language features
present in both triton 3.6 and 3.9 are used.
"""
from __future__ import annotations

import functools
import gc
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "cache_attention", "cache_attention_ref",
    "tree_attention", "tree_attention_ref",
    "add_rmsnorm", "add_rmsnorm_ref", "rmsnorm", "rmsnorm_ref",
    "rope", "rope_ref", "rope_kv_write", "rope_kv_write_ref",
    "sample_exponential_race", "sample_exponential_race_ref",
    "sample_from_logits", "sample_from_logits_ref",
    "verify", "verify_ref", "verify_greedy",
    "silu_mul", "silu_mul_ref",
    "skinny_linear", "skinny_linear_ref", "skinny_linear_choose",
]

# triton.jit decides at decoration time whether it interprets (TRITON_INTERPRET); INTERPRET records what it
# decided (re-checked on the kernels themselves at the end of this module).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
LOG2E = 1.4426950408889634


def _check_device(*tensors):
    dev = tensors[0].device
    for t in tensors:
        if t is not None:
            assert t.device == dev, f"all tensors must be on one device, got {t.device} and {dev}"
    if dev.type == "cpu" and not INTERPRET:
        raise RuntimeError("ssd_kernels.py: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 before "
                           "importing triton, or call the *_ref function instead")


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gpu_programs_target(device) -> int:
    """About two programs per SM keeps the GPU busy; on the interpreter fewer programs is simply faster."""
    if device.type != "cuda":
        return 1
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ======================================================================================================
# 1. Cache attention (decode T = 1, verify T = K + 1)
# ======================================================================================================

def cache_attention_ref(q, k_cache, v_cache, cache_lens, scale):
    """Reference. q [B, T, H, D]; k_cache, v_cache [B, S, Hkv, D]; cache_lens [B] = valid slots before the T
    new queries, whose keys are already in the cache at slots cache_lens[b] + t.  Query t of row b attends
    slots 0 .. cache_lens[b] + t.  float32 softmax, output in q's dtype."""
    B, T, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    qf = q.float()
    kf = k_cache.float().repeat_interleave(G, dim=2)  # [B, S, H, D]
    vf = v_cache.float().repeat_interleave(G, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", qf, kf) * scale
    slots = torch.arange(S, device=q.device)
    limit = cache_lens.to(torch.long)[:, None] + torch.arange(T, device=q.device)[None, :]  # [B, T]
    mask = slots[None, None, :] <= limit[:, :, None]  # [B, T, S]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, vf).to(q.dtype)


@triton.jit
def _attend_cache_blocks(q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                         start, end, limit, offs_d, d_mask, qk_scale, m_i, l_i, acc,
                         BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax (base 2) of the query block q [M, Dp] over cache slots [start, end), row m seeing only
    slots < limit[m].  One K/V block load serves all M rows (GQA heads and queries share it)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_ks,
                     mask=d_mask[:, None] & col_ok[None, :], other=0.0)  # [Dp, N]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        s = tl.where(col_ok[None, :] & (cols[None, :] < limit[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_mask[None, :], other=0.0)  # [N, Dp]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_attention_result(acc, m_i, l_i, out_ptr, part_o_ptr, part_lse_ptr, b, tq, hq, row_ok,
                            offs_d, d_mask, split, T, H, D, n_rows_total,
                            stride_ob, stride_ot, stride_oh, stride_od, NUM_SPLITS: tl.constexpr):
    """Either the final normalized output, or (split-K) this split's normalized partial and its log2-sum-exp."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        ptrs = (out_ptr + b.to(tl.int64) * stride_ob + tq[:, None] * stride_ot + hq[:, None] * stride_oh
                + offs_d[None, :] * stride_od)
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    else:
        r = (b * T + tq) * H + hq  # row of the flattened [B, T, H] partial buffers
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        base = split.to(tl.int64) * n_rows_total + r
        tl.store(part_lse_ptr + base, lse, mask=row_ok)
        tl.store(part_o_ptr + base[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None] & d_mask[None, :])


@triton.jit
def _cache_attention_kernel(
        q_ptr, k_ptr, v_ptr, lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        T, H, HKV, G, S, D, qk_scale, stride_lens,
        stride_qb, stride_qt, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_ob, stride_ot, stride_oh, stride_od,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Flash-decoding over a slot-indexed KV cache.  Program (b * HKV + g, m_block, split): the M rows are the
    (query t, head of KV group g) pairs, so all G query heads of a KV head share every K/V load; the causal
    limit is per row.  With NUM_SPLITS > 1 each split covers one contiguous slice of the row's live slots
    and writes a partial result that _merge_splits_kernel combines."""
    pid_bg = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bg // HKV
    g = pid_bg % HKV
    n_rows = T * G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows_c = tl.minimum(rows, n_rows - 1)  # padded rows alias a real one; they are never stored
    tq = rows_c // G
    hq = g * G + rows_c % G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    cache_len = tl.load(lens_ptr + b * stride_lens).to(tl.int32)
    limit = cache_len + tq + 1  # exclusive, per row
    t_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, n_rows - 1) // G
    n_end = tl.minimum(cache_len + t_hi + 1, S)
    chunk = tl.cdiv(tl.cdiv(n_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, n_end)

    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + tq[:, None] * stride_qt + hq[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + g * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + g * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_cache_blocks(q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                         start, end, limit, offs_d, d_mask, qk_scale, m_i, l_i, acc,
                                         BLOCK_N, DOT_PRECISION)
    n_rows_total = tl.num_programs(0) // HKV * T * H
    _store_attention_result(acc, m_i, l_i, out_ptr, part_o_ptr, part_lse_ptr, b, tq, hq, row_ok, offs_d,
                            d_mask, split, T, H, D, n_rows_total, stride_ob, stride_ot, stride_oh, stride_od,
                            NUM_SPLITS)


@triton.jit
def _merge_splits_kernel(part_o_ptr, part_lse_ptr, out_ptr, n_rows_total, T, H, D,
                         stride_ob, stride_ot, stride_oh, stride_od,
                         NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Split-K epilogue: out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse).  One program per
    (b, t, h) row; empty splits have lse = -inf and weight 0."""
    r = tl.program_id(0)
    b = r // (T * H)
    tq = (r // H) % T
    hq = r % H
    offs_s = tl.arange(0, BLOCK_SPLITS)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    lse = tl.load(part_lse_ptr + offs_s.to(tl.int64) * n_rows_total + r, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(part_o_ptr + (offs_s.to(tl.int64) * n_rows_total + r)[:, None] * D + offs_d[None, :],
                mask=s_ok[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + tq * stride_ot + hq * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _attention_blocks(n_rows_per_group, D, device, block_n):
    BLOCK_M = max(16, min(64, triton.next_power_of_2(n_rows_per_group)))  # tl.dot needs >= 16
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if block_n is None:
        block_n = 64 if device.type == "cuda" else 32
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "block_n must be a power of two >= 16"
    return BLOCK_M, block_n, BLOCK_D


def _choose_splits(num_splits, programs, S, block_n, device):
    """Split the live slots over several programs only when there are too few programs to fill the GPU and
    the context (capacity S, known without a host sync) is long enough to be worth it."""
    if num_splits is not None:
        assert num_splits >= 1
        return int(num_splits)
    target = _gpu_programs_target(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), S // (4 * block_n), 32))


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _launch_merge(part_o, part_lse, out, num_splits, T, H, D, BLOCK_D):
    n_rows_total = part_lse.shape[1]
    _merge_splits_kernel[(n_rows_total,)](
        part_o, part_lse, out, n_rows_total, T, H, D, *out.stride(),
        NUM_SPLITS=num_splits, BLOCK_SPLITS=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=BLOCK_D)


def _plan_attention(q, T, G, Hkv, S, num_splits, block_n):
    """Block sizes, grid and output buffers shared by cache_attention and tree_attention: q is
    [B, T, H, D] (T queries per row: new tokens or tree branches), G query heads per KV head."""
    B, _, H, D = q.shape
    BLOCK_M, BLOCK_N, BLOCK_D = _attention_blocks(T * G, D, q.device, block_n)
    m_blocks = triton.cdiv(T * G, BLOCK_M)
    splits = _choose_splits(num_splits, B * Hkv * m_blocks, S, BLOCK_N, q.device)
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    if splits > 1:
        part_o = torch.empty((splits, B * T * H, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, B * T * H), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    return BLOCK_M, BLOCK_N, BLOCK_D, m_blocks, splits, out, part_o, part_lse


def cache_attention(q, k_cache, v_cache, cache_lens, scale, *, num_splits=None, block_n=None):
    """Attention of T new queries per row over a KV cache (T = 1 decode, T = K + 1 verify).

    q [B, T, H, D]; k_cache, v_cache [B, S, Hkv, D] (slot = position, the T new keys already written at slots
    cache_lens[b] .. cache_lens[b] + T - 1); cache_lens int [B].  Query t of row b attends slots
    0 .. cache_lens[b] + t.  Fuses QK^T, the causal/length mask, online softmax and PV in one pass over the
    cache (flash-decoding); GQA heads of one KV head share K/V loads; optional split-K over the live slots
    with a log-sum-exp merge for long contexts at small batch.  Returns [B, T, H, D] in q's dtype.
    The caller guarantees cache_lens[b] + T <= S (slots past S are never read).
    """
    assert q.dim() == 4, f"q must be [B, T, H, D], got {tuple(q.shape)}"
    B, T, H, D = q.shape
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, \
        f"k_cache/v_cache must both be [B, S, Hkv, D], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
    _, S, Hkv, Dk = k_cache.shape
    assert k_cache.shape[0] == B and Dk == D, f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}"
    assert H % Hkv == 0, f"query heads {H} must be a multiple of KV heads {Hkv}"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q, k_cache, v_cache must share a dtype"
    assert cache_lens.shape == (B,) and not cache_lens.is_floating_point(), "cache_lens must be an int tensor [B]"
    assert T >= 1 and S >= 1
    _check_device(q, k_cache, v_cache, cache_lens)
    G = H // Hkv
    BLOCK_M, BLOCK_N, BLOCK_D, m_blocks, splits, out, part_o, part_lse = _plan_attention(
        q, T, G, Hkv, S, num_splits, block_n)
    _cache_attention_kernel[(B * Hkv, m_blocks, splits)](
        q, k_cache, v_cache, cache_lens, out, part_o, part_lse,
        T, H, Hkv, G, S, D, float(scale) * LOG2E, cache_lens.stride(0),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, NUM_SPLITS=splits,
        DOT_PRECISION=_dot_precision(q.dtype))
    if splits > 1:
        _launch_merge(part_o, part_lse, out, splits, T, H, D, BLOCK_D)
    return out


# ======================================================================================================
# 2. Tree attention (SSD tree decode, draft side)
# ======================================================================================================

def tree_attention_ref(q, k_cache, v_cache, trunk_lens, branch_glue, k_tree, v_tree, depth, scale):
    """Reference with a dense mask.  q [B, N, H, D] (one query per branch); branch i of row b sees cache
    slots 0 .. trunk_lens[b] + branch_glue[b, i] (inclusive) and its own chain entries k_tree/v_tree
    [B, N, Kmax, Hkv, D] 0 .. depth (inclusive).  Plain float32 softmax over the concatenated keys."""
    B, N, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    Kmax = k_tree.shape[2]
    G = H // Hkv
    qf = q.float()
    kc = k_cache.float().repeat_interleave(G, dim=2)  # [B, S, H, D]
    vc = v_cache.float().repeat_interleave(G, dim=2)
    kt = k_tree.float().repeat_interleave(G, dim=3)  # [B, N, Kmax, H, D]
    vt = v_tree.float().repeat_interleave(G, dim=3)
    s_cache = torch.einsum("bnhd,bshd->bnhs", qf, kc)
    s_tree = torch.einsum("bnhd,bnjhd->bnhj", qf, kt)
    scores = torch.cat([s_cache, s_tree], dim=-1) * scale  # [B, N, H, S + Kmax]
    limit = trunk_lens.to(torch.long)[:, None] + branch_glue.to(torch.long)  # [B, N]
    cache_mask = torch.arange(S, device=q.device)[None, None, :] <= limit[:, :, None]  # [B, N, S]
    tree_mask = (torch.arange(Kmax, device=q.device) <= depth)[None, None, :].expand(B, N, Kmax)
    mask = torch.cat([cache_mask, tree_mask], dim=-1)  # [B, N, S + Kmax]
    probs = torch.softmax(scores.masked_fill(~mask[:, :, None, :], float("-inf")), dim=-1)
    out = torch.einsum("bnhs,bshd->bnhd", probs[..., :S], vc) + torch.einsum("bnhj,bnjhd->bnhd", probs[..., S:], vt)
    return out.to(q.dtype)


@triton.jit
def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, trunk_ptr, glue_ptr, kt_ptr, vt_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        N, H, HKV, G, S, D, depth, qk_scale, stride_trunk,
        stride_qb, stride_qn, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_gb, stride_gn,
        stride_ktb, stride_ktn, stride_ktj, stride_kth, stride_ktd,
        stride_vtb, stride_vtn, stride_vtj, stride_vth, stride_vtd,
        stride_ob, stride_on, stride_oh, stride_od,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (b * HKV + g, m_block, split); rows are (branch, head of group g).  Part 1: the shared
    trunk + glue from the cache, one K/V block load for all branches, per-row limit
    trunk_len + glue + 1 (the implicit mask).  Part 2 (last split only): each branch's own chain entries
    0..depth, a per-row dot product since every branch has different keys.  Each part keeps its own
    online-softmax state; they are merged by log-sum-exp."""
    pid_bg = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bg // HKV
    g = pid_bg % HKV
    n_rows = N * G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows_c = tl.minimum(rows, n_rows - 1)
    br = rows_c // G  # branch
    hq = g * G + rows_c % G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    b64 = b.to(tl.int64)

    trunk = tl.load(trunk_ptr + b * stride_trunk).to(tl.int32)
    glue = tl.load(glue_ptr + b64 * stride_gb + br * stride_gn).to(tl.int32)
    limit = trunk + glue + 1
    n_end = tl.minimum(tl.max(tl.where(row_ok, limit, 0), axis=0), S)
    chunk = tl.cdiv(tl.cdiv(n_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, n_end)

    q = tl.load(q_ptr + b64 * stride_qb + br[:, None] * stride_qn + hq[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    m_c = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_c = tl.zeros([BLOCK_M], tl.float32)
    acc_c = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_c, l_c, acc_c = _attend_cache_blocks(q, k_ptr + b64 * stride_kb + g * stride_kh,
                                           v_ptr + b64 * stride_vb + g * stride_vh,
                                           stride_ks, stride_kd, stride_vs, stride_vd,
                                           start, end, limit, offs_d, d_mask, qk_scale, m_c, l_c, acc_c,
                                           BLOCK_N, DOT_PRECISION)

    # chain part: entries 0..depth of this branch's own scratch, done once (by the last split)
    qf = q.to(tl.float32)
    m_t = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    chain_end = tl.where(split == NUM_SPLITS - 1, depth + 1, 0)
    kt_base = kt_ptr + b64 * stride_ktb + br[:, None] * stride_ktn + g * stride_kth + offs_d[None, :] * stride_ktd
    vt_base = vt_ptr + b64 * stride_vtb + br[:, None] * stride_vtn + g * stride_vth + offs_d[None, :] * stride_vtd
    ld_mask = row_ok[:, None] & d_mask[None, :]
    for j in range(0, chain_end):
        kj = tl.load(kt_base + j * stride_ktj, mask=ld_mask, other=0.0).to(tl.float32)
        s = tl.sum(qf * kj, axis=1) * qk_scale
        m_new = tl.maximum(m_t, s)
        alpha = tl.exp2(m_t - m_new)
        p = tl.exp2(s - m_new)
        l_t = l_t * alpha + p
        vj = tl.load(vt_base + j * stride_vtj, mask=ld_mask, other=0.0).to(tl.float32)
        acc_t = acc_t * alpha[:, None] + p[:, None] * vj
        m_t = m_new

    # log-sum-exp merge of the two parts
    m_i = tl.maximum(m_c, m_t)
    a_c = tl.exp2(m_c - m_i)
    a_t = tl.exp2(m_t - m_i)
    l_i = l_c * a_c + l_t * a_t
    acc = acc_c * a_c[:, None] + acc_t * a_t[:, None]
    n_rows_total = tl.num_programs(0) // HKV * N * H
    _store_attention_result(acc, m_i, l_i, out_ptr, part_o_ptr, part_lse_ptr, b, br, hq, row_ok, offs_d,
                            d_mask, split, N, H, D, n_rows_total, stride_ob, stride_on, stride_oh, stride_od,
                            NUM_SPLITS)


def tree_attention(q, k_cache, v_cache, trunk_lens, branch_glue, k_tree, v_tree, depth, scale, *,
                   num_splits=None, block_n=None):
    """One SSD tree-decode attention step with an implicit mask (no dense mask, nothing planned on the host).

    q [B, N, H, D]: one query per branch at tree depth ``depth`` (python int).  The trunk + glue live in
    k_cache/v_cache [B, S, Hkv, D]; branch i of row b sees slots 0 .. trunk_lens[b] + branch_glue[b, i]
    (inclusive; glue offset j in 0..K selects the glue tokens r, s1..sj) and entries 0..depth of its own chain
    k_tree/v_tree [B, N, Kmax, Hkv, D] (entry ``depth`` is this step's key, already written).  Fuses both
    attention parts and their log-sum-exp merge in one kernel; the trunk is loaded once per KV head for all
    branches.  Returns [B, N, H, D] in q's dtype.
    """
    assert q.dim() == 4, f"q must be [B, N, H, D], got {tuple(q.shape)}"
    B, N, H, D = q.shape
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, \
        f"k_cache/v_cache must both be [B, S, Hkv, D], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
    _, S, Hkv, Dk = k_cache.shape
    assert k_cache.shape[0] == B and Dk == D, f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}"
    assert H % Hkv == 0, f"query heads {H} must be a multiple of KV heads {Hkv}"
    assert k_tree.dim() == 5 and k_tree.shape == v_tree.shape, \
        f"k_tree/v_tree must both be [B, N, Kmax, Hkv, D], got {tuple(k_tree.shape)} and {tuple(v_tree.shape)}"
    Kmax = k_tree.shape[2]
    assert k_tree.shape == (B, N, Kmax, Hkv, D), f"k_tree {tuple(k_tree.shape)} does not match q/cache"
    depth = int(depth)
    assert 0 <= depth < Kmax, f"depth {depth} must be in [0, Kmax={Kmax})"
    assert q.dtype == k_cache.dtype == v_cache.dtype == k_tree.dtype == v_tree.dtype, \
        "q, caches and tree scratch must share a dtype"
    assert trunk_lens.shape == (B,) and not trunk_lens.is_floating_point(), "trunk_lens must be an int tensor [B]"
    assert branch_glue.shape == (B, N) and not branch_glue.is_floating_point(), \
        "branch_glue must be an int tensor [B, N]"
    _check_device(q, k_cache, v_cache, trunk_lens, branch_glue, k_tree, v_tree)
    G = H // Hkv
    BLOCK_M, BLOCK_N, BLOCK_D, m_blocks, splits, out, part_o, part_lse = _plan_attention(
        q, N, G, Hkv, S, num_splits, block_n)
    _tree_attention_kernel[(B * Hkv, m_blocks, splits)](
        q, k_cache, v_cache, trunk_lens, branch_glue, k_tree, v_tree, out, part_o, part_lse,
        N, H, Hkv, G, S, D, depth, float(scale) * LOG2E, trunk_lens.stride(0),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *branch_glue.stride(),
        *k_tree.stride(), *v_tree.stride(), *out.stride(),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, NUM_SPLITS=splits,
        DOT_PRECISION=_dot_precision(q.dtype))
    if splits > 1:
        _launch_merge(part_o, part_lse, out, splits, N, H, D, BLOCK_D)
    return out


# ======================================================================================================
# 3. Fused residual add + RMSNorm
# ======================================================================================================

def add_rmsnorm_ref(x, residual, weight, eps):
    """Reference: new_residual = x + residual (rounded to x's dtype, as it is stored), normed =
    rmsnorm(new_residual) * weight in float32, cast to x's dtype.  residual None: new_residual = x."""
    if residual is None:
        new_res = x
    else:
        new_res = (x.float() + residual.float()).to(x.dtype)
    h = new_res.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(x.dtype), new_res


def rmsnorm_ref(x, weight, eps):
    return add_rmsnorm_ref(x, None, weight, eps)[0]


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, D, eps,
                        stride_xr, stride_xd, stride_rr, stride_rd, stride_w,
                        stride_or, stride_od, stride_sr, stride_sd,
                        HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_R rows per program, whole row in registers: one read of x (and residual), one write of the sum
    and of the normed row, instead of the 3 reads + 2 writes of separate add and norm kernels."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    h = tl.load(x_ptr + rows64[:, None] * stride_xr + cols[None, :] * stride_xd, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows64[:, None] * stride_rr + cols[None, :] * stride_rd, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + rows64[:, None] * stride_sr + cols[None, :] * stride_sd, h, mask=mask)
    h = h.to(tl.float32)
    var = tl.sum(h * h, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols * stride_w, mask=cols < D, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_or + cols[None, :] * stride_od,
             y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x, residual, weight, eps):
    """Fused ``new_residual = x + residual; normed = rmsnorm(new_residual) * weight`` over the last dim.

    x [..., D]; residual same shape or None (then new_residual is x itself); weight [D].  float32 math,
    outputs in x's dtype; the norm is taken of new_residual as stored (rounded to x's dtype).
    Returns (normed, new_residual)."""
    D = x.shape[-1]
    assert weight.dim() == 1 and weight.shape[0] == D, f"weight must be [{D}], got {tuple(weight.shape)}"
    if residual is not None:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}"
    assert x.is_floating_point(), "x must be floating point"
    _check_device(x, residual, weight)
    x2 = x.reshape(-1, D)
    n_rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, D)
    if residual is not None:
        r2 = residual.reshape(-1, D)
        new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        s2 = new_res.view(-1, D)
    else:
        r2 = s2 = x2
        new_res = x
    if n_rows == 0:
        return out, new_res
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_R = max(1, min(triton.next_power_of_2(n_rows), 4096 // BLOCK_D))
    if x.device.type == "cuda":
        num_warps = 4 if BLOCK_R * BLOCK_D <= 4096 else 8
    else:
        num_warps = 4
    _add_rmsnorm_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
        x2, r2, weight, out2, s2, n_rows, D, float(eps),
        *x2.stride(), *r2.stride(), weight.stride(0), *out2.stride(), *s2.stride(),
        HAS_RESIDUAL=residual is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return out, new_res


def rmsnorm(x, weight, eps):
    """RMSNorm over the last dim (also Qwen3's per-head q/k-norm: x [B, T, H, D], weight [D])."""
    return add_rmsnorm(x, None, weight, eps)[0]


# ======================================================================================================
# 4. RoPE (rotate-half convention of Llama / HF)
# ======================================================================================================

def rope_ref(x, positions, cos, sin):
    """Reference. x [B, T, H, D]; positions int [B, T]; cos, sin [max_pos, D/2] (any scaling already baked
    in).  Pairs (i, i + D/2): out_i = x_i c - x_{i+D/2} s, out_{i+D/2} = x_{i+D/2} c + x_i s.  float32
    math, output in x's dtype."""
    half = x.shape[-1] // 2
    c = cos.float()[positions.long()][:, :, None, :]  # [B, T, 1, D/2]
    s = sin.float()[positions.long()][:, :, None, :]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, T, H, HALF,
                 stride_xb, stride_xt, stride_xh, stride_xd, stride_pb, stride_pt,
                 stride_cp, stride_cd, stride_sp, stride_sd,
                 stride_ob, stride_ot, stride_oh, stride_od,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Program (token, head block): gathers the token's cos/sin row once for BLOCK_H heads and rotates both
    halves in registers (reads x once, writes once; safe in place since each element is read before its
    own write by the same program)."""
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads < H)[:, None] & (cols < HALF)[None, :]
    pos = tl.load(pos_ptr + b.to(tl.int64) * stride_pb + t * stride_pt).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_cp + cols * stride_cd, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_sp + cols * stride_sd, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    xb = x_ptr + b.to(tl.int64) * stride_xb + t * stride_xt + heads[:, None] * stride_xh
    x1 = tl.load(xb + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xb + (cols[None, :] + HALF) * stride_xd, mask=mask, other=0.0).to(tl.float32)
    ob = out_ptr + b.to(tl.int64) * stride_ob + t * stride_ot + heads[:, None] * stride_oh
    tl.store(ob + cols[None, :] * stride_od, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(ob + (cols[None, :] + HALF) * stride_od, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def rope(x, positions, cos, sin, *, out=None):
    """Rotary embedding, rotate-half convention.  x [B, T, H, D] (D even); positions int [B, T] (per token,
    e.g. P + j + 1 + depth for tree branches); cos, sin [max_pos, D/2], rows gathered by position (llama3
    or other scaling is baked into the tables).  float32 math; returns ``out`` (new tensor by default,
    ``out=x`` rotates in place)."""
    assert x.dim() == 4, f"x must be [B, T, H, D], got {tuple(x.shape)}"
    B, T, H, D = x.shape
    assert D % 2 == 0, f"head dim {D} must be even"
    half = D // 2
    assert positions.shape == (B, T) and not positions.is_floating_point(), \
        f"positions must be an int tensor [{B}, {T}], got {tuple(positions.shape)} {positions.dtype}"
    assert cos.dim() == 2 and cos.shape == sin.shape and cos.shape[1] == half, \
        f"cos/sin must be [max_pos, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype, "out must match x"
    _check_device(x, positions, cos, sin, out)
    if x.numel() == 0:
        return out
    BLOCK_HALF = triton.next_power_of_2(half)
    BLOCK_H = max(1, min(triton.next_power_of_2(H), 2048 // BLOCK_HALF))
    _rope_kernel[(B * T, triton.cdiv(H, BLOCK_H))](
        x, positions, cos, sin, out, T, H, half,
        *x.stride(), *positions.stride(), *cos.stride(), *sin.stride(), *out.stride(),
        BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF)
    return out


def rope_kv_write_ref(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv_heads):
    """Reference. qkv [B, T, H + 2 Hkv, D]: the fused projection's output viewed by heads (q heads, then k,
    then v). Returns q rotated [B, T, H, D]; writes k rotated and v as is into k_cache, v_cache
    [B, S, Hkv, D] at slot = position (the decode and verify steps' cache write). A position outside
    0 .. S-1 writes nothing (the bounds mask: a bad slot must never land in another row's cache)."""
    H, Hkv = n_heads, n_kv_heads
    rows = torch.arange(qkv.shape[0], device=qkv.device)[:, None].expand_as(positions)
    ok = (positions >= 0) & (positions < k_cache.shape[1])
    slots = positions.long()
    k_cache[rows[ok], slots[ok]] = rope_ref(qkv[:, :, H:H + Hkv], positions, cos, sin)[ok].to(k_cache.dtype)
    v_cache[rows[ok], slots[ok]] = qkv[:, :, H + Hkv:][ok].to(v_cache.dtype)
    return rope_ref(qkv[:, :, :H], positions, cos, sin)


@triton.jit
def _rope_kv_write_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, T, H, HKV, HALF, S,
                          stride_xb, stride_xt, stride_xh, stride_xd, stride_pb, stride_pt,
                          stride_cp, stride_cd, stride_sp, stride_sd,
                          stride_qb, stride_qt, stride_qh, stride_qd,
                          stride_kb, stride_ks, stride_kh, stride_kd,
                          stride_vb, stride_vs, stride_vh, stride_vd,
                          BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Program (token, block of the H + 2 Hkv heads): rotates q and k heads with the token's cos/sin row,
    stores q to its output, k and v straight into their cache slot (no separate index_put launches). A slot
    outside 0 .. S-1 is not written (bounds mask)."""
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    valid = (heads < H + 2 * HKV)[:, None] & (cols < HALF)[None, :]
    pos = tl.load(pos_ptr + b.to(tl.int64) * stride_pb + t * stride_pt).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_cp + cols * stride_cd, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_sp + cols * stride_sd, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    xb = x_ptr + b.to(tl.int64) * stride_xb + t * stride_xt + heads[:, None] * stride_xh
    x1 = tl.load(xb + cols[None, :] * stride_xd, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(xb + (cols[None, :] + HALF) * stride_xd, mask=valid, other=0.0).to(tl.float32)
    r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
    is_q = valid & (heads < H)[:, None]
    qb = q_ptr + b.to(tl.int64) * stride_qb + t * stride_qt + heads[:, None] * stride_qh
    tl.store(qb + cols[None, :] * stride_qd, r1.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(qb + (cols[None, :] + HALF) * stride_qd, r2.to(q_ptr.dtype.element_ty), mask=is_q)
    slot = pos + heads * 0                       # the slot per head row (a tensor, so the mask broadcasts)
    in_cache = ((slot >= 0) & (slot < S))[:, None]
    is_k = valid & ((heads >= H) & (heads < H + HKV))[:, None] & in_cache
    kb = kc_ptr + b.to(tl.int64) * stride_kb + pos * stride_ks + (heads - H)[:, None] * stride_kh
    tl.store(kb + cols[None, :] * stride_kd, r1.to(kc_ptr.dtype.element_ty), mask=is_k)
    tl.store(kb + (cols[None, :] + HALF) * stride_kd, r2.to(kc_ptr.dtype.element_ty), mask=is_k)
    is_v = valid & (heads >= H + HKV)[:, None] & in_cache
    vb = vc_ptr + b.to(tl.int64) * stride_vb + pos * stride_vs + (heads - H - HKV)[:, None] * stride_vh
    tl.store(vb + cols[None, :] * stride_vd, x1.to(vc_ptr.dtype.element_ty), mask=is_v)
    tl.store(vb + (cols[None, :] + HALF) * stride_vd, x2.to(vc_ptr.dtype.element_ty), mask=is_v)


def rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, n_heads, n_kv_heads):
    """RoPE on q and k fused with the KV-cache write of a decode or verify step: one launch where the
    separate version takes three (rope, and an index_put each for k and v), which matters when a step is
    launch-bound (per layer, every token). Same arguments and result as rope_kv_write_ref; positions are
    the slots. float32 math, like rope."""
    B, T, NH, D = qkv.shape
    H, Hkv, half = n_heads, n_kv_heads, D // 2
    assert NH == H + 2 * Hkv and D % 2 == 0, f"qkv must be [B, T, {H} + 2 x {Hkv}, D even], got {tuple(qkv.shape)}"
    assert positions.shape == (B, T) and not positions.is_floating_point(), "positions must be int [B, T]"
    assert k_cache.shape[0] == B and k_cache.shape[2:] == (Hkv, D) and v_cache.shape == k_cache.shape, \
        f"caches must be [{B}, S, {Hkv}, {D}], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
    assert cos.shape == sin.shape and cos.shape[1] == half, "cos/sin must be [max_pos, D/2]"
    _check_device(qkv, positions, cos, sin, k_cache, v_cache)
    q = torch.empty(B, T, H, D, dtype=qkv.dtype, device=qkv.device)
    if q.numel() == 0:
        return q
    BLOCK_HALF = triton.next_power_of_2(half)
    BLOCK_H = max(1, min(triton.next_power_of_2(NH), 2048 // BLOCK_HALF))
    _rope_kv_write_kernel[(B * T, triton.cdiv(NH, BLOCK_H))](
        qkv, positions, cos, sin, q, k_cache, v_cache, T, H, Hkv, half, k_cache.shape[1],
        *qkv.stride(), *positions.stride(), *cos.stride(), *sin.stride(), *q.stride(),
        *k_cache.stride(), *v_cache.stride(), BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF)
    return q


# ======================================================================================================
# 5. Sampling by exponential race (no host sync)
# ======================================================================================================
# If E_i ~ Exp(1) i.i.d., argmax_i p_i / E_i is distributed as p (min_i E_i / p_i is exponential with rate
# p_i, the classic race).  Zero-probability entries score -1 and never win while any p_i > 0.  Ties (measure
# zero) go to the lowest index, in the references and in the kernels alike.

def _race_scores_ref(p, noise):
    p = p.float()
    return torch.where(p > 0, p / noise.float(), torch.full_like(p, -1.0))


def sample_exponential_race_ref(probs, noise):
    """Reference: argmax_i probs_i / noise_i per row (probs [R, V] >= 0, need not be normalized)."""
    return _race_scores_ref(probs, noise).argmax(dim=-1)


def sample_from_logits_ref(logits, temperature, noise):
    """Reference: per row, temperature 0 -> argmax logits, else argmax(logits / T - log E), i.e. a sample from
    softmax(logits / T) by the race in log space (no underflow)."""
    lf = logits.float()
    t = temperature.float()[:, None]
    safe_t = torch.where(t > 0, t, torch.ones_like(t))
    scores = torch.where(t > 0, lf / safe_t - torch.log(noise.float()), lf)
    return scores.argmax(dim=-1)


@triton.jit
def _race_scores(p, e):
    return tl.where(p > 0, tl.math.div_rn(p, e), -1.0)


@triton.jit
def _race_partial_kernel(x_ptr, noise_ptr, temp_ptr, best_val_ptr, best_idx_ptr, V, chunk, NUM_CHUNKS,
                         stride_xr, stride_xv, stride_nr, stride_nv, stride_tr,
                         FROM_LOGITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (row, chunk of V): running per-lane maxima of the race score over the chunk, then one
    reduction; writes (best score, lowest index attaining it); _finish_race_kernel picks across chunks."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    row64 = row.to(tl.int64)
    start = c * chunk
    end = tl.minimum(start + chunk, V)
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_i = start + offs  # any valid index; replaced by the first finite score
    if FROM_LOGITS:
        t = tl.load(temp_ptr + row64 * stride_tr).to(tl.float32)
        safe_t = tl.where(t > 0, t, 1.0)
    for v0 in range(start, end, BLOCK_V):
        idx = v0 + offs
        ok = idx < end
        x = tl.load(x_ptr + row64 * stride_xr + idx * stride_xv, mask=ok, other=0.0).to(tl.float32)
        e = tl.load(noise_ptr + row64 * stride_nr + idx * stride_nv, mask=ok, other=1.0).to(tl.float32)
        if FROM_LOGITS:
            sc = tl.where(t > 0, tl.math.div_rn(x, safe_t) - tl.log(e), x)
        else:
            sc = _race_scores(x, e)
        sc = tl.where(ok, sc, float("-inf"))
        upd = sc > best
        best = tl.where(upd, sc, best)
        best_i = tl.where(upd, idx, best_i)
    mx = tl.max(best, axis=0)
    i = tl.min(tl.where(best == mx, best_i, 2147483647), axis=0)
    tl.store(best_val_ptr + row64 * NUM_CHUNKS + c, mx)
    tl.store(best_idx_ptr + row64 * NUM_CHUNKS + c, i)


def _num_chunks(num_chunks, rows, V, block_v, device):
    if num_chunks is not None:
        return max(1, min(int(num_chunks), triton.cdiv(V, block_v)))
    target = _gpu_programs_target(device)
    if rows >= target:
        return 1
    return max(1, min(triton.cdiv(target, rows), triton.cdiv(V, 4 * block_v)))


@triton.jit
def _finish_race_kernel(val_ptr, idx_ptr, fb_val_ptr, fb_idx_ptr, out_ptr, NUM_CHUNKS,
                        HAS_FALLBACK: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per row: the winner over the row's chunks (lowest chunk on ties, hence lowest index).
    With HAS_FALLBACK (verify): if no chunk has a positive residual (best score -1), take the winner of the
    fallback race instead.  One launch instead of a handful of small torch ops."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < NUM_CHUNKS
    val = tl.load(val_ptr + row * NUM_CHUNKS + offs, mask=ok, other=float("-inf"))
    idx = tl.load(idx_ptr + row * NUM_CHUNKS + offs, mask=ok, other=0)
    best = tl.max(val, axis=0)
    win = tl.min(tl.where(ok & (val == best), offs, BLOCK_C), axis=0)
    tok = tl.sum(tl.where(offs == win, idx, 0), axis=0)
    if HAS_FALLBACK:
        fval = tl.load(fb_val_ptr + row * NUM_CHUNKS + offs, mask=ok, other=float("-inf"))
        fidx = tl.load(fb_idx_ptr + row * NUM_CHUNKS + offs, mask=ok, other=0)
        fbest = tl.max(fval, axis=0)
        fwin = tl.min(tl.where(ok & (fval == fbest), offs, BLOCK_C), axis=0)
        ftok = tl.sum(tl.where(offs == fwin, fidx, 0), axis=0)
        tok = tl.where(best > -1.0, tok, ftok)
    tl.store(out_ptr + row, tok.to(tl.int64))


def _finish_race(best_val, best_idx, fb_val=None, fb_idx=None):
    R, chunks = best_val.shape
    if chunks == 1 and fb_val is None:
        return best_idx.view(R).to(torch.int64)
    out = torch.empty((R,), dtype=torch.int64, device=best_val.device)
    has_fb = fb_val is not None
    _finish_race_kernel[(R,)](best_val, best_idx, fb_val if has_fb else best_val, fb_idx if has_fb else best_idx,
                              out, chunks, HAS_FALLBACK=has_fb, BLOCK_C=max(2, triton.next_power_of_2(chunks)))
    return out


def _race(x, noise, temperature, from_logits, num_chunks, block_v):
    assert x.dim() == 2, f"expected [R, V], got {tuple(x.shape)}"
    R, V = x.shape
    assert noise.shape == (R, V), f"noise must be [{R}, {V}], got {tuple(noise.shape)}"
    assert V >= 1
    _check_device(x, noise, temperature)
    if block_v is None:
        block_v = 1024 if x.device.type == "cuda" else min(1024, max(16, triton.next_power_of_2(V)))
    chunks = _num_chunks(num_chunks, R, V, block_v, x.device)
    chunk = triton.cdiv(triton.cdiv(V, chunks), block_v) * block_v
    chunks = triton.cdiv(V, chunk)
    best_val = torch.empty((R, chunks), dtype=torch.float32, device=x.device)
    best_idx = torch.empty((R, chunks), dtype=torch.int32, device=x.device)
    if R == 0:
        return torch.empty((0,), dtype=torch.int64, device=x.device)
    t = temperature if temperature is not None else x
    _race_partial_kernel[(R, chunks)](
        x, noise, t, best_val, best_idx, V, chunk, chunks,
        *x.stride(), *noise.stride(), t.stride(0),
        FROM_LOGITS=from_logits, BLOCK_V=block_v)
    return _finish_race(best_val, best_idx)


def sample_exponential_race(probs, noise, *, num_chunks=None, block_v=None):
    """Exact sample per row from probs [R, V] (nonnegative, need not be normalized; one-hot rows fine) given
    noise [R, V] i.i.d. Exp(1): argmax_i probs_i / noise_i.  Fuses the division, the zero-probability guard
    and the argmax in one pass over V, split into chunks across programs when rows are few.  int64 [R]."""
    return _race(probs, noise, None, False, num_chunks, block_v)


def sample_from_logits(logits, temperature, noise, *, num_chunks=None, block_v=None):
    """Sample per row from softmax(logits / temperature) with noise Exp(1) [R, V], fused with the softmax:
    argmax(logits / T - log E) in log space (nothing exponentiated, no underflow, no normalization pass).
    temperature float [R]; rows with temperature 0 take argmax(logits).  int64 [R]."""
    assert temperature.shape == (logits.shape[0],), \
        f"temperature must be [{logits.shape[0]}], got {tuple(temperature.shape)}"
    return _race(logits, noise, temperature, True, num_chunks, block_v)


# ======================================================================================================
# 6. Verify: the exact speculative-sampling step
# ======================================================================================================

def verify_ref(p, q, draft_tokens, uniforms, noise):
    """Reference.  p [B, K+1, V] target probs, q [B, K, V] the draft probs the proposals were drawn from,
    draft_tokens int [B, K], uniforms [B, K] in [0, 1), noise Exp(1) [B, V].
    Accept s_i while u_i * q_i(s_i) < p_i(s_i); n = number accepted.  n < K: recovery ~ max(0, p_n - q_n)
    (p_n if that is all zero); n == K: bonus ~ p_K; both by the race with ``noise``.
    Returns (n int64 [B], recovery int64 [B])."""
    B, K1, V = p.shape
    K = K1 - 1
    pf, qf = p.float(), q.float()
    tok = draft_tokens.long()
    p_s = pf[:, :K].gather(2, tok[..., None]).squeeze(-1)
    q_s = qf.gather(2, tok[..., None]).squeeze(-1)
    accept = uniforms.float() * q_s < p_s
    n = accept.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B, device=p.device)
    p_n = pf[rows, n]
    q_n = torch.where((n < K)[:, None], qf[rows, n.clamp(max=K - 1)], torch.zeros_like(p_n))
    resid = (p_n - q_n).clamp_min(0.0)
    r_score = _race_scores_ref(resid, noise)
    p_score = _race_scores_ref(p_n, noise)
    r_best, r_idx = r_score.max(dim=1)
    recovery = torch.where(r_best > -1.0, r_idx, p_score.argmax(dim=1))
    return n, recovery


@triton.jit
def _verify_kernel(p_ptr, q_ptr, tok_ptr, u_ptr, noise_ptr, n_ptr,
                   rv_ptr, ri_ptr, pv_ptr, pi_ptr, K, V, chunk, NUM_CHUNKS,
                   stride_pb, stride_pk, stride_pv, stride_qb, stride_qk, stride_qv,
                   stride_tb, stride_tk, stride_ub, stride_uk, stride_nb, stride_nv,
                   BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (row, chunk of V).  Recomputes n from K scalar gathers (cheap, avoids a second launch),
    then streams p_n, q_n and the noise over its chunk once, racing both the residual max(0, p_n - q_n) and
    p_n itself (the all-zero-residual fallback), so the choice between them needs no extra pass."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    tok = tl.load(tok_ptr + b64 * stride_tb + ks * stride_tk, mask=k_ok, other=0).to(tl.int64)
    p_s = tl.load(p_ptr + b64 * stride_pb + ks * stride_pk + tok * stride_pv, mask=k_ok, other=0.0).to(tl.float32)
    q_s = tl.load(q_ptr + b64 * stride_qb + ks * stride_qk + tok * stride_qv, mask=k_ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + b64 * stride_ub + ks * stride_uk, mask=k_ok, other=1.0).to(tl.float32)
    rejected = k_ok & ~(u * q_s < p_s)
    n = tl.min(tl.where(rejected, ks, K), axis=0)
    if c == 0:
        tl.store(n_ptr + b64, n.to(tl.int64))

    start = c * chunk
    end = tl.minimum(start + chunk, V)
    q_end = tl.where(n < K, end, 0)  # q row n exists only if n < K (else the bonus row: q = 0)
    p_row = p_ptr + b64 * stride_pb + n * stride_pk
    q_row = q_ptr + b64 * stride_qb + tl.minimum(n, K - 1) * stride_qk
    offs = tl.arange(0, BLOCK_V)
    r_best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    p_best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    r_idx = start + offs
    p_idx = start + offs
    for v0 in range(start, end, BLOCK_V):
        idx = v0 + offs
        ok = idx < end
        pv = tl.load(p_row + idx * stride_pv, mask=ok, other=0.0).to(tl.float32)
        qv = tl.load(q_row + idx * stride_qv, mask=idx < q_end, other=0.0).to(tl.float32)
        e = tl.load(noise_ptr + b64 * stride_nb + idx * stride_nv, mask=ok, other=1.0).to(tl.float32)
        r_sc = tl.where(ok, _race_scores(tl.maximum(pv - qv, 0.0), e), float("-inf"))
        p_sc = tl.where(ok, _race_scores(pv, e), float("-inf"))
        upd = r_sc > r_best
        r_best = tl.where(upd, r_sc, r_best)
        r_idx = tl.where(upd, idx, r_idx)
        upd = p_sc > p_best
        p_best = tl.where(upd, p_sc, p_best)
        p_idx = tl.where(upd, idx, p_idx)
    rm = tl.max(r_best, axis=0)
    pm = tl.max(p_best, axis=0)
    tl.store(rv_ptr + b64 * NUM_CHUNKS + c, rm)
    tl.store(ri_ptr + b64 * NUM_CHUNKS + c, tl.min(tl.where(r_best == rm, r_idx, 2147483647), axis=0))
    tl.store(pv_ptr + b64 * NUM_CHUNKS + c, pm)
    tl.store(pi_ptr + b64 * NUM_CHUNKS + c, tl.min(tl.where(p_best == pm, p_idx, 2147483647), axis=0))


def verify(p, q, draft_tokens, uniforms, noise, *, num_chunks=None, block_v=None):
    """Fused exact verification of K proposals per row (Leviathan et al. 2023; Chen et al. 2023).

    p [B, K+1, V] target probs (already temperature/top-k/top-p processed), q [B, K, V] the exact draft probs
    the proposals were sampled from (one-hot rows for deterministic proposals: the rule then accepts with
    probability p(s) and resamples from p without s), draft_tokens int [B, K], uniforms [B, K] in [0, 1),
    noise Exp(1) [B, V].  One kernel finds n (first i with u_i q_i(s_i) >= p_i(s_i)) and races the residual
    max(0, p_n - q_n) (fallback p_n if all zero; p_K if all accepted) against the noise; a tiny second
    kernel picks the winner across chunks.  No host sync.  Returns (n_accepted int64 [B], recovery int64 [B]),
    identical to ``verify_ref`` for the same uniforms and noise."""
    assert p.dim() == 3, f"p must be [B, K+1, V], got {tuple(p.shape)}"
    B, K1, V = p.shape
    K = K1 - 1
    assert K >= 1, "need at least one draft token (K >= 1)"
    assert q.shape == (B, K, V), f"q must be [{B}, {K}, {V}], got {tuple(q.shape)}"
    assert p.is_floating_point() and q.is_floating_point(), "p and q must be floating point"
    assert draft_tokens.shape == (B, K) and not draft_tokens.is_floating_point(), \
        f"draft_tokens must be an int tensor [{B}, {K}], got {tuple(draft_tokens.shape)}"
    assert uniforms.shape == (B, K), f"uniforms must be [{B}, {K}], got {tuple(uniforms.shape)}"
    assert noise.shape == (B, V), f"noise must be [{B}, {V}], got {tuple(noise.shape)}"
    _check_device(p, q, draft_tokens, uniforms, noise)
    dev = p.device
    if block_v is None:
        block_v = 1024 if dev.type == "cuda" else min(1024, max(16, triton.next_power_of_2(V)))
    chunks = _num_chunks(num_chunks, B, V, block_v, dev)
    chunk = triton.cdiv(triton.cdiv(V, chunks), block_v) * block_v
    chunks = triton.cdiv(V, chunk)
    n = torch.empty((B,), dtype=torch.int64, device=dev)
    rv = torch.empty((B, chunks), dtype=torch.float32, device=dev)
    pv = torch.empty((B, chunks), dtype=torch.float32, device=dev)
    ri = torch.empty((B, chunks), dtype=torch.int32, device=dev)
    pi = torch.empty((B, chunks), dtype=torch.int32, device=dev)
    if B == 0:
        return n, n.clone()
    _verify_kernel[(B, chunks)](
        p, q, draft_tokens, uniforms, noise, n, rv, ri, pv, pi, K, V, chunk, chunks,
        *p.stride(), *q.stride(), *draft_tokens.stride(), *uniforms.stride(), *noise.stride(),
        BLOCK_K=max(2, triton.next_power_of_2(K)), BLOCK_V=block_v)
    return n, _finish_race(rv, ri, pv, pi)


def verify_greedy(target_argmax, draft_tokens):
    """Temperature-0 verification in plain torch (no kernel needed): target_argmax int [B, K+1] (argmax of
    the target at each verified position), draft_tokens int [B, K].  n = length of the matching prefix,
    recovery = target_argmax[b, n].  Equals ``verify`` with one-hot p and q.  No host sync."""
    B, K1 = target_argmax.shape
    assert draft_tokens.shape == (B, K1 - 1), "draft_tokens must be [B, K] with target_argmax [B, K+1]"
    match = target_argmax[:, :-1].long() == draft_tokens.long()
    n = match.long().cumprod(dim=1).sum(dim=1)
    return n, target_argmax.long().gather(1, n[:, None]).squeeze(1)


# ======================================================================================================
# 8. Skinny linear layer (a decode step's projections at batch 1: one row against a large weight)
# ======================================================================================================

def skinny_linear_ref(x, weight, bias=None, config=None):
    """Reference. x [..., K] @ weight[N, K]^T (+ bias [N]) -> [..., N]: what F.linear computes
    (`config`, the kernel's block sizes, is ignored)."""
    return torch.nn.functional.linear(x, weight, bias)


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program n: outputs [n*BLOCK_N, (n+1)*BLOCK_N) of one row, the whole K reduction in one program.
    Each weight element is read once, coalesced along K, and no partial sums leave the program, so there
    is no split-K reduction kernel. Products accumulate elementwise in float32 and are summed at the end."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                    other=0.0)
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)


SKINNY_MAX_ROWS = 1
# (BLOCK_N, BLOCK_K, num_warps, num_stages): the candidates skinny_linear_choose times on the real weights.
SKINNY_CONFIGS = ((8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 8, 3), (32, 256, 8, 3))


def skinny_linear(x, weight, bias=None, config=SKINNY_CONFIGS[0]):
    """F.linear for SKINNY_MAX_ROWS = 1 row (a decode step at batch 1: the memory-bound case), one launch.
    cuBLAS splits K for the smaller decode projections and reduces in a second kernel, and leaves a
    quarter of the bandwidth unused on them (scripts/profile_step.py); here a program owns BLOCK_N
    output columns over the whole K, so the weight streams once and nothing is reduced afterwards."""
    *lead, K = x.shape
    N = weight.shape[0]
    assert weight.shape[1] == K, f"x has K={K}, weight is {tuple(weight.shape)}"
    _check_device(x, weight)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    assert M <= SKINNY_MAX_ROWS, f"skinny_linear takes at most {SKINNY_MAX_ROWS} rows, got {M}"
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    assert weight.stride(-1) == 1, "weight must be contiguous along K"
    assert weight.shape[0] * weight.stride(0) < 2 ** 31, "the kernel indexes the weight with 32-bit offsets"
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*lead, N)
    block_n, block_k, warps, stages = config
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    _skinny_linear_kernel[(triton.cdiv(N, block_n),)](
        x2, weight, bias if bias is not None else weight, out, N, K, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out.view(*lead, N)


def skinny_linear_choose(weights, rows=1, reps=7):
    """Time F.linear against each SKINNY_CONFIGS entry on `weights` (every layer's copy of one projection,
    so the pass streams from memory as a real step does, not from L2) and return the fastest: None for
    F.linear, else the config, and the times (ms per pass). Synchronizes and captures CUDA graphs: call it
    at load, before the engine captures its own, never inside a round."""
    w0 = weights[0]
    if w0.numel() >= 2 ** 31:                            # beyond the kernel's 32-bit offsets
        return None, {}
    x = torch.randn(rows, w0.shape[1], dtype=w0.dtype, device=w0.device)
    candidates = [None] + list(SKINNY_CONFIGS)

    def one_pass(cfg):
        for w in weights:
            if cfg is None:
                torch.nn.functional.linear(x, w)
            else:
                skinny_linear(x, w, None, cfg)
    # Timed as CUDA-graph replays, as the engine runs them: launched eagerly from Python, a Triton kernel's
    # launch overhead (tens of microseconds) would hide what the GPU does.
    times = {}
    stream = torch.cuda.Stream(w0.device)
    for cfg in candidates:
        one_pass(cfg)                                    # compile / warm up
        torch.cuda.synchronize(w0.device)
        graph = torch.cuda.CUDAGraph()
        # thread-local: another thread's CUDA calls meanwhile (a draft worker) must not invalidate this capture; and
        # no garbage collection inside it (a collected CUDA graph would be destroyed mid-capture)
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                one_pass(cfg)
        finally:
            if gc_was_on:
                gc.enable()
        graph.replay()
        ts = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end))
        times[cfg] = sorted(ts)[len(ts) // 2]
        del graph
    best = min(candidates, key=lambda c: times[c])
    return best, {("torch" if c is None else "x".join(map(str, c))): t for c, t in times.items()}


INTERPRET = type(_rope_kernel).__name__ == "InterpretedFunction"


# ======================================================================================================
# 7. SwiGLU gate
# ======================================================================================================

def silu_mul_ref(gate_up):
    """Reference. gate_up [..., 2I] (the fused gate and up projections, gate first) -> silu(gate) * up [..., I],
    float32 math, output in the input's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr):
    """Program (row, block of I): reads gate and up once, writes silu(gate) * up."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up):
    """silu(gate) * up over the last dim of the fused gate-up projection: one launch instead of three
    (split, silu, multiply), and one read of the [.., 2I] activations. Returns [..., I]."""
    assert gate_up.shape[-1] % 2 == 0, f"last dim must be even (gate and up), got {gate_up.shape[-1]}"
    _check_device(gate_up)
    I2 = gate_up.shape[-1]
    I = I2 // 2
    x = gate_up.reshape(-1, I2)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], I, dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0] == 0:
        return out.view(*gate_up.shape[:-1], I)
    BLOCK = 1024 if gate_up.device.type == "cuda" else min(1024, triton.next_power_of_2(I))
    _silu_mul_kernel[(x.shape[0], triton.cdiv(I, BLOCK))](x, out, I, x.stride(0), out.stride(0), BLOCK=BLOCK)
    return out.view(*gate_up.shape[:-1], I)
