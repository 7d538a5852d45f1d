"""The output distribution is exactly the target's (design notes, section 5).

1. Analytic: a toy target and draft given as conditional tables; every path of one round is
   enumerated in float64 (each proposal, each accept/reject outcome, each recovery token) for every
   proposal source SSD uses, and the emitted distribution must equal the target's. No sampling.
2. Statistical: the real `generate` code paths at temperature 1, the joint distribution of the
   first generated tokens over many samples against the target's exact distribution, plus a
   negative control (a broken acceptance rule) that the same test must reject.
"""
import itertools

import pytest
import torch

import ssd
from harness import chi_square_p_value  # noqa: F401  (test_fast.py uses it through this module)

V, K = 4, 2


def tables(seed, temperature):
    """Bigram conditionals: row x of the table is the distribution of the token after x."""
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5
    draft_logits = target_logits + torch.randn(V, V, generator=g, dtype=torch.float64)
    return target_logits, draft_logits


def target_joint(p, r0, length):
    """P(x1..xL | r0) of plain autoregressive sampling from the target table p."""
    out = {}
    for seq in itertools.product(range(V), repeat=length):
        prob, prev = 1.0, r0
        for x in seq:
            prob, prev = prob * float(p[prev, x]), x
        out[seq] = prob
    return out


def round_joint(p, q_table, r0, source, verify_q=None):
    """Exact distribution of the first K+1 tokens after r0 when one SD/SSD round emits
    r0's continuation (s1..sn, r') and plain target sampling continues after it.
    source "sampled": s ~ q_table (cache hit or jit backup: both sample the draft, Saguaro's q' in SSD);
    source = a tuple of K tokens: a deterministic proposal (the cheap backup), verified with q = one-hot.
    verify_q: the q the verifier uses (default: the one sampled from) -- the negative control."""
    out = {seq: 0.0 for seq in itertools.product(range(V), repeat=K + 1)}
    if source == "sampled":
        proposals = list(itertools.product(range(V), repeat=K))
    else:
        proposals = [tuple(source)]
    for s in proposals:
        prev, q_rows, p_s = r0, [], 1.0
        for x in s:
            q_row = q_table[prev] if source == "sampled" else torch.nn.functional.one_hot(torch.tensor(x), V).double()
            q_rows.append(q_row)
            p_s *= float(q_row[x])
            prev = x
        if p_s == 0:
            continue
        vq = q_rows if verify_q is None else [verify_q[c] for c in (r0,) + s[:-1]]
        contexts = (r0,) + s                         # p_i is the target's row after token contexts[i]
        reach = p_s                                  # probability of reaching position i with all accepted
        for n in range(K + 1):
            if n < K:
                a = float(ssd.acceptance_prob(p[contexts[n], s[n]], vq[n][s[n]]))
                rec = ssd.residual(p[contexts[n]], vq[n])
                stop = reach * (1 - a)
            else:
                rec, stop = p[contexts[K]], reach
            for r_new in range(V):
                emitted = list(s[:n]) + [r_new]
                # complete to K+1 tokens with target sampling
                for tail in itertools.product(range(V), repeat=K - n):
                    prob, prev = stop * float(rec[r_new]), r_new
                    for x in tail:
                        prob, prev = prob * float(p[prev, x]), x
                    out[tuple(emitted) + tail] += prob
            if n < K:
                reach *= a
    return out


def max_error(a, b):
    return max(abs(a[key] - b[key]) for key in a)


CASES = {
    "cache hit / jit backup, T=1": dict(t=1.0, source="sampled"),
    "cache hit with Saguaro C=0.3": dict(t=1.0, source="sampled", saguaro=(1, 0.3)),
    "deterministic backup miss": dict(t=1.0, source=(2, 2)),
    "deterministic backup, unlikely tokens": dict(t=0.8, source=(3, 0)),
    "temperature 0": dict(t=0.0, source="sampled"),
    "temperature 0, deterministic backup": dict(t=0.0, source=(1, 3)),
    "draft temperature differs": dict(t=1.2, draft_t=0.5, source="sampled", saguaro=(2, 0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_one_round_is_exact(case, seed):
    c = CASES[case]
    tl, dl = tables(seed, c["t"])
    p = ssd.to_probs(tl, torch.tensor(c["t"], dtype=torch.float64))
    q = ssd.to_probs(dl, torch.tensor(c.get("draft_t", c["t"]), dtype=torch.float64))
    if "saguaro" in c:
        q = ssd.saguaro_rescale(q, *c["saguaro"])
    for r0 in range(V):
        assert max_error(round_joint(p, q, r0, c["source"]), target_joint(p, r0, K + 1)) < 1e-12


def test_per_row_temperatures_are_exact():
    """One batch, two rows at different temperatures: each row's round matches its own target."""
    tl, dl = tables(5, 1.0)
    temps = torch.tensor([0.6, 1.7], dtype=torch.float64)
    p = ssd.to_probs(torch.stack([tl, tl]), temps)
    q = ssd.saguaro_rescale(ssd.to_probs(torch.stack([dl, dl]), temps), 1, 0.5)
    for row in range(2):
        expected = target_joint(p[row], 1, K + 1)
        assert max_error(round_joint(p[row], q[row], 1, "sampled"), expected) < 1e-12
    assert not torch.allclose(p[0], p[1])


def test_analytic_negative_control():
    """Sampling with Saguaro's q' but verifying with the plain q is biased: the test must see it."""
    tl, dl = tables(0, 1.0)
    p, q = ssd.to_probs(tl, torch.tensor(1.0)), ssd.to_probs(dl, torch.tensor(1.0))
    q_saguaro = ssd.saguaro_rescale(q, 1, 0.3)
    err = max_error(round_joint(p, q_saguaro, 0, "sampled", verify_q=q), target_joint(p, 0, K + 1))
    assert err > 1e-3


# --- statistical test on the real code paths ----------------------------------------------------

SMALL_VOCAB = dict(vocab_size=6, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                   logit_scale=25.0)
# Rows of one batch are independent samples. Tokens 1..WINDOW[0] come from the prefill and the
# first round (always a cache miss); the window after them is where SSD's cache hits show.
N_SAMPLES, N_TOKENS, WINDOW = 4000, 5, slice(2, 5)


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    from conftest import make_checkpoint
    root = tmp_path_factory.mktemp("small")
    make_checkpoint(root / "t", seed=11, **SMALL_VOCAB)
    make_checkpoint(root / "d", seed=12, num_hidden_layers=1, **SMALL_VOCAB)
    return ssd.load_model(root / "t"), ssd.load_model(root / "d")


def exact_joint(target, prompt, n_tokens, window=None, top_k=0):
    """P(x1..xn | prompt) by enumerating every continuation (the vocabulary is tiny), or its
    marginal over the positions in `window`."""
    seqs = [()]
    probs = torch.ones(1, dtype=torch.float64)
    for _ in range(n_tokens):
        batch = [prompt + list(s) for s in seqs]
        logits = ssd.extend(target, target.new_cache(len(batch), len(batch[0])), batch)[:, -1]
        step = ssd.to_probs(logits.double(), torch.tensor(1.0, dtype=torch.float64), top_k=top_k)
        probs = (probs[:, None] * step).reshape(-1)
        seqs = [s + (x,) for s in seqs for x in range(target.cfg.vocab_size)]
    joint = {}
    for s, pr in zip(seqs, probs.tolist()):
        key = s[window] if window else s
        joint[key] = joint.get(key, 0.0) + pr
    return joint


def sample_first_tokens(target, draft, prompt, **kw):
    out = ssd.generate(target, [prompt] * N_SAMPLES, draft=draft, temperature=1.0, max_new_tokens=N_TOKENS,
                       eos_token_id=[], **kw)
    return [tuple(t[WINDOW]) for t in out.tokens], out


PATHS = {
    "sd": dict(mode="sd", k=2),
    "ssd-jit": dict(mode="ssd", k=1, backup="jit", fan_out=2, draft_temperature=0.7),
    "ssd-fast-saguaro": dict(mode="ssd", k=1, backup="fast", fan_out=[2, 3], saguaro_c=0.4),
    "ssd-auto-k2-top3": dict(mode="ssd", k=2, fan_out="auto", top_k=3),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_distribution_of_generated_tokens(small_models, path):
    target, draft = small_models
    prompt = [1, 4, 2, 5, 0]
    samples, out = sample_first_tokens(target, draft, prompt, seed=123, **PATHS[path])
    if PATHS[path]["mode"] == "ssd":  # the hits must actually happen for this to test them
        assert out.summary()["cache_hit_rate"] > 0.2
    top_k = PATHS[path].get("top_k", 0)
    assert chi_square_p_value(samples, exact_joint(target, prompt, N_TOKENS, WINDOW, top_k=top_k)) > 1e-3
    # and the very first tokens (the prefill's and the first round's), from the same samples
    first = [tuple(t[:3]) for t in out.tokens]
    assert chi_square_p_value(first, exact_joint(target, prompt, N_TOKENS, slice(0, 3), top_k=top_k)) > 1e-3


def test_statistical_negative_control(small_models, monkeypatch):
    """Accepting every draft token (a broken rule) must fail the very same test."""
    target, draft = small_models
    prompt = [1, 4, 2, 5, 0]
    monkeypatch.setattr(ssd, "acceptance_prob", lambda p_s, q_s: torch.ones_like(p_s))
    samples, _ = sample_first_tokens(target, draft, prompt, seed=123, mode="sd", k=2, draft_temperature=0.7)
    assert chi_square_p_value(samples, exact_joint(target, prompt, N_TOKENS, WINDOW)) < 1e-6
