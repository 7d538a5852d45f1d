"""Sampling on the device: ssd.py's rules (to_probs, the exponential race, the draft's q' with Saguaro's
rescaling), with no host synchronization, so that they can live inside CUDA graphs."""
from __future__ import annotations

import torch

import ssd
from ssd_engine.fast_model import on_device


def probs(logits, t, req):
    """ssd.to_probs with the request's filter (top-k, top-p); `t` per row."""
    return ssd.to_probs(logits, t, req.top_k, req.top_p)


def sample(ops, p, gen):
    """Exact sampling by exponential race (ssd.sample): argmax p / E with E ~ Exp(1) from `gen`, in one kernel."""
    flat = p.reshape(-1, p.shape[-1]).float().contiguous()
    noise = ssd.exponential_noise(flat.shape, gen, flat.device)
    with on_device(flat.device):
        return ops.sample_exponential_race(flat, noise).reshape(p.shape[:-1])


def draft_sample(ops, logits, t, req, fan_out, gen, f_cap=None):
    """ssd.draft_sample on the device: a token drawn from the draft's q' and that very q' (the verifier's).
    `fan_out`: Saguaro's F, a host int, or a 0-dim device tensor (at most f_cap) when it adapts inside a graph."""
    q = probs(logits, t, req)
    if isinstance(fan_out, torch.Tensor):
        q = saguaro_rescale_masked(q, fan_out, req.c, f_cap)
    else:
        q = ssd.saguaro_rescale(q, fan_out, req.c)
    return sample(ops, q, gen), q


def saguaro_rescale_masked(q, fan_out: torch.Tensor, c: float, f_cap: int):
    """ssd.saguaro_rescale with F a device value (at most f_cap): the top-(f_cap + 1) tokens are found with one
    top-k of fixed width and the first F + 1 of them scaled by C, so a CUDA graph serves every F."""
    if c >= 1.0:
        return q
    top = q.topk(min(f_cap + 1, q.shape[-1]), dim=-1).indices
    rank = torch.arange(top.shape[-1], device=q.device)
    scale_top = torch.where((rank <= fan_out) & (fan_out > 0), c, 1.0).to(q.dtype).expand(top.shape)
    q = q * torch.ones_like(q).scatter(-1, top, scale_top)
    return q / q.sum(-1, keepdim=True)


def saguaro_f(f, c):
    """The fan-out a step's Saguaro rescaling depends on: none at C >= 1 (no rescaling). Graph keys use
    this, so a fan-out that follows the running acceptance estimate does not capture new graphs."""
    return f if c < 1.0 else 0
