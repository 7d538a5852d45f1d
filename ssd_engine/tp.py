"""Tensor parallelism for the fast engine's target: one model split over N processes (one GPU each).

    Engine(loader.Checkpoint(path), draft, tp=2)                        # each rank streams its own slices
    Engine(target, draft, tp=2, tp_loader=(ssd.load_model, (path,)))   # each rank loads the whole model, slices

Why: a target too large or too slow for one GPU (the paper runs a 70B target on 4 GPUs) is split so that
each GPU reads 1/N of the weights per token. The split is Megatron-LM's (Shoeybi et al. 2019, "Megatron-LM:
Training Multi-Billion Parameter Language Models Using Model Parallelism", section 3):

- a column-parallel linear splits its OUTPUT features: each rank computes its slice from the full input,
  no communication. The fused QKV projection is split by attention heads (rank r gets H/N query heads and
  Hkv/N KV heads, kept in the fused [q; k; v] layout), gate_up by MLP units (rank r gets its slice of gate
  AND of up, fused): attention and the SwiGLU product then run on local data only.
- a row-parallel linear splits its INPUT features: each rank multiplies its slice and the partial sums
  are added by an all-reduce. o_proj (over heads) and down_proj (over units) are row-parallel, so a
  transformer layer costs two all-reduces. Their biases are added once, after the all-reduce.
- the vocabulary is split too: rank r holds rows [r V/N, (r+1) V/N) of the embedding (V padded up to a
  multiple of N with zero rows); a lookup is masked to the rank's rows and all-reduced (exactly one rank
  contributes a non-zero row, so the sum is exact). The LM head computes each rank's slice of the
  logits, all-gathered into the full [B, T, V] float32 logits (padding dropped).

Each rank's share is itself a small transformer (fewer heads, fewer MLP units, a slice of the
vocabulary): `shard_model` builds it as an ssd.Transformer, `fast_model.FastModel` lays it out (fused
weights on the device) and `TPShard` runs the forward with the collectives between the local pieces.

Loading. Given a loader.Checkpoint, every rank (rank 0 and the workers, at the same time) streams only its
own slices of each tensor from the safetensors files straight to its GPU (loader.py, with `spans` below), and
the workers report their progress to rank 0. Given an ssd.Transformer, each worker rebuilds the whole model
with `tp_loader` and keeps its shard (`shard_model`): simple, but every rank holds the whole model on the host.

Processes. Rank 0 is the Engine's own process: it owns the draft, sampling, verify and the speculation
cache. Ranks 1..N-1 are worker processes it spawns; each builds the target itself with a picklable loader
(`(function, args)` returning an ssd.Transformer), keeps its shard and mirrors every target operation
rank 0 performs. Rank 0 tells them what to do with small headers over a pipe (no tensor data):

    ("new_cache", cache_id, batch, slots, branches, k)   allocate a KV cache (local KV heads only)
    ("forward", cache_ref, shape)                        one eager forward
    ("capture", graph_id, cache_ref, shape)              warm up and capture one forward as a CUDA graph
    ("replay", graph_id)                                 replay it
    ("stop",)                                            exit

cache_ref = (cache_id, row): row None for the whole cache, or one row (fast_model._RowCache, continuous
batching's admit). The token ids and positions themselves are broadcast from rank 0 INSIDE the forward,
so in a CUDA graph the broadcast is captured too: a replay needs the header only, and rank 0 never waits
for the workers on the host (a header is a pipe write). Rank 0's graphs hold the verify / sampling around
the forward as well; the workers' graphs hold the forward alone: the collectives, which must match one
for one, are the same and in the same order. A graph is captured by graphs.Graphed on both sides, so
the warm-up runs and the capture line up. Nothing can wait in a circle: rank 0 sends every header before it
launches the collectives the header announces, and a worker's host waits for nothing but rank 0's headers,
so when a host does wait on the GPUs (rank 0 once a round; any rank when a capture begins, for its eager
collectives to finish) it waits for collectives every rank has launched or will launch without waiting.
This holds with the draft's thread capturing or replaying next to the main thread (Graphed's lock) too.

On a CPU (the tests) the same code runs with the gloo backend in float32 with the PyTorch reference ops
and no graphs; on GPUs with NCCL, rank r on cuda:(first + r), CUDA graphs on.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import gc
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ssd
from ssd_engine import fast_model, graphs

# NVLink multicast (NVLS) brings nothing to all-reduces of a few KB, and shared machines may require it off:
# off unless the environment says otherwise.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

LOAD_TIMEOUT_S = 1800      # a worker building a 7B target (loading, expansion) may take minutes
STOP_TIMEOUT_S = 20        # a worker that has not exited this long after "stop" is killed
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ---------------------------------------------------------------------------------------------
# Sharding (Megatron-LM's column / row / vocabulary parallel split)
# ---------------------------------------------------------------------------------------------

def check_divisible(cfg: ssd.ModelConfig, world: int) -> None:
    """Every rank gets whole attention heads, and its query heads' KV heads with them."""
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if world < 1:
        raise ValueError(f"tensor parallelism needs at least 1 GPU, got tp={world}")
    if H % world or Hkv % world:
        works = [n for n in range(1, Hkv + 1) if H % n == 0 and Hkv % n == 0]
        raise ValueError(f"tp={world} cannot split this target: each GPU must hold whole attention heads, and its "
                         f"{H} query heads and {Hkv} KV heads are not both divisible by {world}; tp sizes that "
                         f"work: {', '.join(map(str, works))}")
    if cfg.intermediate_size < world:
        raise ValueError(f"tp={world} is more GPUs than the target has MLP units ({cfg.intermediate_size})")


@dataclasses.dataclass
class Spans:
    """Rank r's share of each split dimension, as [start, end) ranges."""
    q: tuple           # rows of q_proj: its query heads x head_dim
    kv: tuple          # rows of k_proj and v_proj: its KV heads x head_dim
    units: tuple       # MLP units (rows of gate and up, columns of down); sizes differ by at most one
    vocab: tuple       # vocabulary rows, in the padded vocabulary
    vocab_size: int    # the real vocabulary


def spans(cfg: ssd.ModelConfig, rank: int, world: int) -> Spans:
    D = cfg.head_dim
    hq, hkv = cfg.num_attention_heads // world * D, cfg.num_key_value_heads // world * D
    I = cfg.intermediate_size
    local_vocab = -(-cfg.vocab_size // world)          # ceil(V / N): V padded to a multiple of N
    return Spans(q=(rank * hq, (rank + 1) * hq), kv=(rank * hkv, (rank + 1) * hkv),
                 units=(I * rank // world, I * (rank + 1) // world),
                 vocab=(rank * local_vocab, (rank + 1) * local_vocab), vocab_size=cfg.vocab_size)


# Which dimension of which weight is split. Column-parallel: output rows (and the bias with them).
# Row-parallel: input columns; the bias stays whole (added once, after the all-reduce).
COLUMN_PARALLEL = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "units", "up_proj": "units"}
ROW_PARALLEL = {"o_proj": "q", "down_proj": "units"}
VOCAB_PARALLEL = ("embed_tokens", "lm_head")


def shard_parameter(name: str, p: torch.Tensor, s: Spans) -> torch.Tensor:
    """Rank's slice of one parameter of an ssd.Transformer (a copy: the full tensor can be freed)."""
    module, kind = name.split(".")[-2:]
    if module in COLUMN_PARALLEL:
        a, b = getattr(s, COLUMN_PARALLEL[module])
        return p[a:b].clone()
    if module in ROW_PARALLEL:
        if kind == "bias":
            return p.clone()
        a, b = getattr(s, ROW_PARALLEL[module])
        return p[:, a:b].clone()
    if module in VOCAB_PARALLEL:        # rows past the real vocabulary are zero padding
        a, b = s.vocab
        shard = p.new_zeros(b - a, p.shape[1])
        real = p[a:min(b, s.vocab_size)]
        shard[:real.shape[0]] = real
        return shard
    return p.clone()                    # RMSNorm weights (per hidden unit or per head_dim): replicated


def shard_model(model: ssd.Transformer, rank: int, world: int) -> ssd.Transformer:
    """Rank's share of the target as a smaller ssd.Transformer: H/N query heads, Hkv/N KV heads, its MLP
    units and a 1/N slice of the (padded) vocabulary; row-parallel biases whole."""
    cfg = model.cfg
    check_divisible(cfg, world)
    s = spans(cfg, rank, world)
    local_cfg = dataclasses.replace(
        cfg, num_attention_heads=cfg.num_attention_heads // world, num_key_value_heads=cfg.num_key_value_heads // world,
        intermediate_size=s.units[1] - s.units[0], vocab_size=s.vocab[1] - s.vocab[0], shared_embedding=None)
    with torch.no_grad():
        state = {name: shard_parameter(name, p.detach(), s) for name, p in model.named_parameters()}
    with torch.device("meta"):
        local = ssd.Transformer(local_cfg)
    local.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        local.lm_head.weight = local.model.embed_tokens.weight
    local.inv_freq, local.attn_scale = ssd.rope_inv_freq(local_cfg)
    return local.eval()


def fingerprint(model: ssd.Transformer, dtype) -> list:
    """A few weights of every parameter, rounded to the engine's dtype: every rank must build the same target."""
    out = []
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            # integer arithmetic: a float32 linspace rounds n - 1 up to n past 2^24 elements
            idx = torch.arange(8, device=flat.device) * (flat.numel() - 1) // 7
            out += flat[idx].to(dtype).double().tolist()
    return out


# ---------------------------------------------------------------------------------------------
# One rank's share of the target, and the forward with the collectives
# ---------------------------------------------------------------------------------------------

class TPShard:
    """Rank `rank` of `world`: the local weights (a FastModel of the rank's share) and the forward of the
    whole model, whose collectives every rank runs in the same order. `cfg` is the FULL config."""

    def __init__(self, model, rank: int, world: int, device, dtype, ops: fast_model.Ops, local=None):
        """`model`: an ssd.Transformer to shard here, or a loader.Checkpoint whose rank's share `local` (a FastModel)
        was streamed already."""
        self.cfg, self.rank, self.world = model.cfg, rank, world
        self.device, self.dtype, self.ops = torch.device(device), dtype, ops
        if local is None:
            self.n_params = sum(p.numel() for p in model.parameters())
            local = fast_model.FastModel(shard_model(model, rank, world), self.device, dtype, ops)
        else:
            self.n_params = model.n_params
        self.local = local
        # Row-parallel biases leave the local linears: added once, to the all-reduced sum.
        self.row_bias = [(L.pop("bo"), L.pop("b_down")) for L in self.local.layers]
        for L in self.local.layers:
            L["bo"] = L["b_down"] = None
        s = spans(self.cfg, rank, world)
        self.vocab_start, self.vocab_local = s.vocab[0], s.vocab[1] - s.vocab[0]

    def new_cache(self, batch, slots, branches=0, k=0) -> fast_model.FastCache:
        return self.local.new_cache(batch, slots, branches, k)      # the local KV heads only

    # --- the collectives ------------------------------------------------------------------------

    def _share_inputs(self, shape, tokens=None, positions=None):
        """Rank 0's token ids and positions, on every rank (captured in a CUDA graph like the rest)."""
        if self.rank == 0:
            both = torch.stack([tokens.long(), positions.long()])
        else:
            both = torch.empty((2, *shape), dtype=torch.long, device=self.device)
        dist.broadcast(both, src=0)
        return both[0], both[1]

    def _embed(self, tokens):
        """Vocabulary-parallel lookup: the rank's rows, zeros for the others' tokens, summed over ranks."""
        local = tokens - self.vocab_start
        mine = (local >= 0) & (local < self.vocab_local)
        x = self.local.embed[local.clamp(0, self.vocab_local - 1)].masked_fill(~mine[..., None], 0)
        dist.all_reduce(x)
        return x

    @staticmethod
    def _row_parallel_sum(partial, bias):
        """The output of a row-parallel linear: the sum of the ranks' partial products, plus the bias once."""
        dist.all_reduce(partial)
        return partial if bias is None else partial + bias

    def _logits(self, h):
        """Vocabulary-parallel LM head: each rank's slice of the logits, gathered in rank order."""
        part = F.linear(h, self.local.lm_head).contiguous()          # [B, T, V/N], in the model's dtype
        B, T, Vl = part.shape
        parts = torch.empty((self.world * B, T, Vl), dtype=part.dtype, device=part.device)   # ranks along dim 0
        _all_gather_into(parts, part)
        full = parts.view(self.world, B, T, Vl).permute(1, 2, 0, 3).reshape(B, T, self.world * Vl)
        return full[..., :self.cfg.vocab_size].float().contiguous()

    # --- the forward: fast_model.FastModel.forward with the collectives (keep the two in step) ---------

    def _forward(self, cache, shape, tokens=None, positions=None):
        """Float32 logits [B, T, V]. Rank 0 passes the tokens and positions; the workers only their shape."""
        tokens, positions = self._share_inputs(shape, tokens, positions)
        m, cfg, ops = self.local, self.cfg, self.ops
        B, T = tokens.shape
        H, Hkv, D = m.cfg.num_attention_heads, m.cfg.num_key_value_heads, cfg.head_dim     # local heads
        x, resid = self._embed(tokens), None
        live = m._live_slots(positions, None)         # on a CPU the slots in use only (None on a GPU: all)
        for i, L in enumerate(m.layers):
            h, resid = ops.add_rmsnorm(x, resid, L["ln1"], cfg.rms_norm_eps)
            qkv = F.linear(h, L["wqkv"], L["bqkv"])                   # column-parallel: the rank's heads
            if not cfg.qk_norm:   # RoPE and the cache write in one launch, as in FastModel
                q = ops.rope_kv_write(qkv.view(B, T, H + 2 * Hkv, D), positions, m.cos, m.sin,
                                      cache.k[i], cache.v[i], H, Hkv)
                attn = ops.cache_attention(q, *fast_model._in_use(cache, i, live), positions[:, 0], m.scale)
            else:                 # the local FastModel's path over the rank's heads
                attn = m._attention_unfused(qkv, positions, cache, None, i, L, live)
            bo, b_down = self.row_bias[i]
            x = self._row_parallel_sum(F.linear(attn.reshape(B, T, H * D), L["wo"]), bo)
            h, resid = ops.add_rmsnorm(x, resid, L["ln2"], cfg.rms_norm_eps)
            units = ops.silu_mul(F.linear(h, L["w_gate_up"], L["b_gate_up"]))     # column-parallel
            x = self._row_parallel_sum(F.linear(units, L["w_down"]), b_down)
        h, _ = ops.add_rmsnorm(x, resid, m.norm, cfg.rms_norm_eps)
        return self._logits(h)


# ---------------------------------------------------------------------------------------------
# Rank 0: the target the Engine sees
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Capture:
    graph_id: int
    calls: int = 0        # times Graphed ran the step (warm-ups and the capture)
    forwards: int = 0     # target forwards seen meanwhile


class TPTarget(TPShard):
    """Rank 0's shard plus the workers holding the others. Used by ssd_fast.Engine in place of FastModel
    for the target: same `forward(tokens, positions, cache, tree=None)` and `new_cache(...)`, `cfg` the full
    config. Every call is mirrored on the workers (see the module docstring); `close()` stops them."""

    def __init__(self, target, world: int, loader=None, device="cpu", dtype=torch.float32,
                 ops: fast_model.Ops | None = None, cuda_graphs=True, log=print):
        """`target`: an ssd.Transformer (every worker rebuilds it with `loader`, then keeps its shard), or a
        loader.Checkpoint (every rank, this one included, streams only its own slices, all at once)."""
        device = torch.device(device)
        streamed = _is_streamed(target)
        on_gpu = device.type == "cuda"
        if on_gpu and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        check_divisible(target.cfg, world)
        first = (device.index or 0) if on_gpu else 0
        if on_gpu and first + world > torch.cuda.device_count():
            raise ValueError(f"tp={world} from {device} on needs cuda:{first}..cuda:{first + world - 1}, but only "
                             f"{torch.cuda.device_count()} GPU(s) are visible")
        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed group (another tensor-parallel engine?): "
                               "close() it first; one tensor-parallel target per process")
        if streamed:
            loader = target
        elif loader is None:
            if target.device.type != "cpu":
                raise ValueError("tp > 1 needs tp_loader=(function, args) building the target in each worker when "
                                 "the target given is not on the CPU")
            loader = (_the_model, (target,))     # the CPU weights travel through shared memory
        self.log, self.use_graphs, self.device = log, cuda_graphs and on_gpu, device
        self.closed, self.failure, self._watcher = False, None, None
        self._capture, self._graph_count, self._cache_count = None, 0, 0
        self._runners = weakref.WeakSet()
        self._workers, self._commands, self._reports, self._pending = [], [], [], {}
        self._progress = getattr(target, "progress", None) if streamed else None
        self._rendezvous_dir = tempfile.mkdtemp(prefix="ssd-tp-")
        backend = "nccl" if on_gpu else "gloo"
        timeout = datetime.timedelta(seconds=600 if on_gpu else 120)
        init = f"file://{os.path.join(self._rendezvous_dir, 'rendezvous')}"
        if on_gpu:
            torch.cuda.set_device(device)
        atexit.register(_close_at_exit, weakref.ref(self))
        ops = ops or fast_model.Ops(use_triton=on_gpu)
        local = None
        try:
            own_print = target.fingerprint() if streamed else fingerprint(target, dtype)
            ctx = mp.get_context("spawn")
            for rank in range(1, world):
                commands_in, commands_out = ctx.Pipe(duplex=False)
                reports_in, reports_out = ctx.Pipe(duplex=False)
                where = f"cuda:{first + rank}" if on_gpu else "cpu"
                proc = ctx.Process(target=_worker_main, name=f"ssd-tp-rank{rank}", daemon=True,
                                   args=(rank, world, init, backend, timeout, loader, where, dtype, self.use_graphs,
                                         commands_in, reports_out))
                proc.start()
                commands_in.close(), reports_out.close()     # the child's ends: EOF when the other side dies
                self._workers.append(proc), self._commands.append(commands_out), self._reports.append(reports_in)
            if streamed:     # rank 0 streams its slices while the workers stream theirs
                target.progress = self._progress_and_workers
                try:
                    local = target.fast_shard(0, world, device, dtype, ops)
                finally:
                    target.progress = self._progress
            for rank, (print_, *stats) in enumerate(self._wait_for("loaded"), start=1):
                if print_ != own_print:
                    raise ValueError(f"tp rank {rank}'s loader built another target than the one given to the "
                                     "Engine (its weights differ): tp_loader must rebuild exactly the same model")
                if streamed:
                    target.loads.extend(stats)
            dist.init_process_group(backend, init_method=init, rank=0, world_size=world, timeout=timeout,
                                    **({"device_id": device} if on_gpu else {}))
            super().__init__(target, 0, world, device, dtype, ops, local=local)
            self._wait_for("ready")
            _check_link(self.device, world)
        except BaseException:
            self.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name="ssd-tp-watch", daemon=True)
        self._watcher.start()
        log(f"ssd_fast: tensor-parallel target over {world} {'GPUs' if on_gpu else 'processes'} "
            f"({backend}{', CUDA graphs' if self.use_graphs else ''}), rank 0 on {device}")

    # --- what the Engine calls -------------------------------------------------------------------

    def new_cache(self, batch, slots, branches=0, k=0) -> fast_model.FastCache:
        cache = super().new_cache(batch, slots, branches, k)
        cache.tp_id = self._cache_count
        self._cache_count += 1
        self._send(("new_cache", cache.tp_id, batch, slots, branches, k))
        return cache

    def forward(self, tokens, positions, cache, tree=None):
        if tree is not None:
            raise NotImplementedError("the tensor-parallel target runs no speculation tree (the draft does)")
        shape, ref = tuple(tokens.shape), self._cache_ref(cache)
        capture = self._capture
        if capture is None:
            self._send(("forward", ref, shape))
        elif capture.forwards == 0:   # the first call of Graphed's warm-ups: the workers run the same sequence
            self._send(("capture", capture.graph_id, ref, shape))
        if capture is not None:
            capture.forwards += 1
        with fast_model.on_device(self.device):      # Triton launches and streams use the current device
            return self._forward(cache, shape, tokens, positions)

    def capture(self, fn, inputs: dict, pool, generators=(), state=()) -> graphs.Graphed:
        """graphs.Graphed(fn, inputs, pool, generators, state) with the workers capturing the same forward alongside."""
        capture = _Capture(self._graph_count)
        self._graph_count += 1

        def counted(**kw):
            capture.calls += 1
            return fn(**kw)
        self._capture = capture
        try:
            graph = graphs.Graphed(counted, inputs, pool, generators, state)
        finally:
            self._capture = None
        if capture.forwards not in (0, capture.calls):
            raise RuntimeError(f"a captured step must run the target forward exactly once (it ran {capture.forwards} "
                               f"in {capture.calls} calls): the workers mirror one forward per step")
        graph.tp_graph_id = capture.graph_id if capture.forwards else None   # no forward: nothing to mirror
        return graph

    def replay(self, graph: graphs.Graphed, inputs: dict):
        if graph.tp_graph_id is not None:
            self._send(("replay", graph.tp_graph_id))
        return graph(**inputs)

    # --- the workers -----------------------------------------------------------------------------

    def _cache_ref(self, cache):
        if hasattr(cache, "tp_id"):
            return cache.tp_id, None
        parent = getattr(cache, "parent", None)     # fast_model._RowCache: one row of a cache
        if parent is None or not hasattr(parent, "tp_id"):
            raise ValueError("the tensor-parallel target runs on caches made by its new_cache (or rows of them)")
        return parent.tp_id, cache.row

    def _send(self, header):
        """A header to every worker: a pipe write, which never waits for the GPU."""
        if self.closed:
            raise RuntimeError("the tensor-parallel target is closed")
        if self.failure:
            raise RuntimeError(f"tensor-parallel target: {self.failure}")
        for rank, conn in enumerate(self._commands, start=1):
            try:
                conn.send(header)
            except OSError as e:
                self.failure = self.failure or f"worker rank {rank} is gone ({type(e).__name__})"
                raise RuntimeError(f"tensor-parallel target: {self.failure}") from e

    def _wait_for(self, what: str) -> list:
        """Each worker's next report, which must be `what`; a worker's error or death is raised here."""
        out = []
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        for rank, (proc, conn) in enumerate(zip(self._workers, self._reports), start=1):
            message = self._pending.pop(rank, None)
            while message is None:
                while not conn.poll(0.2):
                    if not proc.is_alive():
                        raise RuntimeError(f"tensor-parallel worker rank {rank} exited (code {proc.exitcode}) before "
                                           f"it was {what}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"tensor-parallel worker rank {rank} was not {what} after {LOAD_TIMEOUT_S} s")
                try:
                    message = conn.recv()
                except EOFError:
                    raise RuntimeError(f"tensor-parallel worker rank {rank} exited before it was {what}") from None
                if message[0] == "progress":       # a streaming worker's loading progress
                    if self._progress is not None:
                        self._progress(*message[1:])
                    message = None
            if message[0] == "error":
                raise RuntimeError(f"tensor-parallel worker rank {rank} failed:\n{message[1]}")
            if message[0] != what:
                raise RuntimeError(f"tensor-parallel worker rank {rank}: expected {what!r}, got {message[0]!r}")
            out.append(message[1:])
        return out

    def _progress_and_workers(self, *progress):
        """Rank 0's loading progress, and the workers' reported meanwhile (their other reports wait in _pending)."""
        if self._progress is not None:
            self._progress(*progress)
        for rank, conn in enumerate(self._reports, start=1):
            while rank not in self._pending and conn.poll(0):
                try:
                    message = conn.recv()
                except EOFError:
                    break
                if message[0] != "progress":
                    self._pending[rank] = message
                elif self._progress is not None:
                    self._progress(*message[1:])

    def _watch(self):
        """Reports a worker's error or death while the engine runs (the next header send raises it)."""
        waiting = {conn: rank for rank, conn in enumerate(self._reports, start=1)}
        waiting.update({proc.sentinel: rank for rank, proc in enumerate(self._workers, start=1)})
        while waiting and not self.closed:
            try:
                ready_list = multiprocessing.connection.wait(list(waiting), timeout=1.0)
            except (OSError, ValueError):     # closed under us by close()
                return
            for ready in ready_list:
                rank = waiting.pop(ready)
                if self.closed:
                    return
                if isinstance(ready, int):
                    self._fail(f"worker rank {rank} exited (code {self._workers[rank - 1].exitcode})")
                    continue
                try:
                    message = ready.recv()
                except (EOFError, OSError):
                    continue
                if message[0] == "error":
                    self._fail(f"worker rank {rank} failed:\n{message[1]}")
                waiting[ready] = rank

    def _fail(self, message):
        if self.failure is None:
            self.failure = message
            self.log(f"ssd_fast: tensor-parallel {message}")

    def close(self):
        """Stop the workers and leave the process group (idempotent). The engine is unusable afterwards."""
        if self.closed:
            return
        grouped = dist.is_initialized()      # else the workers wait in the rendezvous: no use waiting for them
        if self.device.type == "cuda" and grouped:
            try:   # every collective in flight has finished on all ranks once rank 0's have
                torch.cuda.synchronize(self.device)
            except Exception:
                pass
        self.closed = True
        for runner in list(self._runners):    # a graph holding NCCL work can keep the communicator alive
            runner.graphs.clear()
        gc.collect()
        for conn in self._commands:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        _destroy_group()
        if self._watcher is not None:
            self._watcher.join(5)
        for proc in self._workers:
            proc.join(STOP_TIMEOUT_S if grouped else 1)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._commands + self._reports:
            conn.close()
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)


class TPRunner(graphs.Runner):
    """Rank 0's Runner: a captured target step is captured on the workers too, a replay replayed there (an eager
    forward sends its own header)."""

    def __init__(self, model: TPTarget, use_graphs: bool):
        super().__init__(model, use_graphs)
        model._runners.add(self)

    def _capture(self, fn, inputs, state):
        return self.model.capture(fn, inputs, self.pool, self.generators, state)

    def _replay(self, graph, inputs):
        return self.model.replay(graph, inputs)


def choose_draft_device(device, world, log):
    """The draft's device next to a target on `world` GPUs from `device` on: the next GPU when there is one,
    else rank 0's GPU (said once). On a CPU, the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    nxt = (device.index or 0) + world
    if nxt < torch.cuda.device_count():
        return torch.device("cuda", nxt)
    log(f"ssd_fast: the target uses every GPU from {device} on (tp={world}); the draft shares {device} with "
        "rank 0's shard")
    return device


def load_checkpoint(path: str) -> ssd.Transformer:
    """A picklable loader for a checkpoint directory: the whole target on the CPU in float32 (the CLI now
    passes a loader.Checkpoint instead, whose ranks read only their slices)."""
    return ssd.load_model(path, dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------------------------------------
# Ranks 1..N-1: the worker processes
# ---------------------------------------------------------------------------------------------

def _worker_main(rank, world, init, backend, timeout, loader, where, dtype, use_graphs, commands, reports):
    """Build the target with `loader`, keep rank's shard, then mirror rank 0's commands until "stop" (or until
    rank 0 is gone: the command pipe then reads EOF). Errors go back to rank 0 as ("error", traceback)."""
    code = 1
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        device = torch.device(where)
        if device.type == "cuda":
            torch.cuda.set_device(device)      # a loader may build on torch.cuda.current_device()
        else:
            torch.set_num_threads(1)           # ranks share the CPU's cores
        with torch.no_grad():
            ops, local = fast_model.Ops(use_triton=device.type == "cuda"), None
            if _is_streamed(loader):     # only this rank's slices, straight to its device
                model = loader
                model.progress = lambda *progress: reports.send(("progress", *progress))
                local = model.fast_shard(rank, world, device, dtype, ops)
                reports.send(("loaded", model.fingerprint(), model.loads[-1]))
            else:
                model = _call(loader)
                reports.send(("loaded", fingerprint(model, dtype)))
            dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timeout,
                                    **({"device_id": device} if device.type == "cuda" else {}))
            shard = TPShard(model, rank, world, device, dtype, ops, local=local)
            del model, local
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            reports.send(("ready",))
            _check_link(device, world)
            captured = _serve(shard, commands, use_graphs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            captured.clear()
            gc.collect()
            _destroy_group()
            code = 0
    except EOFError:        # rank 0 is gone
        pass
    except BaseException:
        try:
            reports.send(("error", traceback.format_exc()))
        except OSError:
            pass
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)          # no interpreter teardown: nothing left to wait for (NCCL, CUDA graphs)


def _serve(shard: TPShard, commands, use_graphs) -> dict:
    """The mirror loop: the same caches, forwards and graphs as rank 0, in the same order."""
    caches, captured = {}, {}
    pool = torch.cuda.graph_pool_handle() if use_graphs else None

    def cache_of(ref):
        cache_id, row = ref
        return caches[cache_id] if row is None else fast_model._RowCache(caches[cache_id], row)
    while True:
        op, *args = commands.recv()
        if op == "new_cache":
            cache_id, batch, slots, branches, k = args
            caches[cache_id] = shard.new_cache(batch, slots, branches, k)
        elif op == "forward":
            ref, shape = args
            shard._forward(cache_of(ref), shape)
        elif op == "capture":
            graph_id, ref, shape = args
            cache = cache_of(ref)
            captured[graph_id] = graphs.Graphed(lambda: shard._forward(cache, shape), {}, pool)
        elif op == "replay":
            captured[args[0]]()
        elif op == "stop":
            return captured
        else:
            raise ValueError(f"unknown tensor-parallel command {op!r}")


def _exit_when_orphaned(parent: int):
    """Rank 0 died: exit even if this worker is blocked (in a collective whose peer is gone, say)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _check_link(device, world):
    """One all-reduce on every rank at start-up: the group works (and NCCL's communicator is set up before
    any CUDA graph capture)."""
    one = torch.ones(1, device=device)
    dist.all_reduce(one)
    if int(one.item()) != world:
        raise RuntimeError(f"tensor-parallel start-up: an all-reduce over {world} ranks gave {one.item()}")


def _destroy_group(timeout_s: float = 15.0):
    """Leave the process group; a hang there (seen with NCCL after CUDA-graph capture) must not hang us."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    done = threading.Thread(target=dist.destroy_process_group, daemon=True)
    done.start()
    done.join(timeout_s)


def _is_streamed(model) -> bool:
    """A loader.Checkpoint (streams each rank's slices) rather than a model or a (function, args) loader."""
    return hasattr(model, "fast_shard")


def _call(loader):
    if callable(loader):
        return loader()
    fn, args, *kwargs = loader
    return fn(*args, **(kwargs[0] if kwargs else {}))


def _the_model(model):
    return model


def _close_at_exit(ref):
    target = ref()
    if target is not None:
        target.close()
