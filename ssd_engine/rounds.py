"""The AR and SD rounds of ssd.py on the device: the same steps, each a CUDA graph (forward and sampling, or
forward and the fused exact verify), the sequence state on the device, nothing read back inside a round.

A round function takes the engine (models, caches, random streams, runners), the batch, the request, the round's
statistics and the running estimates, launches the round and returns the packed device tensor the host reads
(batch.packed: [n, the K + 1 new tokens, hit] per row)."""
from __future__ import annotations

import torch

import ssd
from ssd_engine import batch, sampling


def ar_round(eng, st, req, stats, est):
    """One target pass per row and one sampled token (ssd.ar_round)."""
    def step(tokens, positions, t):  # forward + sampling, one graph
        logits = eng.target.forward(tokens, positions, eng.tc)[:, -1]
        return sampling.sample(eng.ops, sampling.probs(logits, t, req), eng.rng["target"])
    with eng.timed(stats, "verify"):
        pos = batch.base(st, req, eng.tc.slots)
        r = st.hist.gather(1, pos[:, None])
        r_new = eng.t_run.run(("ar", id(eng.tc), r.shape[0], req.top_k, req.top_p), step,
                              tokens=r, positions=pos[:, None], t=req.t)
    n = torch.zeros_like(r_new)
    batch.commit_device(st, n, r_new[:, None], req.k_used)
    return batch.packed(n, r_new[:, None], torch.zeros_like(n, dtype=torch.bool))


def sd_round(eng, st, req, stats, est):
    """The draft proposes K tokens, the target verifies them in one pass (ssd.sd_round)."""
    with eng.timed(stats, "draft"):
        proposal, q = draft_propose(eng, st, req)
    with eng.timed(stats, "verify"):
        n, new = verify(eng, st, req, proposal, q)
    batch.commit_device(st, n, new, req.k_used)
    return batch.packed(n, new, torch.zeros_like(n, dtype=torch.bool))


def draft_propose(eng, st, req):
    """K draft steps from the recovery token r (ssd.draft_steps). The first step also re-reads the token before r,
    so rows where the draft has not seen s_K yet (all K accepted last round) need no separate catch-up pass: every
    row runs the same shapes."""
    dd = eng.draft_device
    m1 = batch.base(st, req, eng.tc.slots)
    B, V = st.hist.shape[0], eng.draft.cfg.vocab_size
    tokens = torch.empty(B, req.k, dtype=torch.long, device=dd)
    qs = torch.empty(B, req.k, V, device=dd)
    step_pos = torch.stack([m1 - 1, m1], 1)
    step_tokens, step_pos = st.hist.gather(1, step_pos).to(dd), step_pos.to(dd)
    m1 = m1.to(dd)

    def step(tokens, positions, t):  # draft forward + sampling, one graph
        logits = eng.draft.forward(tokens, positions, eng.dc)[:, -1]
        return sampling.draft_sample(eng.ops, logits, t, req, 0, eng.rng["draft"])
    for i in range(req.k):
        key = ("draft", id(eng.dc), tuple(step_tokens.shape), req.top_k, req.top_p)
        s, q = eng.d_run.run(key, step, tokens=step_tokens, positions=step_pos, t=req.t_draft)
        tokens[:, i], qs[:, i] = s, q
        step_tokens, step_pos = tokens[:, i:i + 1], (m1 + 1 + i)[:, None]
    return tokens.to(eng.device), qs.to(eng.device)


def verify(eng, st, req, proposal, q):
    """The target's pass over [r, s1..sK] and the fused exact verify (ssd.verify in one kernel, no sync). Returns
    (n, the K + 1 new tokens: s1..sn, the new recovery token, then filler)."""
    m1 = batch.base(st, req, eng.tc.slots)
    r = st.hist.gather(1, m1[:, None])
    positions = m1[:, None] + torch.arange(req.k + 1, device=eng.device)

    def step(tokens, positions, t, proposal, q):  # target forward + exact verify, one graph
        p = sampling.probs(eng.target.forward(tokens, positions, eng.tc), t, req)
        B, V = p.shape[0], p.shape[-1]
        u = torch.rand(B, req.k, device=p.device, generator=eng.rng["target"])
        noise = ssd.exponential_noise((B, V), eng.rng["target"], p.device)
        n, r_new = eng.ops.verify(p.contiguous(), q, proposal, u, noise)
        return n, new_tokens(proposal, n, r_new)
    key = ("verify", id(eng.tc), r.shape[0], req.k, req.top_k, req.top_p)
    return eng.t_run.run(key, step, tokens=torch.cat([r, proposal], 1), positions=positions, t=req.t,
                         proposal=proposal.contiguous(), q=q.float().contiguous())


def new_tokens(proposal, n, r_new):
    """[s1..sn, r_new, filler] per row: what a round appends (the filler is never committed)."""
    j = torch.arange(proposal.shape[1] + 1, device=proposal.device)[None]
    return torch.where(j < n[:, None], torch.cat([proposal, proposal[:, -1:]], 1), r_new[:, None])


def ngram_proposal(st, m1, k):
    """ssd.ngram_proposal on the device (SSD's cheap backup): what followed the latest earlier occurrence of r."""
    r = st.hist.gather(1, m1[:, None])
    idx = torch.arange(st.hist.shape[1], device=m1.device)[None]
    match = (st.hist == r) & (idx < m1[:, None])
    last = torch.where(match, idx, torch.full_like(idx, -1)).max(1).values
    follow = last[:, None] + 1 + torch.arange(k, device=m1.device)
    ok = (last[:, None] >= 0) & (follow <= m1[:, None])
    return torch.where(ok, st.hist.gather(1, follow.clamp(min=0)), r)
