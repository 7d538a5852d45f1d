"""Speculative Speculative Decoding (SSD), the readable reference.

Kumar, Dao & May, "Speculative Speculative Decoding" (arXiv 2603.03251, ICLR 2026); the optimized form is Saguaro.
Read top to bottom:
  1. the model     a Llama-3 / Qwen3 family transformer that loads Hugging Face checkpoints
  2. sampling      temperature, top-k / top-p, Saguaro's rescaling, and `verify`: the exact rule every proposal passes
  3. decoding      AR (one target pass per token), SD (draft K tokens, verify them in one pass), SSD (while the
                   target verifies, the draft pre-computes the next speculation for the likely outcomes: a hit
                   costs no drafting)
  4. generate()
  5. a small command line: python ssd.py --prompt "The capital of France is"

Notation follows the paper: target p, draft q, lookahead K, recovery token r (sampled by the target after
verification, not yet run through it), n = accepted draft tokens in a round (0..K).

Draft and target run one after the other on one device; each round times its parts, to show what the real system
(ssd_fast.py) overlaps: in SSD the draft's glue pass and tree decode run *during* the verify. The reference also
honours sliding-window attention, dynamic RoPE and partial rotary embeddings, which the fast engine refuses
(ssd_engine/fast_model.py, check_supported).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. The model
# ---------------------------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class ModelConfig:
    """Every field of config.json that changes the math, validated at construction."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # {"rope_type": "llama3" | "linear" | "yarn" | "dynamic", ...}
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False                 # Llama/Qwen3 `attention_bias`; always on for Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False                  # Qwen3 normalizes q and k per head before RoPE
    sliding_window: int | None = None
    layer_types: list | None = None        # "full_attention" / "sliding_attention" per layer
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    shared_embedding: dict | None = None   # our draft: embedding = target's embedding @ projectionᵀ

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("config: num_attention_heads must be a multiple of num_key_value_heads")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3", "yarn", "dynamic"):
            raise ValueError(f"config: rope type '{rope_type}' is not supported "
                             "(default, linear, llama3, yarn, dynamic are)")

    @classmethod
    def from_dict(cls, c: dict) -> "ModelConfig":
        model_type = c.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = ", ".join(c.get("architectures") or [model_type or "unknown"])
            raise ValueError(f"unsupported architecture {archs}: this project runs the Llama-3 and Qwen3 families "
                             f"({', '.join(SUPPORTED_ARCHITECTURES.values())})")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config: hidden_act '{c['hidden_act']}' is not supported (only silu)")
        # RoPE: `rope_theta` + `rope_scaling` (classic), or `rope_parameters` holding both (transformers 5).
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
        partial = rope.pop("partial_rotary_factor", None) or c.get("partial_rotary_factor", 1.0)
        if rope.get("rope_type", "default") == "default":
            rope = None
        heads = c["num_attention_heads"]
        layer_types = c.get("layer_types")
        window = c.get("sliding_window") if (c.get("use_sliding_window", False) and c.get("sliding_window")) else None
        if window and not layer_types:  # Qwen: sliding window on the layers from max_window_layers on
            first = c.get("max_window_layers", 0)
            layer_types = ["sliding_attention" if i >= first else "full_attention"
                           for i in range(c["num_hidden_layers"])]
        if not window:
            layer_types = None
        eos = c.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        bias = bool(c.get("attention_bias", False))
        return cls(
            model_type=model_type, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            max_position_embeddings=c.get("max_position_embeddings", 2048), rope_theta=float(theta),
            rope_scaling=rope, partial_rotary_factor=float(partial),
            tie_word_embeddings=c.get("tie_word_embeddings", model_type != "llama"),
            qkv_bias=bias or model_type == "qwen2", o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3", sliding_window=window, layer_types=layer_types,
            bos_token_id=c.get("bos_token_id"), eos_token_ids=eos, shared_embedding=c.get("ssd_shared_embedding"))


def rope_inv_freq(cfg: ModelConfig, max_position: int = 0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary embedding, and the attention scaling some variants apply."""
    dim = int(cfg.head_dim * cfg.partial_rotary_factor)
    base, s = cfg.rope_theta, cfg.rope_scaling or {}
    kind, factor = s.get("rope_type", "default"), s.get("factor", 1.0)
    original = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
    if kind == "dynamic" and max_position > cfg.max_position_embeddings:
        # Dynamic NTK: grow the base once the sequence outgrows the trained context.
        base = base * ((factor * max_position / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    if kind == "yarn":
        # YaRN (Peng et al. 2023, eq. 17-23): interpolate low frequencies, extrapolate high ones,
        # ramp between the two correction dims, and scale attention by 0.1 ln(factor) + 1.
        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        attn = s.get("attention_factor")
        if attn is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        return inv_freq, float(attn)
    return inv_freq, 1.0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of the first `2 * cos.shape[-1]` dims (the HF "rotate half" layout)."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Keys and values of every layer, by *slot*. Main slots are positions (slot p holds token p); SSD's tree
    branches use scratch slots past the main region, so their RoPE position and slot differ (the paper's decoupled
    positions). `lens[b]` = valid main slots of row b."""

    def __init__(self, cfg: ModelConfig, batch: int, main_slots: int, scratch_slots: int = 0,
                 dtype=torch.float32, device="cpu"):
        shape = (batch, main_slots + scratch_slots, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.pos = torch.zeros(shape[:2], dtype=torch.long, device=device)  # RoPE position of each slot
        self.main_slots = main_slots
        self.lens = [0] * batch


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)
        self.cfg, self.layer = cfg, layer
        sliding = cfg.layer_types and cfg.layer_types[layer] == "sliding_attention"
        self.window = cfg.sliding_window if sliding else None

    def forward(self, x, cos, sin, cache: KVCache, slots, visible, positions, keys_at):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos[:, :, None], sin[:, :, None]), apply_rope(k, cos[:, :, None], sin[:, :, None])
        # Write the new keys/values into their slots first, then attend over the visible slots.
        rows = torch.arange(B, device=x.device)[:, None]
        cache.k[self.layer][rows, slots] = k.to(cache.k[self.layer].dtype)
        cache.v[self.layer][rows, slots] = v.to(cache.v[self.layer].dtype)
        keys, values = cache.k[self.layer][:, keys_at], cache.v[self.layer][:, keys_at]
        if self.window:  # sliding-window layers see only the last `window` positions
            visible = visible & (positions[:, :, None] - cache.pos[:, None, keys_at] < self.window)
        # Grouped-query attention: each KV head serves num_heads / num_kv_heads query heads.
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q.float(), keys.float()) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), values.float()).to(x.dtype)
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, *attn_args):
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Module names follow Hugging Face's, so a checkpoint's state dict loads as it is."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq, self.attn_scale = rope_inv_freq(cfg)

    @property
    def device(self):
        return self.lm_head.weight.device

    def new_cache(self, batch: int, main_slots: int, scratch_slots: int = 0) -> KVCache:
        w = self.lm_head.weight
        return KVCache(self.cfg, batch, main_slots, scratch_slots, dtype=w.dtype, device=w.device)

    @torch.no_grad()
    def forward(self, tokens, positions, cache: KVCache, slots, visible, keys_at=None) -> torch.Tensor:
        """tokens, positions, slots: [B, T]; visible: bool [B, T, S], which cache slots `keys_at` (default: the first
        S) each query may attend, its own included. Attention reads only those slots, so its cost follows the tokens
        in use, not the cache's size. Returns float32 logits [B, T, V]."""
        if keys_at is None:
            keys_at = torch.arange(visible.shape[-1], device=tokens.device)
        inv_freq, scale = self.inv_freq, self.attn_scale
        if (self.cfg.rope_scaling or {}).get("rope_type") == "dynamic":
            inv_freq, scale = rope_inv_freq(self.cfg, int(positions.max()) + 1)
        angles = positions[..., None].double() * inv_freq.to(positions.device)
        cos, sin = (angles.cos() * scale).float(), (angles.sin() * scale).float()
        cache.pos[torch.arange(tokens.shape[0], device=tokens.device)[:, None], slots] = positions
        x = self.model.embed_tokens(tokens)
        for block in self.model.layers:
            x = block(x, cos, sin, cache, slots, visible, positions, keys_at)
        return self.lm_head(self.model.norm(x)).float()


def read_json(file: Path) -> dict:
    """A checkpoint's JSON file (config.json, generation_config.json) as a dict, or an error naming the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}): is it a JSON file?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object of settings")
    return data


def read_config(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model checkpoint: it has no config.json "
                                "(pass a Hugging Face checkpoint directory)")
    return read_json(path / "config.json")


def load_state_dict(path: Path) -> dict:
    """Single or sharded safetensors (model.safetensors / model-0000x-of-0000y.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (only safetensors checkpoints are supported)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except SafetensorError as e:     # a damaged or truncated file
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
    return state


def load_model(path, dtype=torch.float32, device="cpu", shared_embedding: torch.Tensor | None = None) -> Transformer:
    """Load a Hugging Face checkpoint directory. `shared_embedding`: the target's embedding matrix, for a draft that
    stores only a projection of it (models/smollm2-draft)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} does not exist (pass a checkpoint directory)")
    cfg = ModelConfig.from_dict(read_config(path))
    gen_cfg = path / "generation_config.json"   # instruct models often list more stop tokens here
    if gen_cfg.is_file():
        eos = read_json(gen_cfg).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        cfg.eos_token_ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *eos]))
    state = {k.removeprefix("language_model."): v for k, v in load_state_dict(path).items()}
    if cfg.shared_embedding:
        if shared_embedding is None:
            raise ValueError(f"{path} borrows its embedding from its target: load it as a draft, with the target")
        proj = state.pop(cfg.shared_embedding["projection"]).float()
        state["model.embed_tokens.weight"] = shared_embedding.float().to(proj.device) @ proj.T
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing weights {missing[:3]}")
    model.inv_freq, model.attn_scale = rope_inv_freq(cfg)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# 2. Sampling and exact verification
# ---------------------------------------------------------------------------------------------

@dataclass
class Sampling:
    """Temperatures per row (0 = greedy); top-k / top-p filter the target's p and the draft's q alike."""
    temperature: list
    draft_temperature: list
    top_k: int = 0
    top_p: float = 1.0


def to_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> probabilities. A row at temperature 0 becomes one-hot on its argmax: greedy decoding is
    the T -> 0 limit of the same rule (no special case in `verify`)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    t = temperature.to(logits.dtype).reshape(temperature.shape + (1,) * (logits.dim() - temperature.dim()))
    probs = (logits / t.clamp_min(1e-6)).softmax(-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    greedy = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(t == 0, greedy, probs)


def saguaro_rescale(q: torch.Tensor, fan_out: int, c: float) -> torch.Tensor:
    """Saguaro sampling (paper, section 4.2): scale the draft's top-(F+1) probabilities by C <= 1. A rejection then
    samples max(0, p - q'), with more mass on those top tokens, the ones the speculation cache holds: a higher hit
    rate for a little acceptance. Exact, because `verify` uses this same q' (the tokens are sampled from q')."""
    if c >= 1.0 or fan_out <= 0:
        return q
    top = q.topk(min(fan_out + 1, q.shape[-1]), dim=-1).indices
    scale = torch.ones_like(q).scatter(-1, top, c)
    q = q * scale
    return q / q.sum(-1, keepdim=True)


def exponential_noise(shape, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """E ~ Exp(1) as -log(1 - U), U uniform from `gen` (the fast engine draws its noise the same way)."""
    return torch.rand(shape, generator=gen, device=device).neg_().log1p_().neg_()


def sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row by the exponential race: argmax_i p_i / E_i, E_i ~ Exp(1) i.i.d., is distributed as p
    (min_i E_i / p_i is the first arrival of independent clocks of rates p_i); the engine's kernel computes the same."""
    flat = probs.reshape(-1, probs.shape[-1]).float()
    noise = exponential_noise(flat.shape, gen, flat.device)
    scores = torch.where(flat > 0, flat / noise, torch.full_like(flat, -1.0))
    return scores.argmax(-1).reshape(probs.shape[:-1])


def draft_sample(logits: torch.Tensor, temperature: torch.Tensor, opts, fan_out: int, c: float, gen: torch.Generator):
    """The draft's proposal at one position: a token and the q' it was drawn from (Saguaro-rescaled when C < 1),
    returned together because exactness needs the verifier to use this very q'."""
    q = saguaro_rescale(to_probs(logits, temperature, opts.top_k, opts.top_p), fan_out, c)
    return sample(q, gen), q


def deterministic_q(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The q `verify` needs for proposals that were not sampled (the cheap backup): one-hot. Then a token x is
    accepted with probability p(x), and a rejection samples p without x."""
    return F.one_hot(tokens, vocab_size).float()


# Random streams: each sampling site has its own generator, its seed derived from the user's. The verifier's draws
# ("target") must be independent of those that made the proposals ("draft": SD and the tree; "backup": SSD's jit
# backup): generators seeded alike (as `torch.manual_seed` seeds every GPU) give the same numbers, a biased output.
SITES = ("target", "draft", "backup")


def derive_seed(seed: int, site: str) -> int:
    """A 63-bit seed for one site, from the user's seed (distinct sites: unrelated seeds)."""
    digest = hashlib.sha256(f"ssd:{seed}:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_streams(seed: int, devices: dict | None = None) -> dict:
    """{site: torch.Generator on that site's device (default cpu), seeded by derive_seed}."""
    devices = devices or {}
    return {site: torch.Generator(device=devices.get(site, "cpu")).manual_seed(derive_seed(seed, site))
            for site in SITES}


def acceptance_prob(p_s: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """min(1, p(s) / q(s)) for a proposal s sampled from q (q(s) > 0 whenever s was drawn)."""
    return (p_s / q_s.clamp_min(1e-30)).clamp(max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A rejection samples normalize(max(0, p - q)). If p - q has no positive mass, p == q and no rejection can
    happen: return p."""
    r = (p - q).clamp_min(0)
    r = torch.where(r.sum(-1, keepdim=True) > 0, r, p)
    return r / r.sum(-1, keepdim=True)


def verify(p: torch.Tensor, q: torch.Tensor, proposal: torch.Tensor, gen: torch.Generator):
    """Exact speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023, Thm. 1). p: target probabilities
    [B, K+1, V] after r, s1..sK; q [B, K, V]: what the proposals s [B, K] were sampled from (one-hot for the cheap
    backup's deterministic ones, see deterministic_q). Returns (n [B], new r [B])."""
    B, K = proposal.shape
    p_s = p[:, :K].gather(-1, proposal[..., None])[..., 0]
    q_s = q.gather(-1, proposal[..., None])[..., 0]
    u = torch.rand(B, K, generator=gen, device=p.device)
    accepted = u < acceptance_prob(p_s, q_s)
    n = accepted.long().cumprod(-1).sum(-1)         # length of the accepted prefix
    rows = torch.arange(B, device=p.device)
    q_n = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n]  # q_K := 0: the bonus samples p_K
    return n, sample(residual(p[rows, n], q_n), gen)


# ---------------------------------------------------------------------------------------------
# 3. Decoding
# ---------------------------------------------------------------------------------------------

def extend(model: Transformer, cache: KVCache, new_tokens: list[list[int]]) -> torch.Tensor:
    """Run each row's new tokens at positions lens[b], lens[b]+1, ..., advance lens, return logits [B, T, V]. Ragged
    rows are right-padded: a pad writes a slot past the row's end, rewritten before anything attends to it."""
    T, dev = max(len(t) for t in new_tokens), model.device
    tokens = torch.tensor([t + [t[-1] if t else 0] * (T - len(t)) for t in new_tokens], device=dev)
    positions = torch.tensor(cache.lens, device=dev)[:, None] + torch.arange(T, device=dev)
    S = int(positions.max()) + 1
    visible = torch.arange(S, device=dev)[None, None, :] <= positions[:, :, None]  # causal
    logits = model(tokens, positions, cache, positions, visible)
    cache.lens = [n + len(t) for n, t in zip(cache.lens, new_tokens)]
    return logits


def last_logits(logits: torch.Tensor, new_tokens: list[list[int]]) -> torch.Tensor:
    return torch.stack([logits[b, len(t) - 1] for b, t in enumerate(new_tokens)])


@dataclass
class RoundStats:
    """One round of decoding. `accepted`, `hit` are per row; times in seconds per part."""
    accepted: list
    hit: list | None = None
    backup: str | None = None
    fan_out: list | None = None
    times: dict = field(default_factory=dict)
    active: list | None = None  # rows still generating (finished rows ride along, frozen)
    spans: list = field(default_factory=list)   # ssd_fast: (part, start, end, track) as they really ran


class Timer:
    def __init__(self, stats: RoundStats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.stats.times[self.name] = self.stats.times.get(self.name, 0.0) + time.perf_counter() - self.t0


@dataclass
class State:
    """The batch: tokens[b] = prompt + generated so far, ending with the recovery token r (not yet run through the
    target)."""
    tokens: list
    prompt_lens: list
    done: list
    finish: list
    target_cache: KVCache
    draft_cache: KVCache | None = None


def draft_steps(draft, cache, first_tokens, k, sampling_t, opts, gen, fan_outs=None, c=1.0):
    """The draft proposes k tokens per row, one forward each (SD, SSD's jit backup); first_tokens[b]: the row's tokens
    the draft has not seen yet (ending with r)."""
    logits = last_logits(extend(draft, cache, first_tokens), first_tokens)
    tokens, qs = [], []
    for i in range(k):
        s, q = draft_sample(logits, sampling_t, opts, fan_outs[i] if fan_outs is not None else 0, c, gen)
        tokens.append(s)
        qs.append(q)
        if i + 1 < k:
            logits = extend(draft, cache, [[int(x)] for x in s])[:, -1]
    return torch.stack(tokens, 1), torch.stack(qs, 1)


def target_verify(target, state, proposal, q, sampling_t, opts, gen):
    """One target pass over [r, s1..sK] per row, then `verify`."""
    r = [t[-1] for t in state.tokens]
    new = [[r_b] + proposal[b].tolist() for b, r_b in enumerate(r)]
    logits = extend(target, state.target_cache, new)
    p = to_probs(logits, sampling_t, opts.top_k, opts.top_p)
    return verify(p, q, proposal, gen)


def commit(state: State, proposal, n, r_new, max_new_tokens, eos_ids, context_limit, k):
    """Append s1..sn and the new r; roll the caches back to the accepted prefix (a length: stale slots are never
    visible and get rewritten). Finished rows ride along frozen: computed with the batch, nothing kept."""
    for b in range(len(state.tokens)):
        m = len(state.tokens[b])                 # r sits at position m-1
        n_b = 0 if state.done[b] else int(n[b])
        state.target_cache.lens[b] = m - 1 + n_b + (0 if state.done[b] else 1)
        if state.draft_cache is not None:
            state.draft_cache.lens[b] = min(state.draft_cache.lens[b], state.target_cache.lens[b])
        if not state.done[b]:
            state.tokens[b] += proposal[b, :n_b].tolist() + [int(r_new[b])]
            finish_check(state, b, max_new_tokens, eos_ids, context_limit, k)
        if state.done[b]:  # a row cut short (EOS, max_new_tokens) keeps only its tokens' KV
            for cache in (state.target_cache, state.draft_cache):
                if cache is not None:
                    cache.lens[b] = min(cache.lens[b], len(state.tokens[b]) - 1)


def finish_check(state, b, max_new_tokens, eos_ids, context_limit, k):
    generated = state.tokens[b][state.prompt_lens[b]:]
    for i, t in enumerate(generated):
        if t in eos_ids or i + 1 >= max_new_tokens:
            state.tokens[b] = state.tokens[b][:state.prompt_lens[b] + i + 1]
            state.done[b], state.finish[b] = True, "eos" if t in eos_ids else "length"
            return
    if len(state.tokens[b]) + k + 1 > context_limit:   # the next round would not fit
        state.done[b], state.finish[b] = True, "context"


def stop_rows(state, rows, reason="stop"):
    for b in rows or ():
        if not state.done[b]:
            state.done[b], state.finish[b] = True, reason


# --- AR and SD ---------------------------------------------------------------------------------

def ar_round(state, target, draft, opts, ctx):
    """Autoregressive: one target pass per token. Slow because each pass reads all the weights."""
    stats = RoundStats(accepted=[0] * len(state.tokens))
    with Timer(stats, "verify"):
        new = [[t[-1]] for t in state.tokens]
        logits = extend(target, state.target_cache, new)[:, -1]
        r_new = sample(to_probs(logits, ctx.t, opts.top_k, opts.top_p), ctx.rng["target"])
    commit(state, torch.zeros(len(new), 0, dtype=torch.long), torch.zeros(len(new), dtype=torch.long), r_new,
           *ctx.limits(0))
    return stats


def sd_round(state, target, draft, opts, ctx):
    """Speculative decoding: the draft proposes K tokens (K small passes), the target checks them in one pass.
    The draft waits for the target and the target for the draft."""
    stats = RoundStats(accepted=[])
    with Timer(stats, "draft"):
        unseen = [t[state.draft_cache.lens[b]:] for b, t in enumerate(state.tokens)]
        proposal, q = draft_steps(draft, state.draft_cache, unseen, ctx.k, ctx.t_draft, opts, ctx.rng["draft"])
    with Timer(stats, "verify"):
        n, r_new = target_verify(target, state, proposal, q, ctx.t, opts, ctx.rng["target"])
    stats.accepted = n.tolist()
    commit(state, proposal, n, r_new, *ctx.limits(ctx.k))
    return stats


# --- SSD ---------------------------------------------------------------------------------------

def geometric_fan_out(k: int, budget: int, accept_rate: float, miss_exponent: float = 1.0) -> list[int]:
    """Saguaro's fan-out (paper, section 4.1, Thm. 2). A round accepts n = j with probability a^j (1-a) for j < K,
    a^K for j = K. With a power-law miss model P(miss | F) = F^-r, the budget B = sum F_j is best spent geometrically:
    F_j ∝ a^(j/(1+r)) for j < K, F_K ∝ a^(K/(1+r)) (1-a)^(-1/(1+r)); rounded keeping the budget (largest remainders)."""
    a = min(max(accept_rate, 1e-3), 1 - 1e-3)
    w = [a ** (j / (1 + miss_exponent)) for j in range(k + 1)]
    w[k] *= (1 - a) ** (-1 / (1 + miss_exponent))
    raw = [budget * x / sum(w) for x in w]
    fan = [int(x) for x in raw]
    for j in sorted(range(k + 1), key=lambda j: raw[j] - fan[j], reverse=True)[:budget - sum(fan)]:
        fan[j] += 1
    return fan


def ngram_proposal(tokens: list[int], k: int) -> list[int]:
    """The cheap deterministic backup (prompt lookup): what followed the latest earlier occurrence of the last token,
    padded by repeating the last token."""
    last = tokens[-1]
    for start in range(len(tokens) - 2, -1, -1):
        if tokens[start] == last:
            follow = tokens[start + 1:start + 1 + k]
            return follow + [last] * (k - len(follow))
    return [last] * k


class SpeculationCache:
    """For each row: outcome key (n, r) -> (K tokens, their K q rows), rebuilt every round."""

    def __init__(self, batch: int):
        self.entries = [dict() for _ in range(batch)]

    def lookup(self, b: int, n: int, r: int):
        return self.entries[b].get((n, r))


def choose_backup(batch: int, est) -> str:
    """Batch-aware backup (paper, section 4.3): the one with more expected tokens per second. On a miss the jit backup
    runs K draft steps before the verify, and the batch waits if *any* row misses (probability 1 - h^b); the cheap
    one never waits but is rarely accepted. Costs are fixed for a run (ssd_fast.py measures them per batch size; here
    the draft/target parameter ratio stands in), so the choice depends only on the run: a seed reproduces it."""
    h, a, k = est.hit_rate, est.accept_rate, est.k
    t_verify = est.t_verify or 1.0
    t_jit = est.t_jit or est.jit_cost_ratio * t_verify
    tokens_draft = (1 - a ** (k + 1)) / (1 - a)               # E[tokens per round] with draft proposals
    waits = 1.0 if est.jit_always else 1 - h ** batch           # a jit launched every round costs every round
    jit = tokens_draft / (t_verify + waits * t_jit)
    cheap = (h * tokens_draft + (1 - h) * est.tokens_cheap) / t_verify
    return "jit" if jit >= cheap else "fast"


@dataclass
class Estimates:
    """Running estimates that steer SSD: acceptance (fan-out), hit rate and costs (backup choice)."""
    k: int
    accept_rate: float = 0.7
    hit_rate: float = 0.8
    t_verify: float | None = None       # seconds, when measured
    t_jit: float | None = None
    jit_cost_ratio: float = 1.0         # t_jit / t_verify when not measured
    jit_always: bool = False            # jit runs every round, kept only where a row missed (ssd_fast's CUDA graph)
    tokens_cheap: float = 1.2
    accepted: float = 2.8               # pseudo-counts: the prior a = 0.7 weighs as 4 trials
    trials: float = 4.0

    def update(self, stats: RoundStats, decay=0.9):
        for b, n in enumerate(stats.accepted):
            if not stats.active[b]:
                continue
            if stats.hit and not stats.hit[b] and stats.backup == "fast":
                self.tokens_cheap = decay * self.tokens_cheap + (1 - decay) * (n + 1)
                continue  # the n-gram proposal says nothing about the draft's acceptance
            # Per-token acceptance a from geometric outcomes: a = accepted / (accepted + rejections).
            self.accepted = decay * self.accepted + n
            self.trials = decay * self.trials + n + (n < self.k)
        self.accept_rate = min(max(self.accepted / self.trials, 0.01), 0.99)
        hits = [h for h, on in zip(stats.hit or [], stats.active) if on]
        if hits:
            self.hit_rate = decay * self.hit_rate + (1 - decay) * sum(hits) / len(hits)


def ssd_round(state, target, draft, opts, ctx):
    """One SSD round. In the real system step 4 runs on the draft's GPU *during* step 3, so on a hit the round costs
    max(verify, glue + tree), not their sum."""
    B, K, est = len(state.tokens), ctx.k, ctx.est
    fan = ctx.fan_out or geometric_fan_out(K, ctx.fan_out_budget, est.accept_rate, ctx.miss_exponent)
    stats = RoundStats(accepted=[], hit=[], fan_out=fan)
    # 1. Handshake: the outcome key of the last round, (n, r), looked up in the speculation cache.
    with Timer(stats, "lookup"):
        found = [ctx.cache.lookup(b, ctx.last_n[b], state.tokens[b][-1]) for b in range(B)]
        stats.hit = [f is not None for f in found]
    # 2. Misses get a backup proposal: jit (draft decodes K tokens now) or a cheap one (n-gram).
    proposal, q = torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, target.cfg.vocab_size)
    for b, f in enumerate(found):
        if f is not None:
            proposal[b], q[b] = f
    if not all(stats.hit):
        stats.backup = ctx.backup if ctx.backup != "auto" else choose_backup(B, est)
        with Timer(stats, "backup"):
            miss = [b for b in range(B) if not stats.hit[b]]
            if stats.backup == "jit":
                # The glue pass has already written the draft KV up to r, so only r is unseen.
                lens = list(state.draft_cache.lens)
                s, qs = draft_steps(draft, state.draft_cache, [[t[-1]] for t in state.tokens], K,
                                    ctx.t_draft, opts, ctx.rng["backup"], fan, ctx.c)
                state.draft_cache.lens = lens          # the glue pass below rewrites these slots
                proposal[miss], q[miss] = s[miss], qs[miss]
            else:
                for b in miss:
                    proposal[b] = torch.tensor(ngram_proposal(state.tokens[b], K))
                    q[b] = deterministic_q(proposal[b], q.shape[-1])
    # 3. The target verifies [r, s1..sK] exactly as in SD.
    with Timer(stats, "verify"):
        n, r_new = target_verify(target, state, proposal, q, ctx.t, opts, ctx.rng["target"])
    # 4. Meanwhile, on the draft: glue pass, fork, tree decode -> next round's speculation cache.
    build_speculation_cache(state, draft, proposal, fan, opts, ctx, stats)
    stats.accepted = n.tolist()
    ctx.last_n = n.tolist()
    commit(state, proposal, n, r_new, *ctx.limits(K))
    return stats


def build_speculation_cache(state, draft, proposal, fan, opts, ctx, stats):
    B, K, cache = len(state.tokens), ctx.k, state.draft_cache
    trunk = list(cache.lens)                       # row b: draft KV valid for positions < trunk[b]
    with Timer(stats, "glue"):
        # Glue pass: the draft reads [r, s1..sK] once, so its KV is right whatever prefix the target accepts; row j
        # of its output is the draft's guess at the recovery token if exactly j tokens are accepted.
        glue = extend(draft, cache, [[t[-1]] + proposal[b].tolist() for b, t in enumerate(state.tokens)])
    with Timer(stats, "tree"):
        # Fork: for outcome n = j, the top-F_j tokens of glue row j are the likely recovery tokens; for j < K, s_{j+1}
        # is excluded (had the target sampled it, it would have been accepted). Picked deterministically: candidates
        # condition the cache, they are not proposals.
        scores = glue.clone()
        scores[:, :K].scatter_(-1, proposal[..., None], float("-inf"))
        fan = [min(f, scores.shape[-1] - 1) for f in fan]          # tiny vocabularies
        branch_j = torch.tensor([j for j in range(K + 1) for _ in range(fan[j])])
        cand = torch.cat([scores[:, j].topk(fan[j], dim=-1).indices for j in range(K + 1) if fan[j]], dim=1)
        tokens, qs = tree_decode(draft, cache, trunk, branch_j, cand, fan, opts, ctx)
        ctx.cache = SpeculationCache(B)
        for b in range(B):
            for i in range(len(branch_j)):
                ctx.cache.entries[b][(int(branch_j[i]), int(cand[b, i]))] = (tokens[b, i], qs[b, i])


def tree_decode(draft, cache, trunk, branch_j, cand, fan, opts, ctx):
    """K tokens for every branch (j, candidate): K batched draft forwards over all N = sum F_j branches. A branch's
    RoPE positions continue its outcome (P + j + 1 + depth, P the position of r) but its KV goes to its own scratch
    slots, so branches never collide; it attends to the trunk, the glue tokens r, s1..sj, and its own chain."""
    B, N, K, dev = cand.shape[0], cand.shape[1], ctx.k, draft.device
    base = torch.tensor(trunk, device=dev)[:, None]                 # position of r per row
    scratch = cache.main_slots + torch.arange(N, device=dev)[:, None] * K  # [N, 1] first slot
    # Attend over the slots in use only: the trunk and glue up to the longest row, then the scratch slots.
    trunk_end = int(base.max()) + int(branch_j.max()) + 1
    slot_ids = torch.cat([torch.arange(trunk_end, device=dev), cache.main_slots + torch.arange(N * K, device=dev)])
    sees_glue = slot_ids[None, None] <= (base + branch_j[None].to(dev))[..., None]    # trunk + r..s_j
    tokens, out_tokens, out_q = cand.to(dev), [], []
    for depth in range(K):
        positions = base + branch_j[None].to(dev) + 1 + depth
        slots = (scratch[:, 0] + depth)[None].expand(B, N)
        own = (slot_ids[None] >= scratch) & (slot_ids[None] <= scratch + depth)       # [N, S]
        visible = (sees_glue & (slot_ids < cache.main_slots)) | own[None]
        logits = draft(tokens, positions, cache, slots, visible, slot_ids)
        # Saguaro sampling: depth d is proposal d+1; if it is rejected, outcome n = d keys the next round: F_d.
        tokens, q = draft_sample(logits, ctx.t_draft, opts, fan[depth], ctx.c, ctx.rng["draft"])
        out_tokens.append(tokens)
        out_q.append(q)
    return torch.stack(out_tokens, 2), torch.stack(out_q, 2)        # [B, N, K], [B, N, K, V]


# ---------------------------------------------------------------------------------------------
# 4. generate()
# ---------------------------------------------------------------------------------------------

ROUNDS = {"ar": ar_round, "sd": sd_round, "ssd": ssd_round}


@dataclass
class GenerationResult:
    tokens: list            # generated token ids per prompt (EOS included when it ended the row)
    finish_reasons: list    # "eos" | "length" | "context"
    rounds: list            # RoundStats per round
    mode: str
    k: int
    prefill_time: float = 0.0

    def summary(self) -> dict:
        """Totals over the run: tokens per round, acceptance, hit rate, time per part."""
        rounds = self.rounds
        row_rounds = [(r, b) for r in rounds for b, on in enumerate(r.active) if on]
        times: dict = {}
        for r in rounds:
            for name, t in r.times.items():
                times[name] = times.get(name, 0.0) + t
        accepted = sum(r.accepted[b] for r, b in row_rounds)
        proposed = len(row_rounds) * self.k
        hits = [r.hit[b] for r, b in row_rounds if r.hit]
        out = {"mode": self.mode, "k": self.k if self.mode != "ar" else 0, "rounds": len(rounds),
               "generated_tokens": sum(len(t) for t in self.tokens),
               "tokens_per_round": (accepted + len(row_rounds)) / max(1, len(row_rounds)),
               "acceptance_rate": accepted / proposed if proposed else None,
               "cache_hit_rate": sum(hits) / len(hits) if hits else None,
               "backups": {b: sum(1 for r in rounds if r.backup == b) for b in ("jit", "fast")},
               "prefill_s": self.prefill_time, "time_s": {k: round(v, 6) for k, v in times.items()}}
        if self.mode == "ssd":
            for name, want in (("tokens_per_round_hit", True), ("tokens_per_round_miss", False)):
                n = [r.accepted[b] + 1 for r, b in row_rounds if r.hit and r.hit[b] == want]
                out[name] = sum(n) / len(n) if n else None
            # What the real system pays: the draft's glue + tree run during the verify.
            par = sum(r.times.get("lookup", 0) + r.times.get("backup", 0) +
                      max(r.times.get("verify", 0), r.times.get("glue", 0) + r.times.get("tree", 0)) for r in rounds)
            out["overlapped_time_s"] = round(par, 6)
        return out


class Context:
    """Everything a round needs besides the models and the batch state."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def limits(self, k):
        return self.max_new_tokens, self.eos_ids, self.context_limit, k


def _per_row(value, batch, name, low=0.0):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * batch
    if len(values) != batch:
        raise ValueError(f"{name}: give one value or one per prompt ({batch})")
    for v in values:
        if not (isinstance(v, (int, float)) and v >= low):
            raise ValueError(f"{name} must be a number >= {low}, got {v}")
    return torch.tensor([float(v) for v in values])


def check_compatible(target: Transformer, draft: Transformer):
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.cfg.vocab_size} tokens) differs from the target's "
                         f"({target.cfg.vocab_size}): use a draft trained with the target's tokenizer")


@dataclass
class Request:
    """A validated generation request (shared with ssd_fast.py)."""
    prompts: list
    mode: str
    k: int
    k_used: int                 # K, or 0 in AR mode
    t: torch.Tensor             # per-row target temperature
    t_draft: torch.Tensor
    top_k: int
    top_p: float
    fan: list | None            # fixed fan-out per outcome, or None for Saguaro's geometric one
    budget: int                 # speculations per row and round (auto fan-out)
    c: float
    backup: str
    miss_exponent: float
    max_new_tokens: int
    eos: set
    context_limit: int
    seed: int


@dataclass(frozen=True)
class Settings:
    """How to decode, checked at construction (checks needing the models or prompts are make_request's). Pass one to
    generate / ssd_fast.Engine.generate as `settings=`, or its fields as keywords (they override it)."""
    mode: str = "ar"                    # ar | sd | ssd (the fast engine also takes "auto" at the command line)
    k: int | str = 4                    # lookahead K: draft tokens per round ("auto": ssd_fast measures)
    temperature: float | list = 0.0     # per row or for all; 0 = greedy
    draft_temperature: float | list | None = None   # default: the target's
    top_k: int = 0
    top_p: float = 1.0
    fan_out: str | int | list = "auto"  # "auto" (Saguaro's geometric fan-out), F for every outcome, or K+1 values
    fan_out_budget: int | None = None   # speculations per row and round under "auto" (default 4(K+1))
    saguaro_c: float = 1.0              # Saguaro sampling's C in (0, 1]
    backup: str = "auto"                # auto | jit | fast
    miss_exponent: float = 1.0          # the power-law miss model of the geometric fan-out
    max_new_tokens: int = 64
    seed: int = 0
    eos_token_id: int | list | None = None   # default: the target's

    def __post_init__(self):
        if self.mode not in ROUNDS:
            raise ValueError(f"mode must be one of ar, sd, ssd (got {self.mode!r})")
        if not (self.k == "auto" or (isinstance(self.k, int) and self.k >= 1)):
            raise ValueError(f"k (draft tokens per round) must be an integer >= 1, got {self.k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.saguaro_c <= 1.0):
            raise ValueError(f"saguaro_c must be in (0, 1], got {self.saguaro_c}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.backup not in ("auto", "jit", "fast"):
            raise ValueError(f"backup must be auto, jit or fast (got {self.backup!r})")
        if self.fan_out_budget is not None and self.fan_out_budget < 1:
            raise ValueError(f"fan_out_budget must be >= 1, got {self.fan_out_budget}")
        for name in ("temperature", "draft_temperature"):
            value = getattr(self, name)
            for v in (value if isinstance(value, (list, tuple)) else [] if value is None else [value]):
                if not (isinstance(v, (int, float)) and v >= 0):
                    raise ValueError(f"{name} must be a number >= 0, got {v}")

    @classmethod
    def of(cls, settings: "Settings | None" = None, **kw) -> "Settings":
        """`settings` with the keywords in `kw` replacing its fields (a new, checked object)."""
        unknown = set(kw) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        return replace(settings, **kw) if settings is not None else cls(**kw)


def make_request(target, prompts, draft=None, settings: Settings | None = None, max_context=None, **kw) -> Request:
    """The request for these models and prompts: the settings (or keywords) checked against them once."""
    s = Settings.of(settings, **kw)
    mode, k = s.mode, s.k
    batch_prompts = [list(prompts)] if prompts and isinstance(prompts[0], int) else [list(p) for p in prompts]
    B = len(batch_prompts)
    if B == 0 or any(len(p) == 0 for p in batch_prompts):
        raise ValueError("every prompt needs at least one token")
    if mode != "ar" and draft is None:
        raise ValueError(f"mode {mode} needs a draft model")
    if k == "auto":
        raise ValueError("k='auto' is the fast engine's (it measures the models): give an integer K here")
    if draft is not None:
        check_compatible(target, draft)
    k_used = k if mode != "ar" else 0
    t = _per_row(s.temperature, B, "temperature")
    t_draft = t if s.draft_temperature is None else _per_row(s.draft_temperature, B, "draft_temperature")
    fan = None
    if mode == "ssd" and s.fan_out != "auto":
        fan = [int(s.fan_out)] * (k + 1) if isinstance(s.fan_out, int) else [int(f) for f in s.fan_out]
        if len(fan) != k + 1 or min(fan) < 0 or sum(fan) < 1:
            raise ValueError(f"fan_out must be 'auto', a positive int, or K+1 = {k + 1} non-negative ints")
    max_ctx = min(target.cfg.max_position_embeddings, draft.cfg.max_position_embeddings if draft else 1 << 30,
                  max_context or 1 << 30)
    longest = max(len(p) for p in batch_prompts)
    if longest + k_used + 2 > max_ctx:
        raise ValueError(f"prompt of {longest} tokens does not fit the context window of {max_ctx} tokens "
                         f"(with room for K+2 = {k_used + 2} more): shorten the prompt")
    eos_token_id = s.eos_token_id
    eos = set(target.cfg.eos_token_ids if eos_token_id is None else
              [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    return Request(prompts=batch_prompts, mode=mode, k=k, k_used=k_used, t=t, t_draft=t_draft, top_k=s.top_k,
                   top_p=s.top_p, fan=fan, budget=s.fan_out_budget or 4 * (k + 1), c=s.saguaro_c, backup=s.backup,
                   miss_exponent=s.miss_exponent, max_new_tokens=s.max_new_tokens, eos=eos,
                   context_limit=min(max_ctx, longest + s.max_new_tokens + k_used + 2), seed=s.seed)


@torch.no_grad()
def generate(target: Transformer, prompts, draft: Transformer | None = None, settings: Settings | None = None,
             on_round=None, **kw) -> GenerationResult:
    """Generate from one prompt (token ids) or a batch (lists, any lengths), decoding as `settings` says (a Settings,
    or its fields as keywords). `on_round(tokens_so_far, stats)` runs after every round (streaming); it may return
    rows to stop now (finish reason "stop"). Ctrl-C ends cleanly: unfinished rows keep their tokens ("interrupted")."""
    s = Settings.of(settings, **kw)
    req = make_request(target, prompts, draft, s)
    mode, k, batch_prompts, B = s.mode, s.k, req.prompts, len(req.prompts)
    rng = random_streams(s.seed)        # one generator per sampling site (see SITES)
    scratch = (sum(req.fan) if req.fan else req.budget) * k if mode == "ssd" else 0
    # A finished row rides along, writing up to K + 1 positions past its last token: the caches have spare slots.
    slots = req.context_limit + req.k_used + 1

    # Prefill: each model reads the whole prompt; the target samples the first token (the first r).
    t0 = time.perf_counter()
    state = State(tokens=[list(p) for p in batch_prompts], prompt_lens=[len(p) for p in batch_prompts],
                  done=[False] * B, finish=[None] * B, target_cache=target.new_cache(B, slots))
    logits = last_logits(extend(target, state.target_cache, batch_prompts), batch_prompts)
    if draft is not None and mode != "ar":
        state.draft_cache = draft.new_cache(B, slots, scratch)
        extend(draft, state.draft_cache, batch_prompts)
    first = sample(to_probs(logits, req.t, s.top_k, s.top_p), rng["target"])
    opts = Sampling(temperature=req.t.tolist(), draft_temperature=req.t_draft.tolist(), top_k=s.top_k, top_p=s.top_p)
    ctx = Context(k=k, t=req.t, t_draft=req.t_draft, rng=rng, fan_out=req.fan, fan_out_budget=req.budget,
                  miss_exponent=s.miss_exponent, c=s.saguaro_c, backup=s.backup, max_new_tokens=s.max_new_tokens,
                  eos_ids=req.eos, context_limit=req.context_limit, est=Estimates(k=k), cache=SpeculationCache(B),
                  last_n=[0] * B)
    if draft is not None:  # the jit backup's cost: K draft steps, priced by parameter count
        ctx.est.jit_cost_ratio = (k * sum(p.numel() for p in draft.parameters())
                                  / sum(p.numel() for p in target.parameters()))
    for b in range(B):
        state.tokens[b].append(int(first[b]))
        finish_check(state, b, *ctx.limits(req.k_used))
    prefill_time = time.perf_counter() - t0

    rounds = []
    try:
        while not all(state.done):
            active = [not d for d in state.done]
            stats = ROUNDS[mode](state, target, draft, opts, ctx)
            stats.active = active
            ctx.est.update(stats)
            rounds.append(stats)
            if on_round:
                stop_rows(state, on_round([t[p:] for t, p in zip(state.tokens, state.prompt_lens)], stats))
    except KeyboardInterrupt:  # Ctrl-C: keep what was generated
        stop_rows(state, [b for b in range(B) if not state.done[b]], "interrupted")
    return GenerationResult(tokens=[t[p:] for t, p in zip(state.tokens, state.prompt_lens)],
                            finish_reasons=state.finish, rounds=rounds, mode=mode, k=req.k_used,
                            prefill_time=prefill_time)


# ---------------------------------------------------------------------------------------------
# 5. The command line: python ssd.py --prompt "The capital of France is"
# ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit status 2 (argparse would print its usage too)
        raise ValueError(message)


def main(argv=None) -> int:
    """Decode with the reference on the CPU; the fast engine's full command line is ssd_fast.py's."""
    ap = _Parser(prog="ssd.py", description="AR, SD and SSD decoding with the readable reference (CPU).")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text; repeat the flag for a batch")
    ap.add_argument("--target", help="target checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--draft", help="draft checkpoint directory (default with the embedded target: its draft)")
    ap.add_argument("--mode", choices=["ar", "sd", "ssd"], default="ssd")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per round")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="apply the target's chat template (default: raw text)")
    ap.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    try:
        a = ap.parse_args(argv)
        import embedded
        if "OMP_NUM_THREADS" not in os.environ:   # small products: threads without an idle core only wait
            torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // 2)))
        if a.target is None and a.draft is None and a.mode != "ar":
            a.draft, _ = embedded.default_draft(progress=False)
        target_dir = Path(a.target or embedded.ensure_target(progress=False)).expanduser()
        target, tok = load_model(target_dir), embedded.load_tokenizer(target_dir)
        draft = None
        if a.mode != "ar":
            if a.draft is None:
                raise ValueError(f"--mode {a.mode} needs a draft: pass --draft DIR (or --mode ar)")
            shared = read_config(Path(a.draft).expanduser()).get("ssd_shared_embedding")
            draft = load_model(a.draft, shared_embedding=target.model.embed_tokens.weight if shared else None)
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) if a.chat else tok.encode(p)
                   for p in a.prompt]
        eos = sorted(set(target.cfg.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
        settings = Settings(mode=a.mode, k=a.k, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            max_new_tokens=a.max_new_tokens, seed=a.seed, eos_token_id=eos)
        make_request(target, prompts, draft, settings)     # every check before decoding starts
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    stream, shown = len(prompts) == 1 and not a.json, [""]

    def on_round(tokens, stats):   # one prompt: its text as rounds are accepted (a split character waits)
        text = tok.decode([t for t in tokens[0] if t not in eos]).rstrip("\ufffd")
        print(text[len(shown[0]):], end="", flush=True)
        shown[0] = text
    if stream:
        print("" if a.chat else a.prompt[0], end="", flush=True)
    result = generate(target, prompts, draft, settings, on_round=on_round if stream else None)  # Ctrl-C ends it
    texts = [tok.decode([t for t in ids if t not in eos]) for ids in result.tokens]
    if a.json:
        print(json.dumps({"prompts": a.prompt, "token_ids": result.tokens, "text": texts,
                          "finish_reasons": result.finish_reasons, "stats": result.summary()}))
    else:
        for p, text in zip(a.prompt, texts):
            print(text[len(shown[0]):] if stream else text if a.chat else p + text)
        stats = result.summary()
        print(f"[{stats['generated_tokens']} tokens, {stats['tokens_per_round']:.2f} tokens/round, "
              f"{a.mode.upper()}" + (f" K={a.k}" if a.mode != "ar" else "") + "]")
    if "interrupted" in result.finish_reasons:
        print("interrupted: the text above is what was generated", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
