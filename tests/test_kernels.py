"""ssd_kernels.py against its torch references.

On a machine without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set below before
triton is imported), on CPU tensors, in float32 with tight tolerances; shapes are small but awkward.  Tests
marked ``gpu`` repeat the comparisons on CUDA in bfloat16 (looser tolerances) and are skipped without a GPU.
Every buffer the wrappers allocate with torch.empty / torch.empty_like is poisoned (NaN / sentinel ints),
so an element a kernel forgets to write fails the comparison.
"""
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ssd_kernels as K  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and not K.INTERPRET else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or K.INTERPRET, reason="needs a CUDA GPU")
TOL32 = dict(rtol=1e-4, atol=1e-5)
TOL16 = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """torch.empty / empty_like hand out NaN-filled (float) or sentinel-filled (int) memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-123456)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32, device=DEV):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _i32(vals, device=DEV):
    return torch.tensor(vals, dtype=torch.int32, device=device)


# ------------------------------------------------------------------ cache attention

ATTN_CASES = [
    # B, T, H, Hkv, D, S, cache_lens, num_splits, block_n
    (1, 1, 4, 4, 64, 37, [36], 1, 32),
    (3, 5, 8, 2, 80, 37, [0, 17, 32], 1, 16),
    (3, 5, 8, 2, 80, 37, [0, 17, 32], 3, 16),
    (3, 1, 6, 2, 64, 37, [0, 5, 36], 2, 16),
    (1, 9, 8, 1, 96, 21, [12], 1, 16),  # 72 query rows per KV head: two M blocks
]


@pytest.mark.parametrize("B,T,H,Hkv,D,S,lens,splits,block_n", ATTN_CASES)
def test_cache_attention(B, T, H, Hkv, D, S, lens, splits, block_n):
    g = _gen(B * 1000 + T * 100 + D + splits)
    q = _randn(g, B, T, H, D)
    k = _randn(g, B, S, Hkv, D)
    v = _randn(g, B, S, Hkv, D)
    cl = _i32(lens)
    scale = 1.0 / math.sqrt(D)
    out = K.cache_attention(q, k, v, cl, scale, num_splits=splits, block_n=block_n)
    torch.testing.assert_close(out, K.cache_attention_ref(q, k, v, cl, scale), **TOL32)


def test_cache_attention_strided():
    """Per-layer slices of one preallocated cache, q as a view of a fused qkv projection, int64 lens."""
    g = _gen(7)
    B, T, H, Hkv, D, S, L = 3, 2, 6, 2, 64, 29, 2
    kv = _randn(g, L, 2, B, S, Hkv, D)
    k, v = kv[1, 0], kv[1, 1]
    qkv = _randn(g, B, T, H * D + 2 * Hkv * D)
    q = qkv[..., : H * D].view(B, T, H, D)
    assert not q.is_contiguous()
    cl = torch.tensor([3, 0, 27], dtype=torch.int64, device=DEV)
    out = K.cache_attention(q, k, v, cl, 0.125)
    torch.testing.assert_close(out, K.cache_attention_ref(q, k, v, cl, 0.125), **TOL32)


def test_cache_attention_ref_is_plain_causal_attention():
    """The reference itself: with all rows full-length it is ordinary causal attention over the cache."""
    g = _gen(11)
    B, T, H, D, S = 2, 3, 2, 8, 6
    q, k, v = _randn(g, B, T, H, D), _randn(g, B, S, H, D), _randn(g, B, S, H, D)
    cl = _i32([S - T] * B)
    mask = torch.ones(T, S, dtype=torch.bool, device=DEV).tril(diagonal=S - T)
    expect = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(K.cache_attention_ref(q, k, v, cl, 0.3), expect, **TOL32)


# ------------------------------------------------------------------ tree attention

TREE_CASES = [
    # B, N, H, Hkv, D, S, Kmax, depth, trunk_lens, num_splits
    (1, 1, 4, 4, 64, 37, 4, 0, [0], 1),
    (3, 7, 6, 2, 80, 37, 4, 3, [0, 9, 30], 1),
    (3, 7, 8, 2, 64, 37, 4, 0, [30, 0, 12], 2),
    (3, 7, 6, 2, 80, 37, 4, 3, [5, 0, 30], 3),
]


@pytest.mark.parametrize("B,N,H,Hkv,D,S,Kmax,depth,trunk,splits", TREE_CASES)
def test_tree_attention(B, N, H, Hkv, D, S, Kmax, depth, trunk, splits):
    g = _gen(B * 1000 + N * 100 + D + depth + splits)
    q = _randn(g, B, N, H, D)
    kc, vc = _randn(g, B, S, Hkv, D), _randn(g, B, S, Hkv, D)
    kt, vt = _randn(g, B, N, Kmax, Hkv, D), _randn(g, B, N, Kmax, Hkv, D)
    tl_ = _i32(trunk)
    glue = torch.randint(0, Kmax, (B, N), generator=g, dtype=torch.int32).to(DEV)  # glue offset 0..K (K=Kmax-1 here)
    glue[:, 0] = 0
    scale = 1.0 / math.sqrt(D)
    out = K.tree_attention(q, kc, vc, tl_, glue, kt, vt, depth, scale, num_splits=splits, block_n=16)
    torch.testing.assert_close(out, K.tree_attention_ref(q, kc, vc, tl_, glue, kt, vt, depth, scale), **TOL32)


def test_tree_attention_ref_matches_flattened_sequences():
    """The reference itself: each branch equals plain attention over its own explicit key sequence
    (cache slots 0..trunk+glue followed by chain entries 0..depth)."""
    g = _gen(5)
    B, N, H, Hkv, D, S, Kmax, depth = 2, 3, 4, 2, 8, 10, 3, 1
    q = _randn(g, B, N, H, D)
    kc, vc = _randn(g, B, S, Hkv, D), _randn(g, B, S, Hkv, D)
    kt, vt = _randn(g, B, N, Kmax, Hkv, D), _randn(g, B, N, Kmax, Hkv, D)
    trunk, glue = _i32([4, 6]), _i32([[0, 1, 2], [2, 0, 1]])
    out = K.tree_attention_ref(q, kc, vc, trunk, glue, kt, vt, depth, 0.5)
    for b in range(B):
        for i in range(N):
            n_c = int(trunk[b] + glue[b, i]) + 1
            keys = torch.cat([kc[b, :n_c], kt[b, i, : depth + 1]]).repeat_interleave(H // Hkv, dim=1)
            vals = torch.cat([vc[b, :n_c], vt[b, i, : depth + 1]]).repeat_interleave(H // Hkv, dim=1)
            att = torch.softmax(torch.einsum("hd,shd->hs", q[b, i], keys) * 0.5, dim=-1)
            torch.testing.assert_close(out[b, i], torch.einsum("hs,shd->hd", att, vals), **TOL32)


# ------------------------------------------------------------------ RMSNorm

@pytest.mark.parametrize("shape", [(3, 5, 80), (1, 1, 64), (37, 96)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm(shape, with_residual):
    g = _gen(len(shape) * 10 + shape[-1] + with_residual)
    x = _randn(g, *shape)
    res = _randn(g, *shape) if with_residual else None
    w = _randn(g, shape[-1])
    normed, new_res = K.add_rmsnorm(x, res, w, 1e-6)
    ref_normed, ref_res = K.add_rmsnorm_ref(x, res, w, 1e-6)
    torch.testing.assert_close(normed, ref_normed, **TOL32)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    if not with_residual:
        assert new_res is x


def test_rmsnorm_per_head_and_strided():
    """Qwen3 q/k-norm: x [B, T, H, D] (here a non-contiguous view), weight [D]; and against the textbook formula."""
    g = _gen(3)
    x = _randn(g, 3, 6, 5, 64).transpose(1, 2)  # [B, T=5, H=6, D] non-contiguous
    w = _randn(g, 64)
    out = K.rmsnorm(x, w, 1e-5)
    expect = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(out, K.rmsnorm_ref(x, w, 1e-5), **TOL32)
    torch.testing.assert_close(out, expect, **TOL32)


# ------------------------------------------------------------------ RoPE

def _rope_tables(max_pos, D, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(DEV), ang.sin().float().to(DEV)


@pytest.mark.parametrize("B,T,H,D", [(3, 5, 6, 80), (1, 1, 4, 64), (3, 1, 8, 128)])
def test_rope(B, T, H, D):
    g = _gen(B + T + H + D)
    x = _randn(g, B, T, H, D)
    pos = torch.randint(0, 50, (B, T), generator=g).to(DEV)
    cos, sin = _rope_tables(50, D)
    out = K.rope(x, pos, cos, sin)
    torch.testing.assert_close(out, K.rope_ref(x, pos, cos, sin), **TOL32)


def test_rope_matches_hf_convention_inplace_and_strided():
    """rotate_half with duplicated [cos, cos] tables (the HF formula); int32 positions; in place on a strided view."""
    g = _gen(9)
    B, T, H, D = 2, 3, 4, 64
    qkv = _randn(g, B, T, 3 * H * D)
    x = qkv[..., H * D: 2 * H * D].view(B, T, H, D)
    pos = _i32([[7, 8, 9], [0, 1, 40]])
    cos, sin = _rope_tables(41, D)
    c = torch.cat([cos, cos], -1)[pos.long()][:, :, None]
    s = torch.cat([sin, sin], -1)[pos.long()][:, :, None]
    rot = torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)
    expect = x * c + rot * s
    before = qkv.clone()
    out = K.rope(x, pos, cos, sin, out=x)
    assert out is x
    torch.testing.assert_close(x, expect, **TOL32)
    torch.testing.assert_close(qkv[..., : H * D], before[..., : H * D], rtol=0, atol=0)  # neighbours untouched
    torch.testing.assert_close(qkv[..., 2 * H * D:], before[..., 2 * H * D:], rtol=0, atol=0)


# ------------------------------------------------------------------ SwiGLU gate

@pytest.mark.parametrize("shape", [(1, 1, 2 * 37), (3, 5, 2 * 96), (2, 2 * 1536)])
def test_silu_mul(shape):
    g = _gen(shape[-1] + len(shape))
    x = _randn(g, *shape) * 3
    out = K.silu_mul(x)
    assert out.shape == shape[:-1] + (shape[-1] // 2,)
    torch.testing.assert_close(out, K.silu_mul_ref(x), **TOL32)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, **TOL32)


# ------------------------------------------------------------------ sampling

def _probs_with_edge_rows(g, R, V):
    logits = _randn(g, R, V) * 3
    p = torch.softmax(logits, -1)
    p[0] = 0.0
    p[0, V - 1] = 1.0  # one-hot at the last index
    p[1, : V // 2] = 0.0  # zeros must never win
    p[2] = 0.0
    p[2, 3] = 0.25  # unnormalized, one nonzero
    return p


@pytest.mark.parametrize("R,V,chunks,block_v", [(5, 37, 1, None), (6, 1000, 3, 128)])
def test_sample_exponential_race_same_ids(R, V, chunks, block_v):
    g = _gen(R * V)
    p = _probs_with_edge_rows(g, R, V)
    noise = torch.empty(R, V).exponential_(generator=g).to(DEV)
    ids = K.sample_exponential_race(p, noise, num_chunks=chunks, block_v=block_v)
    ref = K.sample_exponential_race_ref(p, noise)
    assert ids.dtype == torch.int64
    assert torch.equal(ids, ref)
    assert ids[0] == V - 1 and ids[2] == 3 and ids[1] >= V // 2
    assert (p.gather(1, ids[:, None]) > 0).all()


def test_sample_exponential_race_distribution():
    """One row of a small distribution, repeated: empirical frequencies match (chi-square, ~1e-5 false alarm)."""
    g = _gen(123)
    probs = torch.tensor([0.5, 0.0, 0.25, 0.15, 0.1])
    R, V = 800, probs.numel()
    noise = torch.empty(R, V).exponential_(generator=g).to(DEV)
    ids = K.sample_exponential_race(probs.to(DEV).expand(R, V), noise)
    assert torch.equal(ids, K.sample_exponential_race_ref(probs.to(DEV).expand(R, V), noise))
    counts = torch.bincount(ids.cpu(), minlength=V).double()
    assert counts[1] == 0
    nz = probs > 0
    expected = probs[nz].double() * R
    chi2 = ((counts[nz] - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0, (counts, expected)  # 3 dof: P(chi2 > 25) ~ 1.6e-5


@pytest.mark.parametrize("R,V,chunks,block_v", [(6, 37, 1, None), (5, 700, 3, 64)])
def test_sample_from_logits_same_ids(R, V, chunks, block_v):
    g = _gen(R + V)
    logits = _randn(g, R, V) * 4
    logits[1, : V // 2] = float("-inf")  # top-k style masking: never sampled
    temp = torch.tensor([0.0, 1.0, 0.7, 0.0, 2.0, 1e-3, 1.0][:R], device=DEV)
    noise = torch.empty(R, V).exponential_(generator=g).to(DEV)
    ids = K.sample_from_logits(logits, temp, noise, num_chunks=chunks, block_v=block_v)
    assert torch.equal(ids, K.sample_from_logits_ref(logits, temp, noise))
    assert ids[0] == logits[0].argmax() and ids[3] == logits[3].argmax()
    assert ids[1] >= V // 2
    # the log-space race equals the probability-space race on the softmax
    hot = temp > 0
    p = torch.softmax(logits[hot] / temp[hot, None], -1)
    assert torch.equal(ids[hot], K.sample_exponential_race_ref(p, noise[hot]))


# ------------------------------------------------------------------ verify

def _verify_batch(g, B, K_, V, kind):
    """Random verify inputs whose rows cover the rule's branches."""
    p = torch.softmax(_randn(g, B, K_ + 1, V, device="cpu") * 2, -1)
    q = torch.softmax(_randn(g, B, K_, V, device="cpu") * 2, -1)
    tok = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K_)
    u = torch.rand(B, K_, generator=g)
    for b in range(B):
        mode = (b + kind) % 6
        if mode == 1:  # deterministic proposals: one-hot q rows
            q[b] = torch.nn.functional.one_hot(tok[b], V).float()
        elif mode == 2:  # temperature 0: p and q one-hot
            a = p[b].argmax(-1)
            p[b] = torch.nn.functional.one_hot(a, V).float()
            tok[b] = torch.where(torch.rand(K_, generator=g) < 0.7, a[:K_], tok[b])
            q[b] = torch.nn.functional.one_hot(tok[b], V).float()
        elif mode == 3:  # draft == target: everything accepted, bonus from p_K
            p[b, :K_] = q[b]
        elif mode == 4:  # residual all zero at the rejection: p_j = q_j / 2 (unnormalized), u forces rejection
            j = int(torch.randint(0, K_, (1,), generator=g))
            p[b, :j] = q[b, :j]
            p[b, j] = q[b, j] * 0.5
            u[b, j] = 0.75
        elif mode == 5:  # sparse p (top-k processed): many exact zeros
            p[b] = p[b] * (torch.rand(K_ + 1, V, generator=g) < 0.3)
            p[b, :, 0] += 1e-3
    noise = torch.empty(B, V).exponential_(generator=g)
    return [t.to(DEV) for t in (p, q, tok, u, noise)]


@pytest.mark.parametrize("B,K_,V,chunks,block_v,kind", [
    (24, 4, 50, 1, None, 0), (24, 3, 50, 2, 16, 1), (12, 1, 33, 1, None, 2), (12, 7, 300, 3, 64, 3)])
def test_verify_same_as_ref(B, K_, V, chunks, block_v, kind):
    g = _gen(B * 7 + K_ * 31 + V + kind)
    p, q, tok, u, noise = _verify_batch(g, B, K_, V, kind)
    n, rec = K.verify(p, q, tok, u, noise, num_chunks=chunks, block_v=block_v)
    n_ref, rec_ref = K.verify_ref(p, q, tok, u, noise)
    assert n.dtype == rec.dtype == torch.int64
    assert torch.equal(n, n_ref), (n, n_ref)
    assert torch.equal(rec, rec_ref), (rec, rec_ref)
    # the recovery token is always possible under the target at row n
    assert (p[torch.arange(B, device=DEV), n].gather(1, rec[:, None]) > 0).all()
    # branch coverage: rejections, all-accepted rows, and an all-zero residual (mode 4 rows) all occur
    assert (n < K_).any() and (n == K_).any()


def test_verify_branches_and_greedy():
    """Hand-made rows with known outcomes; verify_greedy equals verify on one-hot p and q."""
    V, K_ = 6, 3
    eye = torch.eye(V, device=DEV)
    p = torch.stack([eye[[1, 2, 3, 4]], eye[[1, 5, 3, 4]], eye[[1, 2, 3, 0]]])  # [3, K+1, V]
    tok = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 2, 3]], device=DEV)
    q = eye[tok]
    u = torch.full((3, K_), 0.5, device=DEV)
    noise = torch.ones(3, V, device=DEV)
    n, rec = K.verify(p, q, tok, u, noise)
    assert n.tolist() == [3, 1, 0] and rec.tolist() == [4, 5, 1]
    n_g, rec_g = K.verify_greedy(p.argmax(-1), tok)
    assert torch.equal(n_g, n) and torch.equal(rec_g, rec)
    # residual all zero -> sample from p_j itself
    p2 = torch.full((1, 2, V), 0.5 / V, device=DEV)
    q2 = torch.full((1, 1, V), 1.0 / V, device=DEV)
    n2, rec2 = K.verify(p2, q2, torch.tensor([[2]], device=DEV), torch.tensor([[0.9]], device=DEV),
                        torch.arange(1.0, V + 1, device=DEV)[None])
    assert n2.item() == 0 and rec2.item() == 0


def test_verify_ref_is_exact():
    """Monte Carlo of the reference rule (torch only, cheap): the first emitted token is distributed as p_0,
    for q-sampled and for deterministic (one-hot) proposals."""
    g = _gen(77)
    p0 = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    qd = torch.tensor([0.1, 0.1, 0.5, 0.1, 0.2])
    M, V = 200_000, 5
    for deterministic in (False, True):
        if deterministic:
            tok = torch.full((M, 1), 2)
        else:
            tok = torch.multinomial(qd, M, replacement=True, generator=g)[:, None]
        q = torch.nn.functional.one_hot(tok, V).float() if deterministic else qd.expand(M, 1, V)
        p = torch.stack([p0, torch.full((V,), 0.2)]).expand(M, 2, V)
        n, rec = K.verify_ref(p, q, tok, torch.rand(M, 1, generator=g), torch.empty(M, V).exponential_(generator=g))
        first = torch.where(n == 1, tok[:, 0], rec)
        freq = torch.bincount(first, minlength=V).double() / M
        assert (freq - p0.double()).abs().max() < 0.006, (deterministic, freq)


# ------------------------------------------------------------------ validation

def test_wrappers_reject_bad_inputs():
    q = torch.zeros(1, 1, 6, 64, device=DEV)
    kc = torch.zeros(1, 8, 4, 64, device=DEV)
    with pytest.raises(AssertionError, match="multiple of KV heads"):
        K.cache_attention(q, kc, kc, _i32([0]), 1.0)
    with pytest.raises(AssertionError, match="cache_lens"):
        K.cache_attention(q, kc[..., :3, :], kc[..., :3, :], torch.zeros(1, device=DEV), 1.0)
    with pytest.raises(AssertionError, match="depth"):
        K.tree_attention(q, kc[..., :3, :], kc[..., :3, :], _i32([0]), _i32([[0]]),
                         torch.zeros(1, 1, 2, 3, 64, device=DEV), torch.zeros(1, 1, 2, 3, 64, device=DEV), 2, 1.0)
    with pytest.raises(AssertionError, match="noise"):
        K.verify(torch.zeros(2, 3, 5, device=DEV), torch.zeros(2, 2, 5, device=DEV),
                 torch.zeros(2, 2, dtype=torch.long, device=DEV), torch.zeros(2, 2, device=DEV),
                 torch.zeros(2, 4, device=DEV))


# ------------------------------------------------------------------ GPU (bf16, real shapes)

@gpu
@needs_cuda
@pytest.mark.parametrize("T,H,Hkv,D,splits", [(1, 32, 8, 128, None), (5, 9, 3, 64, None), (8, 16, 2, 80, 4),
                                                (1, 64, 8, 128, 1)])
def test_gpu_cache_attention_bf16(T, H, Hkv, D, splits):
    g = _gen(1)
    B, S = 3, 1500
    q = _randn(g, B, T, H, D, dtype=torch.bfloat16, device="cuda")
    k = _randn(g, B, S, Hkv, D, dtype=torch.bfloat16, device="cuda")
    v = _randn(g, B, S, Hkv, D, dtype=torch.bfloat16, device="cuda")
    cl = torch.tensor([0, 700, S - T], dtype=torch.int32, device="cuda")
    out = K.cache_attention(q, k, v, cl, D ** -0.5, num_splits=splits)
    torch.testing.assert_close(out, K.cache_attention_ref(q, k, v, cl, D ** -0.5), **TOL16)
    out32 = K.cache_attention(q.float(), k.float(), v.float(), cl, D ** -0.5, num_splits=splits)
    torch.testing.assert_close(out32, K.cache_attention_ref(q.float(), k.float(), v.float(), cl, D ** -0.5), **TOL32)


@gpu
@needs_cuda
@pytest.mark.parametrize("N,H,Hkv,D,depth,splits", [(20, 32, 8, 128, 0, None), (13, 9, 3, 64, 4, None),
                                                    (7, 16, 8, 80, 2, 3)])
def test_gpu_tree_attention_bf16(N, H, Hkv, D, depth, splits):
    g = _gen(2)
    B, S, Kmax = 2, 900, 5
    bf = dict(dtype=torch.bfloat16, device="cuda")
    q = _randn(g, B, N, H, D, **bf)
    kc, vc = _randn(g, B, S, Hkv, D, **bf), _randn(g, B, S, Hkv, D, **bf)
    kt, vt = _randn(g, B, N, Kmax, Hkv, D, **bf), _randn(g, B, N, Kmax, Hkv, D, **bf)
    trunk = torch.tensor([3, 800], dtype=torch.int32, device="cuda")
    glue = torch.randint(0, Kmax + 1, (B, N), generator=g, dtype=torch.int32).cuda()
    out = K.tree_attention(q, kc, vc, trunk, glue, kt, vt, depth, D ** -0.5, num_splits=splits)
    torch.testing.assert_close(out, K.tree_attention_ref(q, kc, vc, trunk, glue, kt, vt, depth, D ** -0.5), **TOL16)
    f = [t.float() for t in (q, kc, vc, kt, vt)]
    out32 = K.tree_attention(f[0], f[1], f[2], trunk, glue, f[3], f[4], depth, D ** -0.5, num_splits=splits)
    torch.testing.assert_close(out32, K.tree_attention_ref(f[0], f[1], f[2], trunk, glue, f[3], f[4], depth,
                                                           D ** -0.5), **TOL32)


@gpu
@needs_cuda
def test_gpu_norm_rope_bf16():
    g = _gen(3)
    bf = dict(dtype=torch.bfloat16, device="cuda")
    x, r, w = _randn(g, 4, 7, 4096, **bf), _randn(g, 4, 7, 4096, **bf), _randn(g, 4096, **bf)
    a, s = K.add_rmsnorm(x, r, w, 1e-5)
    a_ref, s_ref = K.add_rmsnorm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(a, a_ref, **TOL16)
    qh = _randn(g, 4, 7, 32, 128, **bf)
    torch.testing.assert_close(K.rmsnorm(qh, w[:128], 1e-6), K.rmsnorm_ref(qh, w[:128], 1e-6), **TOL16)
    cos, sin = _rope_tables(4096, 128)
    pos = torch.randint(0, 4096, (4, 7), generator=g).cuda()
    torch.testing.assert_close(K.rope(qh, pos, cos, sin), K.rope_ref(qh, pos, cos, sin), **TOL16)


@gpu
@needs_cuda
def test_gpu_sampling_and_verify_same_ids():
    g = _gen(4)
    R, V = 9, 151_936
    logits = (_randn(g, R, V, device="cpu") * 3).cuda()
    noise = torch.empty(R, V).exponential_(generator=g).cuda()
    temp = torch.tensor([0.0, 1.0, 0.6, 1.5, 0.0, 1.0, 1.0, 0.3, 2.0], device="cuda")
    assert torch.equal(K.sample_from_logits(logits, temp, noise), K.sample_from_logits_ref(logits, temp, noise))
    p = torch.softmax(logits, -1)
    assert torch.equal(K.sample_exponential_race(p, noise), K.sample_exponential_race_ref(p, noise))
    for kind in range(6):
        p, q, tok, u, nz = _verify_batch(g, 12, 4, 4099, kind)
        assert all(a.equal(b) for a, b in zip(K.verify(p, q, tok, u, nz), K.verify_ref(p, q, tok, u, nz)))


# ------------------------------------------------------------------ RoPE fused with the KV-cache write

@pytest.mark.parametrize("B,T,H,Hkv,D", [(1, 1, 4, 2, 16), (3, 5, 9, 3, 64), (2, 6, 6, 6, 32), (4, 1, 32, 8, 128)])
def test_rope_kv_write(B, T, H, Hkv, D):
    """q rotated like rope(); k rotated and v written at slot = position, every other slot untouched;
    on awkward shapes (GQA ratios 1 to 4, odd head counts, T = 1 decode and T > 1 verify)."""
    g = _gen(B * T + H + D)
    qkv = _randn(g, B, T, (H + 2 * Hkv) * D).view(B, T, H + 2 * Hkv, D)
    S = 40
    pos = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)]).to(DEV)
    cos, sin = _rope_tables(S, D)
    kc, vc = _randn(g, B, S, Hkv, D), _randn(g, B, S, Hkv, D)        # poisoned: random, not zeros
    kr, vr = kc.clone(), vc.clone()
    q = K.rope_kv_write(qkv, pos, cos, sin, kc, vc, H, Hkv)
    q_ref = K.rope_kv_write_ref(qkv, pos, cos, sin, kr, vr, H, Hkv)
    torch.testing.assert_close(q, q_ref, **TOL32)
    torch.testing.assert_close(kc, kr, **TOL32)
    torch.testing.assert_close(vc, vr, rtol=0, atol=0)
    torch.testing.assert_close(q, K.rope_ref(qkv[:, :, :H], pos, cos, sin), **TOL32)


def test_rope_kv_write_into_one_row_of_a_batch_cache():
    """A row view of a bigger cache (continuous batching's admit): only that row's slots change."""
    g = _gen(77)
    B, T, H, Hkv, D, S = 1, 3, 4, 2, 32, 12
    qkv = _randn(g, B, T, H + 2 * Hkv, D)
    pos = _i32([[0, 1, 2]])
    cos, sin = _rope_tables(S, D)
    kc, vc = _randn(g, 3, S, Hkv, D), _randn(g, 3, S, Hkv, D)
    before_k, before_v = kc.clone(), vc.clone()
    K.rope_kv_write(qkv, pos, cos, sin, kc[1:2], vc[1:2], H, Hkv)
    for row in (0, 2):
        torch.testing.assert_close(kc[row], before_k[row], rtol=0, atol=0)
        torch.testing.assert_close(vc[row], before_v[row], rtol=0, atol=0)
    torch.testing.assert_close(vc[1, :T], qkv[0, :, H + Hkv:], rtol=0, atol=0)
    torch.testing.assert_close(vc[1, T:], before_v[1, T:], rtol=0, atol=0)


def test_rope_kv_write_bounds_mask():
    """Slots past the cache (a frozen row's ride-along past the context) write nothing: row 0's out-of-range
    positions must not land in row 1's slots (the caches are contiguous [B, S, ...]), in kernel and reference."""
    g = _gen(78)
    B, T, H, Hkv, D, S = 2, 4, 4, 2, 16, 6
    qkv = _randn(g, B, T, H + 2 * Hkv, D)
    pos = _i32([[4, 5, 6, 7], [0, 1, 2, 3]])          # row 0 runs off the end of its S = 6 slots
    cos, sin = _rope_tables(S + 4, D)
    for write in (K.rope_kv_write, K.rope_kv_write_ref):
        kc, vc = _randn(g, B, S, Hkv, D), _randn(g, B, S, Hkv, D)
        before_k, before_v = kc.clone(), vc.clone()
        write(qkv, pos, cos, sin, kc, vc, H, Hkv)
        torch.testing.assert_close(kc[1, 4:], before_k[1, 4:], rtol=0, atol=0)   # row 1's untouched slots
        torch.testing.assert_close(vc[1, 4:], before_v[1, 4:], rtol=0, atol=0)
        torch.testing.assert_close(vc[0, 4:6], qkv[0, :2, H + Hkv:], rtol=0, atol=0)   # the in-range slots are written
        torch.testing.assert_close(kc[0, :4], before_k[0, :4], rtol=0, atol=0)


# ------------------------------------------------------------------ skinny linear (decode / verify projections)

@pytest.mark.parametrize("M,N,Kd,bias", [(1, 37, 70, False), (1, 100, 300, True), (1, 64, 128, False),
                                         (1, 257, 513, True), (1, 96, 16, False), (0, 8, 16, False)])
@pytest.mark.parametrize("config", K.SKINNY_CONFIGS)
def test_skinny_linear(M, N, Kd, bias, config):
    g = _gen(M * 1000 + N + Kd)
    x = _randn(g, M, Kd)
    w = _randn(g, N, Kd) / Kd ** 0.5
    b = _randn(g, N) if bias else None
    out = K.skinny_linear(x, w, b, config)
    torch.testing.assert_close(out, K.skinny_linear_ref(x, w, b), **TOL32)
    x3 = _randn(g, 1, M, Kd)                                   # leading dims are kept
    assert K.skinny_linear(x3, w, None, config).shape == (1, M, N)
    x_strided = _randn(g, M, 2 * Kd)[:, ::2]                   # a non-contiguous row
    torch.testing.assert_close(K.skinny_linear(x_strided, w, b, config), K.skinny_linear_ref(x_strided, w, b), **TOL32)


def test_skinny_linear_rejects_too_many_rows():
    with pytest.raises(AssertionError, match="at most"):
        K.skinny_linear(torch.zeros(K.SKINNY_MAX_ROWS + 1, 8, device=DEV), torch.zeros(4, 8, device=DEV))


@needs_cuda
@pytest.mark.gpu
def test_skinny_linear_bf16_and_choice():
    g = _gen(7)
    ws = [_randn(g, 1536, 576, dtype=torch.bfloat16) / 24 for _ in range(3)]
    x = _randn(g, 1, 576, dtype=torch.bfloat16)
    for config in K.SKINNY_CONFIGS:
        torch.testing.assert_close(K.skinny_linear(x, ws[0], None, config), K.skinny_linear_ref(x, ws[0]), **TOL16)
    best, times = K.skinny_linear_choose(ws)
    assert best is None or best in K.SKINNY_CONFIGS
    assert set(times) == {"torch"} | {"x".join(map(str, c)) for c in K.SKINNY_CONFIGS}
