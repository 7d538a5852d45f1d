"""The batch being decoded: its sequence state on the device (token history, committed lengths, active rows, the
last outcome n), a host copy of each real row's tokens, and the steps that move it: prefill, the commit of a
round (on the device, then on the host when the round is read back) and the finish check.

A batch is padded to a bucket size (fast_model.BUCKETS); padding rows are frozen from the start. A finished row
rides along frozen: its results are discarded and its position is clamped inside the cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssd_engine import sampling


@dataclass
class Batch:
    """hist [Bb, L], lens [Bb], active [Bb], last_n [Bb] and context_limit [] are persistent device tensors (the SSD
    round's CUDA graph reads and writes them in place). The last committed token of a row is its recovery token r,
    not yet run through the target."""
    hist: torch.Tensor
    lens: torch.Tensor
    active: torch.Tensor
    last_n: torch.Tensor        # outcome n of the last round (the speculation cache's key, with r)
    context_limit: torch.Tensor
    tokens: list                # host copy of each real row's tokens
    prompt_lens: list
    done: list
    finish: list
    epoch: list                 # per row: bumped when admit hands the row to a new sequence
    active_host: list           # host mirror of `active` for the real rows


def new_buffers(Bb: int, max_seq: int, k: int, device, draft_device) -> dict:
    """The persistent device tensors of a batch bucket: token history, lengths, active rows, the last outcome n,
    the per-row temperatures (the draft's on its device) and the context limit."""
    long = dict(dtype=torch.long, device=device)
    return dict(hist=torch.zeros(Bb, max_seq + 2 * k + 4, **long), lens=torch.zeros(Bb, **long),
                active=torch.zeros(Bb, dtype=torch.bool, device=device), last_n=torch.zeros(Bb, **long),
                t=torch.zeros(Bb, device=device), t_draft=torch.zeros(Bb, device=draft_device),
                context_limit=torch.zeros((), **long))


def prefill(eng, req, buf, mode) -> Batch:
    """Each model reads the whole prompts (padding rows repeat the first prompt); the target samples the first
    recovery token. Returns the batch, its rows already checked for a finish."""
    dev, B, Bb = eng.device, len(req.prompts), buf["hist"].shape[0]
    prompts = req.prompts + [req.prompts[0]] * (Bb - B)
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [p[-1]] * (T - len(p)) for p in prompts], device=dev)
    positions = torch.arange(T, device=dev)[None].expand(Bb, T).contiguous()
    plens = torch.tensor([len(p) for p in prompts], device=dev)
    logits = eng.target.forward(tokens, positions, eng.tc)[torch.arange(Bb, device=dev), plens - 1]
    if mode != "ar":
        eng.draft.forward(tokens.to(eng.draft_device), positions.to(eng.draft_device), eng.dc)
    first = sampling.sample(eng.ops, sampling.probs(logits, req.t, req), eng.rng["target"])
    hist = buf["hist"].zero_()
    hist[:, :T] = tokens
    hist[torch.arange(Bb, device=dev), plens] = first
    buf["lens"].copy_(plens + 1)
    buf["active"].copy_(torch.tensor([b < B for b in range(Bb)]))
    buf["context_limit"].fill_(req.context_limit)
    st = Batch(hist=hist, lens=buf["lens"], active=buf["active"], last_n=buf["last_n"].zero_(),
               context_limit=buf["context_limit"], tokens=[list(p) for p in req.prompts],
               prompt_lens=[len(p) for p in req.prompts], done=[False] * B, finish=[None] * B, epoch=[0] * B,
               active_host=[True] * B)
    for b, tok in enumerate(first[:B].tolist()):
        st.tokens[b].append(tok)
        finish_check(st, b, req)
    sync_active(st)
    return st


def base(st, req, slots):
    """Each row's position of r, where this round's steps start. A finished row rides along frozen (its results are
    discarded): its position is clamped so that its writes, K + 1 slots on, stay inside the cache of `slots` (for
    the rows still generating the clamp changes nothing: the context check keeps them below)."""
    return (st.lens - 1).clamp(max=slots - req.k_used - 2)


def finish_check(st, b, req, new=None):
    """Stop row b at EOS, at max_new_tokens or at the context limit. `new`: how many tokens this round appended
    (only those need looking at: earlier ones were checked in their round)."""
    tokens, p = st.tokens[b], st.prompt_lens[b]
    n_generated = len(tokens) - p
    first = 0 if new is None else max(0, n_generated - new)
    for i in range(first, n_generated):
        tok = tokens[p + i]
        if tok in req.eos or i + 1 >= req.max_new_tokens:
            st.tokens[b] = st.tokens[b][:p + i + 1]
            st.done[b], st.finish[b] = True, "eos" if tok in req.eos else "length"
            return
    if len(st.tokens[b]) + req.k_used + 1 > req.context_limit:
        st.done[b], st.finish[b] = True, "context"


def commit_device(st, n, new, k_used):
    """Write the accepted tokens s1..sn and the new recovery token into the history (active rows). A row whose next
    round would not fit the context stops here, on the device (the host's finish_check says "context" when it reads
    this round back): a round launched before that read-back must not move it on."""
    K1 = new.shape[1]
    n = torch.where(st.active, n, torch.zeros_like(n))
    idx = st.lens[:, None] + torch.arange(K1, device=n.device)
    keep = (torch.arange(K1, device=n.device)[None] <= n[:, None]) & st.active[:, None]
    st.hist.scatter_(1, idx, torch.where(keep, new, st.hist.gather(1, idx)))
    st.lens += torch.where(st.active, n + 1, torch.zeros_like(n))
    st.active &= st.lens + k_used + 1 <= st.context_limit
    st.last_n.copy_(n)


def packed(n, new, hit):
    """What the host reads of a round, one row per sequence: [n, the K + 1 new tokens, hit]."""
    return torch.cat([n[:, None], new, hit[:, None].long()], 1)


def commit_host(st, req, rows, stats):
    """The host's share of a round (`rows`: the packed read-back): each taking part row's new tokens, its finish
    check."""
    stats.accepted = [row[0] if on else 0 for row, on in zip(rows, stats.active)]
    for b, row in enumerate(rows):
        if not stats.active[b]:   # finished (or handed to a new sequence) before this round ended
            continue
        st.tokens[b] += row[1:2 + row[0]]
        finish_check(st, b, req, new=row[0] + 1)
    sync_active(st)


def sync_active(st):
    """Mirror the rows' done flags into the device mask, copying only when one changed: a copy from pageable host
    memory waits for the device's queue, which would stall a pipelined round."""
    active = [not d for d in st.done]
    if active != st.active_host:
        st.active[:len(active)] = torch.tensor(active, device=st.active.device)
        st.active_host = active
