"""Function-preserving width expansion: a target with a large model's cost and a small model's outputs.

    expand_width(model, k) -> ssd.Transformer       the same next-token distribution, ~k^2 times the weights

Why: the benchmark needs a target that costs what a 4-8B model costs per token (so that drafting is cheap
relative to verifying, the regime speculative decoding is for) while keeping a real draft's real acceptance
behaviour. No 7B model with SmolLM2's vocabulary and a matching draft is available offline; the expansion of
SmolLM2-135M-Instruct by k = 8 is one (about 7.2B parameters, 14.5 GB in bf16; see `num_params`), and the
distilled draft (models/smollm2-draft) accepts exactly as it does against the 135M model, up to rounding.

The construction (every residual dimension, attention head and MLP unit duplicated k times, in "tile"
layout: copy c of unit i sits at c * n + i):
- residual stream: x' = [x, x, ..., x] (k copies, width k*d). RMSNorm over duplicated dims has the same
  mean square, so it keeps its value; its weight is tiled.
- every linear that READS the residual (q/k/v, gate/up, lm_head) gets its input columns tiled and divided
  by k: sum over the k copies of (W/k) x = W x.
- every linear that WRITES the residual (o_proj, down_proj) gets its output rows tiled, so it writes the
  duplicated residual.
- attention: query heads and KV heads are both tiled (q/k/v output rows tiled). Query head c*h + i then
  uses KV head (c*h + i) // g = c*kv + i // g (g = h / kv), i.e. copy c of its original KV head: the GQA
  grouping is consistent. head_dim, RoPE and the 1/sqrt(head_dim) scale are unchanged, so every copy of a
  head computes exactly the original head. o_proj reads the k copies of the head outputs: its input
  columns are tiled and divided by k.
- MLP: units tiled (gate/up output rows tiled); down_proj reads the k copies: input columns tiled, / k.
  So every layer matrix becomes W.repeat(k, k) / k and every bias b.repeat(k).
- Qwen3's per-head q/k norms act on head_dim: unchanged.
- embedding: E' = E.repeat(1, k) (no division: it must PRODUCE the duplicated residual), while the LM head
  must READ it: W' = W.repeat(1, k) / k. With tied embeddings (SmolLM2) one matrix cannot be both. A tied
  variant exists (E' = E.repeat(1, k) / k for both uses, which scales the whole residual stream by 1/k; the
  writers o_proj/down_proj then need a further 1/k and RMSNorm's eps a factor 1/k^2 to stay exact), but it
  changes `rms_norm_eps`, which Qwen3's q/k norms share and whose inputs are not scaled: not exact there.
  So the expanded model is UNTIED: one more V x k*d matrix in memory (0.45 GB for SmolLM2 at k = 8), no
  extra bytes read per token (a decode step reads the LM head anyway and only one row of the embedding).

The expanded network's logits equal the original's up to floating-point rounding (tests/test_bench.py
checks float32 logits and greedy tokens for k = 2, 3 on tiny random checkpoints, tied and untied, GQA,
Qwen3 with biases). Built directly on the model's device in the requested dtype, tensor by tensor (a
transient float32 copy of one matrix at a time): no disk round trip.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import ssd  # noqa: E402


def expanded_config(cfg: ssd.ModelConfig, k: int) -> ssd.ModelConfig:
    """The config of `expand_width(model, k)`: k times the width, heads and MLP units; untied."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"the expansion factor k must be an integer >= 1, got {k!r}")
    return dataclasses.replace(
        cfg, hidden_size=k * cfg.hidden_size, intermediate_size=k * cfg.intermediate_size,
        num_attention_heads=k * cfg.num_attention_heads, num_key_value_heads=k * cfg.num_key_value_heads,
        head_dim=cfg.head_dim, tie_word_embeddings=False, shared_embedding=None)


def num_params(cfg: ssd.ModelConfig) -> int:
    """Parameter count from the config alone (the formula the expansion test checks).

    Per layer: q (d * h * hd), k and v (d * kv * hd each), o (h * hd * d), gate/up/down (3 * d * I), two
    RMSNorm weights (2d), biases where the config has them, Qwen3's q/k norms (2 hd). Plus the embedding
    (V * d), the LM head when untied (V * d) and the final norm (d). Under expand_width(., k) every matrix
    of a layer grows k^2-fold, every vector over the residual / heads / units k-fold, the embedding and the
    LM head k-fold, and the head is untied. SmolLM2-135M (d 576, I 1536, 30 layers, 9/3 heads of 64,
    V 49152, tied): 134,515,008; k = 8: 7,248,038,400 (14.5 GB in bf16, 14.0 GB read per token)."""
    d, I, h, kv, hd, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                          cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
    layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * I + 2 * d
    if cfg.qkv_bias:
        layer += h * hd + 2 * kv * hd
    if cfg.o_bias:
        layer += d
    if cfg.mlp_bias:
        layer += 2 * I + d
    if cfg.qk_norm:
        layer += 2 * hd
    return cfg.num_hidden_layers * layer + V * d * (1 if cfg.tie_word_embeddings else 2) + d


def weight_bytes_per_token(cfg: ssd.ModelConfig, bytes_per_param: int = 2) -> int:
    """Bytes of weights one decode step reads (the bandwidth floor of a memory-bound step): every weight,
    except that of an untied embedding table it reads one row per token (a tied one is read whole, as
    the LM head)."""
    untied_table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size - cfg.hidden_size
    return (num_params(cfg) - untied_table) * bytes_per_param


@torch.no_grad()
def expand_width(model: ssd.Transformer, k: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> ssd.Transformer:
    """A new ssd.Transformer, k times wider, computing the same next-token logits as `model` (see the
    module docstring for the construction). Built on `device` (default: the model's) in `dtype` (default:
    the model's), one tensor at a time; each new tensor is computed in float32 and rounded once."""
    new_cfg = expanded_config(model.cfg, k)
    device = torch.device(device) if device is not None else model.device
    dtype = dtype or model.lm_head.weight.dtype

    def f32(t):
        return t.detach().to(device=device, dtype=torch.float32)

    def out(t):
        return t.to(dtype).contiguous()

    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight":                  # reads the residual: columns tiled, / k
            state[name] = out(f32(p).repeat(1, k) / k)
        elif name == "model.embed_tokens.weight":     # produces the residual: columns tiled
            state[name] = out(f32(p).repeat(1, k))
        elif name.endswith(("q_norm.weight", "k_norm.weight")):   # per head_dim: unchanged
            state[name] = out(f32(p))
        elif p.dim() == 1:                            # residual norms and biases: along a duplicated dim
            state[name] = out(f32(p).repeat(k))
        elif p.dim() == 2:                            # layer matrices: read and write duplicated dims
            state[name] = out(f32(p).repeat(k, k) / k)
        else:
            raise ValueError(f"expand_width: unexpected parameter {name} of shape {tuple(p.shape)}")
    with torch.device("meta"):
        wide = ssd.Transformer(new_cfg)
    wide.load_state_dict(state, strict=True, assign=True)
    wide.inv_freq, wide.attn_scale = ssd.rope_inv_freq(new_cfg)
    for p in wide.parameters():
        p.requires_grad_(False)
    return wide.eval()


if __name__ == "__main__":   # python scripts/expand.py [K]: the sizes for the embedded target
    import argparse
    ap = argparse.ArgumentParser(description="sizes of SmolLM2-135M-Instruct expanded k times")
    ap.add_argument("k", type=int, nargs="*", default=[1, 2, 4, 8])
    ks = ap.parse_args().k
    import embedded
    base = ssd.ModelConfig.from_dict(ssd.read_config(embedded.ensure_target(progress=False)))
    for k in ks:
        c = expanded_config(base, k) if k > 1 else base
        print(f"k={k}: {num_params(c) / 1e9:.3f}B parameters, {weight_bytes_per_token(c) / 1e9:.2f} GB read per "
              f"token in bf16 (d={c.hidden_size}, I={c.intermediate_size}, heads {c.num_attention_heads}/"
              f"{c.num_key_value_heads} of {c.head_dim})")
