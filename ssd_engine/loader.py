"""Streaming checkpoint loader for the fast engine: safetensors shards straight into FastModel's layout.

    target = loader.Checkpoint("/models/Llama-3.1-8B-Instruct")
    draft = loader.Checkpoint("/models/Llama-3.2-1B-Instruct", shared_embedding_from=target)
    engine = ssd_fast.Engine(target, draft, tp=2)      # each rank streams only its slice

Why: ssd.load_model (the reference's loader, kept simple for reading) builds the whole model in float32 on the
CPU before the engine casts and moves it: ~32 GB of host memory for an 8B target, and with tensor parallelism
every rank would do it. Here nothing is built on the host. The engine's tensors (fused wqkv = [q; k; v], fused
w_gate_up = [gate; up], norms, biases, embedding, LM head) are allocated on the device in the engine's dtype,
and each source tensor is read on its own: a file is opened (safetensors `safe_open`, which maps it), the
rank's slice taken with `get_slice` (Megatron spans from tp.spans: rows of q/k/v/gate/up, columns of o/down,
rows of the padded vocabulary), copied to the device (the cast to the engine's dtype happens there) and the
file closed again, which unmaps its pages. So the host holds at most one source tensor's pages (plus, when
the destination is the CPU, the model itself). The reference's values are reproduced bit for bit: the cast is
the same (a bf16 checkpoint widened to float32 and cast back is the identity; a float32 one is rounded once).

Before any weight is read, `estimate_memory` says whether the weights and the KV caches fit the GPUs (a pure
function of the configs, dtype, tp, batch, context and the GPU memory).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

import ssd

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
PREFETCH_BYTES = 1 << 30          # how far ahead of the current read the kernel is asked to read (WILLNEED)
SHARED_EMBEDDING_CHUNK = 1 << 26   # elements of the float32 block of target rows projected at once (256 MB)


@dataclasses.dataclass(frozen=True)
class Part:
    """One read: rows and/or columns [start, end) of a source tensor (None = all of that dimension)."""
    name: str
    rows: tuple | None = None
    cols: tuple | None = None


@dataclasses.dataclass
class Dest:
    """One engine tensor: the parts stacked along dim 0, then zero rows up to `rows` (the vocabulary's
    padding for tensor parallelism)."""
    parts: list
    rows: int


class Checkpoint:
    """A Hugging Face safetensors checkpoint directory, indexed (file, shape, dtype of every tensor) from the
    shards' headers without reading any weight. Pass it to ssd_fast.Engine as the target or the draft.

    `shared_embedding_from`: the target's Checkpoint, for a draft whose config has `ssd_shared_embedding`
    (its embedding = the target's embedding @ projectionᵀ, computed in float32 as ssd.load_model does).
    `progress(name, rank, done_bytes, total_bytes, done_tensors, total_tensors)` is called after each read.
    Every load appends {name, rank, world, device, seconds, bytes, tensors, host_rss_before, host_rss_peak} to
    `loads` (the host's resident memory before the load and its peak by the end: the peak since the process
    started, an upper bound on the load's own)."""

    def __init__(self, path, shared_embedding_from: Checkpoint | None = None, progress=None, name="target"):
        from safetensors import SafetensorError, safe_open
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"model path {self.path} does not exist (pass a checkpoint directory)")
        self.cfg = ssd.ModelConfig.from_dict(ssd.read_config(self.path))
        gen_cfg = self.path / "generation_config.json"   # as ssd.load_model: more stop tokens
        if gen_cfg.is_file():
            eos = ssd.read_json(gen_cfg).get("eos_token_id")
            eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
            self.cfg.eos_token_ids = tuple(dict.fromkeys([*self.cfg.eos_token_ids, *eos]))
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{self.path} has no *.safetensors weights (only safetensors checkpoints are "
                                    "supported)")
        self.index = {}     # tensor name (as ssd.Transformer names it) -> (file, key in the file, shape, dtype)
        self.offsets = {}   # tensor name -> its bytes [start, end) in its file
        for f in self.files:
            self.offsets.update({k.removeprefix("language_model."): v for k, v in _data_offsets(f).items()})
            try:
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        sl = st.get_slice(key)
                        self.index[key.removeprefix("language_model.")] = (f, key, tuple(sl.get_shape()),
                                                                           sl.get_dtype())
            except SafetensorError as e:      # a damaged or truncated file
                raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
        if self.cfg.shared_embedding and shared_embedding_from is None:
            raise ValueError(f"{self.path} borrows its embedding from its target: load it as a draft, with the target")
        self.shared_from = shared_embedding_from if self.cfg.shared_embedding else None
        self.progress, self.name, self.loads = progress, name, []
        self._check_shapes()
        self.n_params = sum(math.prod(shape) for shape in self.expected_shapes().values())
        if self.shared_from is not None:      # the draft's embedding is computed, its projection is not kept
            self.n_params += self.cfg.vocab_size * self.cfg.hidden_size - self._numel(self._projection)

    def __getstate__(self):     # sent to tensor-parallel workers: the callback stays behind
        return {**self.__dict__, "progress": None, "loads": []}

    @property
    def _projection(self):
        return self.cfg.shared_embedding["projection"]

    def _numel(self, name):
        return math.prod(self.index[name][2])

    def fingerprint(self) -> list:
        """Which files, of which sizes and times: every tensor-parallel rank must stream the same checkpoint."""
        return [str(self.path.resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]

    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    # --- shapes ---------------------------------------------------------------------------------

    def expected_shapes(self) -> dict:
        """Every tensor the model reads, with the shape config.json implies."""
        c = self.cfg
        d, D, I, V = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
        q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
        out = {"model.norm.weight": (d,)}
        if self.shared_from is None:
            out["model.embed_tokens.weight"] = (V, d)
        else:
            out[self._projection] = (d, self.shared_from.cfg.hidden_size)
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = (V, d)
        for i in range(c.num_hidden_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            out.update({f"model.layers.{i}.input_layernorm.weight": (d,),
                        f"model.layers.{i}.post_attention_layernorm.weight": (d,),
                        a + "q_proj.weight": (q, d), a + "k_proj.weight": (kv, d), a + "v_proj.weight": (kv, d),
                        a + "o_proj.weight": (d, q), m + "gate_proj.weight": (I, d), m + "up_proj.weight": (I, d),
                        m + "down_proj.weight": (d, I)})
            if c.qkv_bias:
                out.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
            if c.o_bias:
                out[a + "o_proj.bias"] = (d,)
            if c.qk_norm:
                out.update({a + "q_norm.weight": (D,), a + "k_norm.weight": (D,)})
            if c.mlp_bias:
                out.update({m + "gate_proj.bias": (I,), m + "up_proj.bias": (I,), m + "down_proj.bias": (d,)})
        return out

    def _check_shapes(self):
        expected = self.expected_shapes()
        missing = [n for n in expected if n not in self.index]
        if missing:
            raise ValueError(f"{self.path}: checkpoint is missing weights {missing[:3]}")
        for n, shape in expected.items():
            if self.index[n][2] != shape:
                raise ValueError(f"{self.path}: {n} has shape {list(self.index[n][2])} but config.json implies "
                                 f"{list(shape)}")
            if self.index[n][3] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{self.path}: {n} is stored as {self.index[n][3]}; the loader reads "
                                 f"{', '.join(SAFETENSORS_DTYPES)}")

    # --- the plan: which slice of which tensor goes where -----------------------------------------

    def plan(self, rank: int = 0, world: int = 1):
        """(local config, {layer index or "": {engine tensor: Dest}}) for rank `rank` of `world`: the Megatron
        spans of tp.spans (world 1: everything)."""
        from ssd_engine import tp
        c = self.cfg
        if world > 1:
            tp.check_divisible(c, world)
        s = tp.spans(c, rank, world)
        local = dataclasses.replace(
            c, num_attention_heads=c.num_attention_heads // world, num_key_value_heads=c.num_key_value_heads // world,
            intermediate_size=s.units[1] - s.units[0], vocab_size=s.vocab[1] - s.vocab[0], shared_embedding=None)

        def rows(name, span=None):
            return Dest([Part(name, span)], (span[1] - span[0]) if span else self.index[name][2][0])

        def stacked(*parts):
            return Dest(list(parts), sum(p.rows[1] - p.rows[0] for p in parts))
        layers = []
        for i in range(c.num_hidden_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            d_model = c.hidden_size
            L = dict(
                ln1=rows(f"model.layers.{i}.input_layernorm.weight"),
                ln2=rows(f"model.layers.{i}.post_attention_layernorm.weight"),
                wqkv=stacked(Part(a + "q_proj.weight", s.q), Part(a + "k_proj.weight", s.kv),
                             Part(a + "v_proj.weight", s.kv)),
                bqkv=stacked(Part(a + "q_proj.bias", s.q), Part(a + "k_proj.bias", s.kv),
                             Part(a + "v_proj.bias", s.kv)) if c.qkv_bias else None,
                wo=Dest([Part(a + "o_proj.weight", cols=s.q)], d_model),       # row-parallel: its columns
                bo=rows(a + "o_proj.bias") if c.o_bias else None,              # whole: added once after the sum
                q_norm=rows(a + "q_norm.weight") if c.qk_norm else None,
                k_norm=rows(a + "k_norm.weight") if c.qk_norm else None,
                w_gate_up=stacked(Part(m + "gate_proj.weight", s.units), Part(m + "up_proj.weight", s.units)),
                b_gate_up=stacked(Part(m + "gate_proj.bias", s.units),
                                  Part(m + "up_proj.bias", s.units)) if c.mlp_bias else None,
                w_down=Dest([Part(m + "down_proj.weight", cols=s.units)], d_model),
                b_down=rows(m + "down_proj.bias") if c.mlp_bias else None)
            layers.append(L)
        vocab = (s.vocab[0], min(s.vocab[1], c.vocab_size))      # real rows; the rest is zero padding
        top = {"norm": rows("model.norm.weight")}
        if self.shared_from is None:
            top["embed"] = Dest([Part("model.embed_tokens.weight", vocab)], s.vocab[1] - s.vocab[0])
        if not c.tie_word_embeddings:
            top["lm_head"] = Dest([Part("lm_head.weight", vocab)], s.vocab[1] - s.vocab[0])
        return local, layers, top

    def read_bytes(self, rank: int = 0, world: int = 1) -> tuple[int, int]:
        """(bytes, tensors) rank reads: the progress bar's totals."""
        _, layers, top = self.plan(rank, world)
        parts = [p for dests in (*layers, top) for dest in dests.values() if dest is not None for p in dest.parts]
        total = sum(self._part_numel(p) * SAFETENSORS_DTYPES[self.index[p.name][3]].itemsize for p in parts)
        count = len(parts)
        if self.shared_from is not None:
            emb = self.shared_from.index["model.embed_tokens.weight"]
            total += math.prod(emb[2]) * SAFETENSORS_DTYPES[emb[3]].itemsize + \
                self._numel(self._projection) * SAFETENSORS_DTYPES[self.index[self._projection][3]].itemsize
            count += 2
        return total, count

    def _part_numel(self, p: Part) -> int:
        shape = list(self.index[p.name][2])
        if p.rows:
            shape[0] = p.rows[1] - p.rows[0]
        if p.cols:
            shape[1] = p.cols[1] - p.cols[0]
        return math.prod(shape)

    # --- loading ----------------------------------------------------------------------------------

    def fast_model(self, device, dtype, ops, linear="torch"):
        """The whole model as a fast_model.FastModel on `device` in `dtype`."""
        return self._load(0, 1, device, dtype, ops, linear)

    def fast_shard(self, rank, world, device, dtype, ops):
        """Tensor-parallel rank `rank`'s share as a FastModel of the local config (tp.TPShard runs it)."""
        return self._load(rank, world, device, dtype, ops, "torch")

    def _load(self, rank, world, device, dtype, ops, linear):
        from ssd_engine import fast_model
        fast_model.FastModel.check_supported(self.cfg)
        device = torch.device(device)
        local, layer_plan, top_plan = self.plan(rank, world)
        rss_before = host_memory()[0]
        t0 = time.perf_counter()
        total_bytes, total_tensors = self.read_bytes(rank, world)
        self._reads = [p for L in (*layer_plan, top_plan) for dest in L.values() if dest is not None
                       for p in dest.parts]          # in the order _build reads them, for the read-ahead
        self._reading, self._advised = 0, 0
        self._done = [0, total_bytes, 0, total_tensors]       # bytes read, of; tensors read, of
        self._rank = rank
        with torch.no_grad():
            layers = [{k: self._build(dest, device, dtype) for k, dest in L.items()} for L in layer_plan]
            top = {k: self._build(dest, device, dtype) for k, dest in top_plan.items()}
            if self.shared_from is not None:
                top["embed"] = self._shared_embedding(device, dtype)
        lm_head = top["embed"] if self.cfg.tie_word_embeddings else top["lm_head"]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.loads.append(dict(name=self.name, rank=rank, world=world, device=str(device),
                               seconds=round(time.perf_counter() - t0, 3), bytes=self._done[0],
                               tensors=self._done[2], host_rss_before=rss_before, host_rss_peak=host_memory()[1]))
        return fast_model.FastModel.from_weights(local, layers, top["embed"], lm_head, top["norm"], device, dtype, ops,
                                               linear, n_params=self.n_params)

    def _build(self, dest: Dest | None, device, dtype):
        if dest is None:
            return None
        tail = list(self.index[dest.parts[0].name][2][1:])
        if dest.parts[0].cols:
            tail[0] = dest.parts[0].cols[1] - dest.parts[0].cols[0]
        out = torch.empty((dest.rows, *tail), dtype=dtype, device=device)
        at = 0
        for part in dest.parts:
            at += self._read_into(out[at:], part)
        if at < dest.rows:
            out[at:].zero_()
        return out

    def _read_into(self, out: torch.Tensor, part: Part, source: Checkpoint | None = None, whole=True) -> int:
        """Copy one slice into out's first rows; returns the rows written. The file is open (mapped) only
        for this one read. `whole=False`: a block of a tensor read in several (counted once, at its end)."""
        from safetensors import safe_open
        file, key, _, _ = (source or self).index[part.name]
        if source is None:
            self._read_ahead()
        with safe_open(str(file), framework="pt") as st:
            sl = st.get_slice(key)
            r = slice(*part.rows) if part.rows else slice(None)
            t = sl[r, slice(*part.cols)] if part.cols else sl[r]
            _copy(out[:t.shape[0]], t)
            n, nbytes = t.shape[0], t.numel() * t.element_size()
            del t
        self._advance(nbytes, int(whole))
        return n

    def _read_ahead(self):
        """posix_fadvise(WILLNEED) the byte ranges of the next reads, up to PREFETCH_BYTES ahead: the kernel
        reads them from disk in large requests while this read is copied (a mapped file alone is read page
        fault by page fault)."""
        i = self._reading
        self._reading += 1
        ahead = 0
        while self._advised < len(self._reads) and (self._advised <= i or ahead < PREFETCH_BYTES):
            part = self._reads[self._advised]
            start, end = self._byte_range(part)
            _will_need(self.index[part.name][0], start, end - start)
            if self._advised > i:
                ahead += end - start
            self._advised += 1

    def _byte_range(self, part: Part) -> tuple[int, int]:
        """The file bytes a read touches: its rows' span (a column slice touches every row)."""
        start, end = self.offsets[part.name]
        if part.rows:
            row = (end - start) // self.index[part.name][2][0]
            return start + part.rows[0] * row, start + part.rows[1] * row
        return start, end

    def _shared_embedding(self, device, dtype):
        """Our draft's embedding (ssd.load_model): the target's embedding @ projectionᵀ in float32, here by
        blocks of target rows streamed to the device."""
        proj = torch.empty(self.index[self._projection][2], dtype=torch.float32, device=device)
        self._read_into(proj, Part(self._projection))
        V, d_t = self.shared_from.index["model.embed_tokens.weight"][2]
        start, end = self.shared_from.offsets["model.embed_tokens.weight"]
        _will_need(self.shared_from.index["model.embed_tokens.weight"][0], start, end - start)
        out = torch.empty((V, proj.shape[0]), dtype=dtype, device=device)
        block = torch.empty((max(1, min(V, SHARED_EMBEDDING_CHUNK // d_t)), d_t), dtype=torch.float32, device=device)
        for a in range(0, V, block.shape[0]):
            b = min(V, a + block.shape[0])
            self._read_into(block, Part("model.embed_tokens.weight", (a, b)), self.shared_from, whole=b == V)
            out[a:b].copy_(block[:b - a] @ proj.T)
        return out

    def _advance(self, nbytes, tensors=1):
        self._done[0] += nbytes
        self._done[2] += tensors
        if self.progress is not None:
            self.progress(self.name, self._rank, *self._done)


def _data_offsets(file: Path) -> dict:
    """{key: (start, end)} byte offsets of each tensor in a safetensors file: an 8-byte little-endian header
    size, the JSON header (data_offsets relative to the end of the header), then the data."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
            return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
                    if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{file} is not a readable safetensors file (its header is not a safetensors "
                             "header)") from None


def _will_need(file: Path, start: int, length: int):
    if hasattr(os, "posix_fadvise") and length > 0:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def host_memory() -> tuple[int | None, int | None]:
    """(resident, peak resident) bytes of this process (Linux /proc; None elsewhere)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None


def _copy(out: torch.Tensor, src: torch.Tensor):
    """src (host, the checkpoint's dtype, possibly a view of the mapped file) into out: to a GPU in the
    checkpoint's dtype, cast there (no float32 copy on the host)."""
    if out.device.type != "cpu" and src.dtype != out.dtype:
        src = src.to(out.device)
    out.copy_(src)


# ---------------------------------------------------------------------------------------------
# Will it fit? (before any weight is read)
# ---------------------------------------------------------------------------------------------

USABLE_FRACTION = 0.90    # of a GPU's memory; the rest: CUDA context, cuBLAS work space, CUDA graph pools, allocator


def weight_bytes(cfg: ssd.ModelConfig, dtype_bytes: int, tp: int = 1) -> int:
    """One rank's weights in the engine's layout: its heads and MLP units, its (padded) vocabulary rows, the
    norms and row-parallel biases whole. With tp = 1, the whole model."""
    d, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * D // tp, cfg.num_key_value_heads * D // tp
    units = -(-I // tp)
    vocab = -(-cfg.vocab_size // tp)
    per_layer = (q + 2 * kv) * d + d * q + 3 * units * d + 2 * d
    per_layer += (q + 2 * kv) * cfg.qkv_bias + d * cfg.o_bias + (2 * units + d) * cfg.mlp_bias + 2 * D * cfg.qk_norm
    embeddings = vocab * d * (1 if cfg.tie_word_embeddings else 2)
    return (cfg.num_hidden_layers * per_layer + embeddings + d) * dtype_bytes


def kv_bytes(cfg: ssd.ModelConfig, dtype_bytes: int, tp: int, batch: int, slots: int, branches: int = 0,
             k: int = 0) -> int:
    """One rank's KV cache (fast_model.FastCache): keys and values of its KV heads, every layer, `slots` per row,
    and SSD's tree buffers (branches x K) for a draft."""
    per_slot = 2 * cfg.num_hidden_layers * (cfg.num_key_value_heads // tp) * cfg.head_dim * dtype_bytes
    return per_slot * batch * (slots + (max(branches, 1) * max(k, 1) if branches else 0))


def bucket(batch: int) -> int:
    from ssd_engine import fast_model
    return fast_model.bucket(batch)


@dataclasses.dataclass
class MemoryEstimate:
    per_gpu: dict            # GPU label -> {"weights", "kv", "work", "total"} in bytes
    gpu_bytes: int           # each GPU's memory (free when measured)
    usable: int
    fits: bool
    message: str             # the error to print when it does not fit, else a one-line summary


def _gb(n):
    return f"{n / 1e9:.1f} GB"


def estimate_memory(target: ssd.ModelConfig, dtype_bytes: int, tp: int, batch: int, context: int, gpu_bytes: int,
                    draft: ssd.ModelConfig | None = None, draft_shares: bool = True, k: int = 4,
                    prompt_tokens: int | None = None, branches: int | None = None, advise=True) -> MemoryEstimate:
    """Per-GPU memory of the fast engine: weights (weight_bytes), KV caches for the batch's bucket and the
    context plus K's room (kv_bytes), and the prefill's work space (float32 logits of every prompt position,
    the layer activations); the draft on the target's first GPU when `draft_shares`, else on its own. A GPU may
    use USABLE_FRACTION of `gpu_bytes`. A pure function of its arguments (testable without a GPU)."""
    B = bucket(batch)
    slots = context + 2 * k + 2
    T = prompt_tokens if prompt_tokens is not None else context

    def work(cfg, world):
        logits = B * T * cfg.vocab_size * (4 + dtype_bytes)
        width = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim // world + \
            2 * -(-cfg.intermediate_size // world) + 3 * cfg.hidden_size
        return logits + 2 * B * T * width * dtype_bytes

    def load(cfg, world, tree):
        n_branches = (branches if branches is not None else 4 * (k + 1)) if tree else 0
        return dict(weights=weight_bytes(cfg, dtype_bytes, world),
                    kv=kv_bytes(cfg, dtype_bytes, world, B, slots, n_branches, k), work=work(cfg, world))
    per_gpu = {f"target rank {r}" if tp > 1 else "target": load(target, tp, False) for r in range(tp)}
    if draft is not None:
        d = load(draft, 1, True)
        if draft_shares:
            first = next(iter(per_gpu))
            per_gpu[first] = {key: per_gpu[first][key] + d[key] for key in d}
            per_gpu = {(f"{first} + draft" if name == first else name): v for name, v in per_gpu.items()}
        else:
            per_gpu["draft"] = d
    for v in per_gpu.values():
        v["total"] = v["weights"] + v["kv"] + v["work"]
    usable = int(gpu_bytes * USABLE_FRACTION)
    worst_name, worst = max(per_gpu.items(), key=lambda kv: kv[1]["total"])
    fits = worst["total"] <= usable
    what = (f"{worst_name}: {_gb(worst['weights'])} of weights + {_gb(worst['kv'])} of KV cache (batch {batch}, "
            f"context {context}) + {_gb(worst['work'])} of work space = {_gb(worst['total'])} per GPU")
    if fits:
        return MemoryEstimate(per_gpu, gpu_bytes, usable, True, f"memory check: {what}, of {_gb(usable)} usable")
    if not advise:
        return MemoryEstimate(per_gpu, gpu_bytes, usable, False, what)
    return MemoryEstimate(per_gpu, gpu_bytes, usable, False, _advice(
        what, usable, gpu_bytes, target, dtype_bytes, tp, batch, context, draft, draft_shares, k, prompt_tokens,
        branches, worst_name))


def _advice(what, usable, gpu_bytes, target, dtype_bytes, tp, batch, context, draft, draft_shares, k, prompt_tokens,
            branches, worst_name):
    """What to change: a larger --tp that divides the heads, a shorter --max-context, fewer prompts."""
    def fits(**kw):
        args = dict(tp=tp, batch=batch, context=context)
        args.update(kw)
        return estimate_memory(target, dtype_bytes, args["tp"], args["batch"], args["context"], gpu_bytes, draft,
                               draft_shares, k, prompt_tokens, branches, advise=False).fits
    hints = []
    if "draft" in worst_name and draft is not None and draft_shares:
        hints.append("give the draft its own GPU (--gpus)")
    for n in range(tp + 1, target.num_key_value_heads + 1):
        if target.num_attention_heads % n == 0 and target.num_key_value_heads % n == 0 and fits(tp=n):
            per = estimate_memory(target, dtype_bytes, n, batch, context, gpu_bytes, draft, draft_shares, k,
                                  prompt_tokens, branches, advise=False)
            hints.append(f"--tp {n} ({_gb(max(v['total'] for v in per.per_gpu.values()))} per GPU)")
            break
    shortest = (prompt_tokens or 1) + 1
    if context > shortest and fits(context=shortest):
        lo, hi = shortest, context        # the longest context that fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(context=mid) else (lo, mid)
        hints.append(f"--max-context {lo} or less")
    if batch > 1 and fits(batch=1):
        best = max(b for b in range(1, batch) if fits(batch=b))
        hints.append(f"at most {best} prompt{'s' if best > 1 else ''} at once")
    if dtype_bytes > 2:
        hints.append("--dtype bfloat16")
    hint = ", or ".join(hints) if hints else "a GPU with more memory (no --tp, --max-context or batch size fits)"
    return (f"the model does not fit in GPU memory: {what}, but a GPU here has {_gb(gpu_bytes)} of which "
            f"{_gb(usable)} ({USABLE_FRACTION:.0%}) is usable. Try: {hint}")


def dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
