"""The fast engine's model layer: a checkpoint re-laid for speed (fused QKV and gate-up matrices, bf16 on the
GPU), the Triton kernels or their PyTorch references (Ops), and preallocated KV caches with the branch buffers of
SSD's speculation tree. graphs.py captures its steps; tp.py splits it over processes."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

import ssd

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def on_device(device):
    """Make `device` the current CUDA device (a no-op on the CPU). Triton launches, CUDA graph capture
    and replay, and new streams all use the *current* device, not the one their tensors live on: the
    draft's work on its own GPU must run under this."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def bucket(batch: int) -> int:
    for b in BUCKETS:
        if batch <= b:
            return b
    return batch


class Ops:
    """The Triton kernels on a GPU; their PyTorch references (same signatures) on a CPU. `triton` names
    kernels to take from Triton whatever `use_triton` says: on a CPU they run in Triton's interpreter
    (TRITON_INTERPRET=1), which is how the tests sample through the real verify and race kernels."""
    NAMES = ("cache_attention", "tree_attention", "add_rmsnorm", "rmsnorm", "rope", "rope_kv_write",
             "sample_exponential_race", "verify", "silu_mul", "skinny_linear")

    def __init__(self, use_triton: bool, triton=()):
        import ssd_kernels
        unknown = set(triton) - set(self.NAMES)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}: choose from {', '.join(self.NAMES)}")
        for name in self.NAMES:
            setattr(self, name, getattr(ssd_kernels, name if use_triton or name in triton else name + "_ref"))
        self.use_triton = use_triton


# ---------------------------------------------------------------------------------------------
# The model, re-laid for speed
# ---------------------------------------------------------------------------------------------

class FastCache:
    """Main KV slots [B, S, Hkv, D] per layer (slot = position) and, for SSD's tree, a chain buffer
    [B, N, K, Hkv, D] per layer: branch i's depth-d key lives at [:, i, d]."""

    def __init__(self, cfg, batch, slots, branches, k, dtype, device):
        shape = (batch, slots, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        tree = (batch, max(branches, 1), max(k, 1), cfg.num_key_value_heads, cfg.head_dim)
        self.k_tree = [torch.zeros(tree, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)] if branches else None
        self.v_tree = [torch.zeros(tree, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)] if branches else None
        self.slots = slots


class FastModel:
    """`linear` picks the implementation of the projections of steps with at most ssd_kernels.SKINNY_MAX_ROWS
    (= 1) rows, i.e. decode at batch 1: "torch" (F.linear, cuBLAS), "triton" (ssd_kernels.skinny_linear) or
    "auto" (on a GPU, per projection, whichever timed faster on this model's weights; see choose_linear).
    Steps with more rows (batches, verify, prefill, the tree) always use F.linear."""

    def __init__(self, model: ssd.Transformer, device, dtype, ops: Ops, linear="torch"):
        cfg = model.cfg
        self.check_supported(cfg)

        def w(t):
            return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()
        layers = []
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
            layers.append(dict(
                ln1=w(block.input_layernorm.weight), ln2=w(block.post_attention_layernorm.weight),
                wqkv=w(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                bqkv=w(torch.cat(biases)) if biases[0] is not None else None,
                wo=w(a.o_proj.weight), bo=w(a.o_proj.bias),
                q_norm=w(a.q_norm.weight) if cfg.qk_norm else None, k_norm=w(a.k_norm.weight) if cfg.qk_norm else None,
                w_gate_up=w(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                b_gate_up=w(torch.cat([m.gate_proj.bias, m.up_proj.bias])) if m.gate_proj.bias is not None else None,
                w_down=w(m.down_proj.weight), b_down=w(m.down_proj.bias)))
        embed = w(model.model.embed_tokens.weight)
        lm_head = embed if cfg.tie_word_embeddings else w(model.lm_head.weight)
        self._setup(cfg, layers, embed, lm_head, w(model.model.norm.weight), device, dtype, ops, linear,
                    sum(p.numel() for p in model.parameters()))

    @classmethod
    def from_weights(cls, cfg, layers, embed, lm_head, norm, device, dtype, ops: Ops, linear="torch", n_params=None):
        """A FastModel from tensors already in its layout on `device` in `dtype` (loader.py streams a checkpoint
        into them): `layers` holds one dict per layer with the keys __init__ builds (ln1, ln2, wqkv, bqkv, wo, bo,
        q_norm, k_norm, w_gate_up, b_gate_up, w_down, b_down; None where the model has no such weight)."""
        cls.check_supported(cfg)
        self = cls.__new__(cls)
        if n_params is None:
            tensors = [embed, norm, *(t for L in layers for t in L.values() if t is not None)]
            n_params = sum(t.numel() for t in tensors) + (0 if lm_head is embed else lm_head.numel())
        self._setup(cfg, layers, embed, lm_head, norm, device, dtype, ops, linear, n_params)
        return self

    @classmethod
    def of(cls, model, device, dtype, ops: Ops, linear="torch"):
        """What the Engine takes as a model: an ssd.Transformer (re-laid here), a FastModel (used as it is), or a
        loader handle with `fast_model(device, dtype, ops, linear)` (loader.Checkpoint: streamed to the device)."""
        if isinstance(model, FastModel):
            return model
        if isinstance(model, ssd.Transformer):
            return cls(model, device, dtype, ops, linear)
        return model.fast_model(device, dtype, ops, linear)

    @staticmethod
    def check_supported(cfg):
        rope_type = (cfg.rope_scaling or {}).get("rope_type", "default")
        if cfg.sliding_window or rope_type == "dynamic" or cfg.partial_rotary_factor != 1.0:
            raise ValueError("ssd_fast.py does not support sliding-window attention, dynamic RoPE or partial "
                             "rotary embeddings yet: use ssd.py for this checkpoint")

    def _setup(self, cfg, layers, embed, lm_head, norm, device, dtype, ops, linear, n_params):
        self.cfg, self.ops, self.device, self.dtype = cfg, ops, device, dtype
        self.layers, self.embed, self.lm_head, self.norm = layers, embed, lm_head, norm
        inv_freq, scale = ssd.rope_inv_freq(cfg)
        # Tree branches run up to 2K positions past the context: room for K up to 512.
        angles = torch.arange(cfg.max_position_embeddings + 1024, dtype=torch.float64)[:, None] * inv_freq
        self.cos = (angles.cos() * scale).float().to(device)
        self.sin = (angles.sin() * scale).float().to(device)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.n_params = n_params
        self.linear, self.linear_times = {}, {}   # projection name -> None (F.linear) or a skinny config
        if linear not in ("torch", "triton", "auto"):
            raise ValueError(f"linear must be torch, triton or auto, got {linear!r}")
        if linear != "torch" and ops.use_triton:
            self.choose_linear(timed=linear == "auto")

    PROJECTIONS = ("wqkv", "wo", "w_gate_up", "w_down", "lm_head")

    def _weights(self, name):
        return [self.lm_head] if name == "lm_head" else [L[name] for L in self.layers]

    def choose_linear(self, timed=True):
        """Per projection: time F.linear against the skinny kernel's configs over every layer's weight and
        keep the faster (timed), or take the skinny kernel's first config (timed=False). Before any graph
        capture: the timing synchronizes."""
        import ssd_kernels
        self.skinny_max_rows = ssd_kernels.SKINNY_MAX_ROWS
        with on_device(self.device):
            for name in self.PROJECTIONS:
                if timed:
                    self.linear[name], self.linear_times[name] = ssd_kernels.skinny_linear_choose(self._weights(name))
                else:
                    self.linear[name] = ssd_kernels.SKINNY_CONFIGS[0]

    def _linear(self, h, name, w, b=None):
        cfg = self.linear.get(name)
        if cfg is not None and h.numel() // h.shape[-1] <= self.skinny_max_rows:
            return self.ops.skinny_linear(h, w, b, cfg)
        return F.linear(h, w, b)

    def new_cache(self, batch, slots, branches=0, k=0) -> FastCache:
        return FastCache(self.cfg, batch, slots, branches, k, self.dtype, self.device)

    def forward(self, tokens, positions, cache: FastCache, tree=None):
        """tokens, positions [B, T]. Without `tree`: the T tokens sit at slots = positions, which
        continue each row's valid prefix (query t sees slots 0 .. positions[b, 0] + t).
        With tree = (trunk_lens [B], branch_glue [B, N], depth): SSD's tree step, one query per branch.
        Returns float32 logits [B, T, V]."""
        with on_device(self.device):
            return self._forward(tokens, positions, cache, tree)

    def _forward(self, tokens, positions, cache, tree):
        cfg, ops = self.cfg, self.ops
        B, T = tokens.shape
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x, resid = self.embed[tokens], None
        live = self._live_slots(positions, tree)
        for i, L in enumerate(self.layers):
            h, resid = ops.add_rmsnorm(x, resid, L["ln1"], cfg.rms_norm_eps)
            qkv = self._linear(h, "wqkv", L["wqkv"], L["bqkv"])
            if tree is None and not cfg.qk_norm:   # decode / verify: RoPE and the cache write in one launch
                q = ops.rope_kv_write(qkv.view(B, T, H + 2 * Hkv, D), positions, self.cos, self.sin,
                                      cache.k[i], cache.v[i], H, Hkv)
                attn = ops.cache_attention(q, *_in_use(cache, i, live), positions[:, 0], self.scale)
            else:
                attn = self._attention_unfused(qkv, positions, cache, tree, i, L, live)
            x = self._linear(attn.reshape(B, T, H * D), "wo", L["wo"], L["bo"])
            h, resid = ops.add_rmsnorm(x, resid, L["ln2"], cfg.rms_norm_eps)
            gate_up = self._linear(h, "w_gate_up", L["w_gate_up"], L["b_gate_up"])
            x = self._linear(ops.silu_mul(gate_up), "w_down", L["w_down"], L["b_down"])
        h, _ = ops.add_rmsnorm(x, resid, self.norm, cfg.rms_norm_eps)
        return self._linear(h, "lm_head", self.lm_head).float()

    def _live_slots(self, positions, tree):
        """How many cache slots the attention reads. On a GPU: all of them (the kernels skip the slots past
        each row's limit, and a CUDA graph needs fixed shapes). On a CPU the PyTorch references cost what they
        read, so they read up to the batch's longest live sequence, rounded up to a power of two (at least 32)
        so that the shapes stay few: the cost follows the tokens in use, not the allocated context."""
        if torch.device(self.device).type != "cpu":
            return None
        last = (tree[0] + tree[1].amax(-1)) if tree is not None else positions[:, -1]
        need = int(last.max()) + 1
        return max(32, 1 << (need - 1).bit_length())

    def _attention_unfused(self, qkv, positions, cache, tree, i, L, live=None):
        """Attention of layer i with the separate RoPE and cache writes: Qwen3's q/k norms come between
        the projection and RoPE, and the tree step writes its keys to the branch buffers."""
        cfg, ops = self.cfg, self.ops
        B, T = positions.shape
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if cfg.qk_norm:
            q, k = ops.rmsnorm(q, L["q_norm"], cfg.rms_norm_eps), ops.rmsnorm(k, L["k_norm"], cfg.rms_norm_eps)
            q, k = ops.rope(q, positions, self.cos, self.sin), ops.rope(k, positions, self.cos, self.sin)
        else:  # q and k are adjacent heads of qkv: rotate both with one launch
            qk = ops.rope(qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D), positions, self.cos, self.sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
        if tree is None:
            rows = torch.arange(B, device=positions.device)[:, None]
            cache.k[i][rows, positions] = k
            cache.v[i][rows, positions] = v
            return ops.cache_attention(q, *_in_use(cache, i, live), positions[:, 0], self.scale)
        trunk_lens, branch_glue, depth = tree
        cache.k_tree[i][:, :, depth] = k
        cache.v_tree[i][:, :, depth] = v
        return ops.tree_attention(q, *_in_use(cache, i, live), trunk_lens, branch_glue, cache.k_tree[i],
                                  cache.v_tree[i], depth, self.scale)

def _in_use(cache, layer, live):
    """Layer's keys and values, cut to the first `live` slots (None: all, as on a GPU)."""
    if live is None:
        return cache.k[layer], cache.v[layer]
    return cache.k[layer][:, :live], cache.v[layer][:, :live]


class _RowCache:
    """One row of a FastCache, as a batch of one (views: writes land in the shared cache)."""

    def __init__(self, cache, row):
        self.k = [t[row:row + 1] for t in cache.k]
        self.v = [t[row:row + 1] for t in cache.v]
        self.k_tree, self.v_tree, self.slots = None, None, cache.slots
        self.parent, self.row = cache, row      # a tensor-parallel target mirrors the slice on its workers
