"""The Engine: load once, generate many (the fast engine's facade; ssd_fast.py is its front door)."""
from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import ssd
from ssd_engine import ssd_round
from ssd_engine import tp as tensor_parallel
from ssd_engine.fast_model import FastModel, Ops, Runner, _RowCache, bucket, on_device
from ssd_engine.policy import SSD_BUDGET_ONE_GPU, jit_cost_ratio

SIDE_STREAM_PRIORITY = -1   # SSD's draft side on one GPU: -1 = high (CUDA: lower numbers are higher priorities)

# ---------------------------------------------------------------------------------------------
# The engine: the rounds of ssd.py with the state on the device
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """Device state of a batch padded to its bucket: token history, committed lengths (the last
    committed token is the recovery token r, not yet run through the target), rows still active."""
    hist: torch.Tensor          # [Bb, L] int64
    lens: torch.Tensor          # [Bb] int64
    active: torch.Tensor        # [Bb] bool
    tokens: list                # host copy of each real row's tokens
    prompt_lens: list
    done: list
    finish: list
    last_n: torch.Tensor        # [Bb] outcome n of the last round (the cache key with r)
    spec: dict | None = None    # the speculation cache (device tensors)
    next_hit: list | None = None
    epoch: list | None = None        # per row: bumped when admit hands the row to a new sequence
    active_host: list | None = None  # host mirror of `active` for the real rows
    looked_up: tuple | None = None   # (proposal, q, hit) of the outcome key, found at the end of the last round
    context_limit: torch.Tensor | None = None   # [] on the device: rows stop there (admit may raise it)


class Engine:
    """Load once, generate many. `Engine(target, draft)` takes ssd.Transformer models (loaded on the
    CPU by ssd.load_model) and re-lays them on the device, or ready FastModels, or loader.Checkpoint handles
    (streamed from disk straight to the device in the engine's dtype, each tensor-parallel rank its slice). `pipeline=False` reads every AR/SD round
    back before launching the next (for comparison; on by default). `tp=N` splits the target over N processes
    (GPUs from `device` on; tp.py), each building it with `tp_loader`; `close()` stops them. `linear`:
    the projections of one-row decode steps (FastModel; "auto" times cuBLAS against the skinny Triton
    kernel per projection at load, with CUDA graphs)."""

    def __init__(self, target: ssd.Transformer, draft: ssd.Transformer | None = None, device=None,
                 dtype=None, cuda_graphs=True, max_seq=4096, log=print, concurrent=None, draft_device=None,
                 tp=1, tp_loader=None, pipeline=True, linear="auto", triton_ops=()):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = str(device).startswith("cuda")
        if on_gpu and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but no CUDA GPU is visible: drop --device to run on the CPU")
        if not on_gpu:
            log("ssd_fast: no CUDA device, running the same algorithm with the PyTorch reference ops in float32")
        self.device, self.on_gpu = torch.device(device), on_gpu
        self.dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        self.ops = Ops(use_triton=on_gpu, triton=triton_ops)
        if draft is not None:
            ssd.check_compatible(target, draft)
        self.draft_device = torch.device(draft_device) if draft_device is not None else self.device
        if tp > 1 and draft_device is None and draft is not None:   # the draft on the GPU after the target's
            self.draft_device = tensor_parallel.choose_draft_device(self.device, tp, log)
        if self.draft_device.type == "cuda" and (self.draft_device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"draft device {self.draft_device} asked for, but only {torch.cuda.device_count()} GPU(s) "
                             "are visible")
        graphs = cuda_graphs and on_gpu
        # "auto" times the projections as CUDA-graph replays; launched eagerly, a Triton kernel's Python launch
        # overhead would cost more than cuBLAS saves, so without graphs only an explicit "triton" uses it.
        linear = linear if graphs or linear == "triton" else "torch"
        if tp > 1:   # the target split over tp processes, this one being rank 0 (tp.py)
            self.target = tensor_parallel.TPTarget(target, tp, tp_loader, self.device, self.dtype, self.ops, graphs,
                                                   log)
            self.t_run = tensor_parallel.TPRunner(self.target, graphs)
        else:
            self.target = FastModel.of(target, self.device, self.dtype, self.ops, linear)
            self.t_run = Runner(self.target, graphs)
        self.draft = FastModel.of(draft, self.draft_device, self.dtype, self.ops, linear) if draft is not None else None
        self.d_run = Runner(self.draft, graphs) if draft is not None else None
        # One random generator per sampling site, on the device that draws from it (ssd.SITES): the target's
        # (first token, AR sampling, the verify's uniforms and recovery noise), the draft's (SD proposals, the
        # speculation tree) and the jit backup's. Each is seeded from the user's seed by ssd.derive_seed, so
        # no two streams advance in lockstep: the verifier's uniforms are independent of the numbers that made
        # the proposals, which exactness needs (seeding two GPUs alike would make them the same numbers). Each
        # graph registers the generators of its device, so a replay draws fresh numbers from them.
        self.rng = ssd.random_streams(0, {"target": self.device, "draft": self.draft_device,
                                          "backup": self.draft_device})
        self.t_run.generators = (self.rng["target"],)
        if self.d_run is not None:
            self.d_run.generators = (self.rng["draft"], self.rng["backup"])
        self.max_seq = min(max_seq, target.cfg.max_position_embeddings)
        self.caches, self.calibrated = {}, {}
        self.check_sync = False
        # SSD's draft side (glue, fork, tree) runs concurrently with the target's verify: in a worker
        # thread that launches on its own CUDA stream (GPU), or computes on its own thread (CPU).
        # None (default): on when the draft has its own GPU (measured faster, BENCHMARKS.md); on one
        # device it is opt-in (`concurrent=True`).
        # SSD's round with the host out of the way (ssd_round.py): when the draft shares the target's device and
        # the target is not split. Its draft side runs on a second stream inside the round's CUDA graph when
        # `concurrent` (default: on where graphs run; measured in BENCHMARKS.md). Otherwise (the draft on its own
        # GPU, or a tensor-parallel target) the draft side runs on a worker thread, concurrent by default when
        # the draft has its own GPU.
        self.one_device_ssd = draft is not None and self.draft_device == self.device and tp == 1
        if concurrent is None:
            concurrent = graphs if self.one_device_ssd else on_gpu and self.draft_device != self.device
        self.concurrent = bool(concurrent)
        self.worker = (DraftWorker(self.draft_device if on_gpu else None)
                       if self.concurrent and draft is not None and not self.one_device_ssd else None)
        self.use_graphs = graphs
        self.ssd_rounds, self.buffers, self._side_stream, self._pinned_buffers = {}, {}, None, {}
        self.st = self.ssd_round = None   # the batch being decoded and its SSD round (one-device SSD)
        self.log, self.draft_failed = log, False
        self.profile = False
        # AR and SD: launch the next round before reading this one back (_Run.rounds_iter)
        self.pipeline = pipeline

    def close(self):
        """Stop a tensor-parallel target's worker processes (tp > 1); nothing to do otherwise."""
        if hasattr(self.target, "close"):
            self.target.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- small device helpers -----------------------------------------------------------------

    def _probs(self, logits, t, req):
        return ssd.to_probs(logits, t, req.top_k, req.top_p)

    def _sample(self, probs, gen):
        """Exact sampling by exponential race: argmax p / E with E ~ Exp(1) from `gen`, no host sync."""
        flat = probs.reshape(-1, probs.shape[-1]).float().contiguous()
        noise = ssd.exponential_noise(flat.shape, gen, flat.device)
        with on_device(flat.device):
            return self.ops.sample_exponential_race(flat, noise).reshape(probs.shape[:-1])

    def _draft_sample(self, logits, t, req, fan_out, gen):
        """ssd.draft_sample on the device: a token drawn from the draft's q' and that very q' (the verifier's).
        `fan_out`: Saguaro's F, a host int, or a 0-dim device tensor when it adapts inside a CUDA graph."""
        q = self._probs(logits, t, req)
        if isinstance(fan_out, torch.Tensor):
            q = saguaro_rescale_masked(q, fan_out, req.c, self.ssd_round.f_cap)
        else:
            q = ssd.saguaro_rescale(q, fan_out, req.c)
        return self._sample(q, gen), q

    def _base(self, st, req):
        """Each row's position of r, where this round's steps start. A finished row rides along frozen (its
        results are discarded): its position is clamped so that its writes, K + 1 slots on, stay inside the
        cache (for the rows still generating the clamp changes nothing: the context check keeps them below)."""
        return (st.lens - 1).clamp(max=self.tc.slots - req.k_used - 2)

    def _cache(self, model, name, batch, branches=0, k=0):
        key = (name, batch, branches, k)
        if key not in self.caches:
            self.caches[key] = model.new_cache(batch, self.max_seq + 2 * k + 2, branches, k)
        return self.caches[key]

    def st_buffers(self, Bb, k=None):
        """The sequence state of a batch bucket as persistent device tensors (the SSD round's CUDA graph reads
        and writes them in place, so they outlive a generate call): token history, lengths, active rows, the
        last outcome n, the per-row temperatures and the context limit."""
        k = self.req.k if k is None else k
        key = (Bb, k)
        if key not in self.buffers:
            dev, long = self.device, dict(dtype=torch.long, device=self.device)
            self.buffers[key] = dict(
                hist=torch.zeros(Bb, self.max_seq + 2 * k + 4, **long), lens=torch.zeros(Bb, **long),
                active=torch.zeros(Bb, dtype=torch.bool, device=dev), last_n=torch.zeros(Bb, **long),
                t=torch.zeros(Bb, device=dev), t_draft=torch.zeros(Bb, device=self.draft_device),
                context_limit=torch.zeros((), **long))
        return self.buffers[key]

    def _pinned(self, shape, i):
        """One of two pinned host buffers per shape for a round's read-back (round i uses buffer i % 2: pipelined,
        round i + 2 is launched only after round i was read). No allocation per round."""
        key = tuple(shape)
        if key not in self._pinned_buffers:
            self._pinned_buffers[key] = [torch.empty(key, dtype=torch.long, pin_memory=True) for _ in range(2)]
        return self._pinned_buffers[key][i % 2]

    def side_stream(self):
        """The second CUDA stream the SSD round's draft side is captured on (one per engine)."""
        if self._side_stream is None:   # high priority: its short kernels go first while the verify's long ones wait
            self._side_stream = torch.cuda.Stream(self.device, priority=SIDE_STREAM_PRIORITY)
        return self._side_stream

    # --- generate -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, settings: ssd.Settings | None = None, on_round=None, profile=False,
                 **kw) -> ssd.GenerationResult:
        """Same arguments and result as ssd.generate (the models are the engine's: a Settings, or its fields as
        keywords), and k="auto" (see choose_lookahead). With profile=True every part of a round is timed with a
        device synchronization (slower)."""
        run = self._start(prompts, settings, profile, **kw)
        try:
            for stats in run.rounds_iter():
                if on_round:
                    run.stop(on_round(run.generated(), stats))
        except KeyboardInterrupt:  # Ctrl-C: keep what was generated
            run.drain()
            run.stop([b for b in range(run.B) if not run.st.done[b]], "interrupted")
        return run.result()

    @torch.no_grad()
    def stream(self, prompt, settings: ssd.Settings | None = None, **kw):
        """Iterate over the new token ids of one prompt, a chunk per round, as they are accepted
        (the settings of generate). The chunks concatenated are generate's tokens."""
        run = self._start([list(prompt)], settings, **kw)
        sent = 0
        for _ in run.rounds_iter():
            tokens = run.generated()[0]
            if len(tokens) > sent:
                yield tokens[sent:]
                sent = len(tokens)

    def start(self, prompts, settings: ssd.Settings | None = None, **kw) -> "_Run":
        """A generation in progress, round by round: `for stats in run.rounds_iter(): ...`, with
        `run.admit(prompt)` between rounds to add a sequence (continuous batching), `run.generated()`,
        `run.stop(rows)` and `run.result()`. Same settings as generate."""
        return self._start(prompts, settings, **kw)

    def _start(self, prompts, settings: ssd.Settings | None = None, profile=False, **kw) -> "_Run":
        s = ssd.Settings.of(settings, **kw)
        mode = s.mode
        if mode != "ar" and self.draft is None:
            raise ValueError(f"mode {mode} needs a draft model: build the Engine with one")
        batch = 1 if prompts and isinstance(prompts[0], int) else len(prompts)
        # Choices that change the output never depend on a timing unless asked (k="auto" measures, and says
        # what it chose): the same seed and arguments give the same tokens on the same machine.
        s, _ = self.resolve_k_auto(batch, s)
        if mode == "ssd" and s.fan_out_budget is None and s.fan_out == "auto" and self.one_device_ssd \
                and self.use_graphs and self.concurrent:
            # the draft side hides under the verify: more branches for more hits (measured: BENCHMARKS.md)
            s = ssd.Settings.of(s, fan_out_budget=min(SSD_BUDGET_ONE_GPU, 16 * (s.k + 1)))
        req = ssd.make_request(_CfgOnly(self.target.cfg), prompts, _CfgOnly(self.draft.cfg) if self.draft else None,
                               s, max_context=self.max_seq)
        seed = s.seed
        for site, gen in self.rng.items():    # after any measuring above, which may have drawn
            gen.manual_seed(ssd.derive_seed(seed, site))
        self.profile, self.req = profile, req
        B = len(req.prompts)
        Bb = bucket(B)
        dev = self.device
        req.send_q = bool((req.t > 0).any())   # at temperature 0 the verify needs no q rows
        req.draft_greedy = not req.send_q and not bool((req.t_draft > 0).any())   # (host values: no sync)
        buf = self.st_buffers(Bb, req.k)      # req's device tensors are the persistent buffers (CUDA graphs read them)
        req.t = buf["t"].copy_(torch.cat([req.t, torch.zeros(Bb - B)]))
        req.t_draft = buf["t_draft"].copy_(torch.cat([req.t_draft, torch.zeros(Bb - B)]))
        branches = (sum(req.fan) if req.fan else req.budget) if mode == "ssd" else 0
        self.tc = self._cache(self.target, "target", Bb)
        self.dc = self._cache(self.draft, "draft", Bb, branches, req.k) if mode != "ar" else None
        est = ssd.Estimates(k=req.k)
        if mode == "ssd":   # the batch-aware backup weighs the jit backup's cost by a rule, not a timing
            est.jit_cost_ratio = jit_cost_ratio(self.target.cfg, self.draft.cfg, req.k, Bb, self.on_gpu)
            if self.one_device_ssd and self.use_graphs and not profile:
                est.jit_always = not ssd_round.CONDITIONAL_NODES
        t0 = time.perf_counter()
        st = self._prefill(req, Bb, mode)
        prefill_time = time.perf_counter() - t0
        self.st, self.ssd_round = st, None
        if mode == "ssd" and self.one_device_ssd:
            self._prepare_ssd_round(req, est, Bb, branches)
        return _Run(self, st, req, est, mode, prefill_time)

    def resolve_k_auto(self, batch: int, settings: ssd.Settings) -> tuple[ssd.Settings, str | None]:
        """`k="auto"`: the settings with the measured K (choose_lookahead) and, for SSD with an automatic fan-out
        and no budget given, the speculation budget whose draft side fits the verify; and a line saying what was
        chosen (None when nothing was measured). The one place k="auto" is resolved (generate and the CLI)."""
        s = settings
        if s.k != "auto":
            return s, None
        if s.mode == "ar" or self.draft is None:
            return ssd.Settings.of(s, k=1), None
        k, budget, table = self.choose_lookahead(batch, s.mode)
        fan_out_budget = s.fan_out_budget
        if s.mode == "ssd" and s.fan_out == "auto" and fan_out_budget is None:
            # choose_lookahead times a tree step by a draft step over N tokens (a proxy that ran low on
            # H200s at batch 4 and 16); with the draft side concurrent, time the real one for this K
            overlapped = self.worker is not None and self.on_gpu
            fan_out_budget = self.fit_budget(batch, k, s.saguaro_c, s.top_k, s.top_p) if overlapped else budget
        row = table[k - 1]
        line = (f"--k auto: K={k}" + (f", speculation budget {fan_out_budget}" if s.mode == "ssd" and fan_out_budget
                                      else "")
                + f" (verify {row['verify_ms']:.2f} ms, drafting {row['draft_ms']:.2f} ms"
                + (", hidden behind the verify)" if row["hidden"] else ", the target waits)"))
        return ssd.Settings.of(s, k=k, fan_out_budget=fan_out_budget), line

    def _prepare_ssd_round(self, req, est, Bb, branches):
        """The SSD round's state for this shape (ssd_round.SSDRound), reset, and its CUDA graphs captured before
        the first round: one per backup the run may take."""
        V = self.target.cfg.vocab_size
        f_cap = min(max(req.fan) if req.fan else branches, V - 1)
        key = (Bb, req.k, branches, f_cap)
        if key not in self.ssd_rounds:
            self.ssd_rounds[key] = ssd_round.SSDRound(self, Bb, req.k, branches, req.send_q, f_cap)
        rnd = self.ssd_round = self.ssd_rounds[key]
        rnd.reset()
        if req.send_q and not rnd.send_q:
            rnd.enable_q()
        rnd.send_q = req.send_q
        rnd.draft_greedy = req.draft_greedy
        if self.use_graphs and not self.profile:
            for backup in (("fast", "jit") if req.backup == "auto" else (req.backup,)):
                rnd.prepare(backup, self._ssd_fan(req, est), self.concurrent)

    def _ssd_fan(self, req, est):
        fan = req.fan or ssd.geometric_fan_out(req.k, req.budget, est.accept_rate, req.miss_exponent)
        return [min(f, self.ssd_round.f_cap) for f in fan]

    def _prefill(self, req, Bb, mode):
        dev, B = self.device, len(req.prompts)
        prompts = req.prompts + [req.prompts[0]] * (Bb - B)          # padding rows, frozen from the start
        T = max(len(p) for p in prompts)
        tokens = torch.tensor([p + [p[-1]] * (T - len(p)) for p in prompts], device=dev)
        positions = torch.arange(T, device=dev)[None].expand(Bb, T).contiguous()
        plens = torch.tensor([len(p) for p in prompts], device=dev)
        logits = self.target.forward(tokens, positions, self.tc)[torch.arange(Bb, device=dev), plens - 1]
        if mode != "ar":
            self.draft.forward(tokens.to(self.draft_device), positions.to(self.draft_device), self.dc)
        first = self._sample(self._probs(logits, req.t, req), self.rng["target"])
        buf = self.st_buffers(Bb, req.k)
        hist = buf["hist"].zero_()
        hist[:, :T] = tokens
        hist[torch.arange(Bb, device=dev), plens] = first
        buf["lens"].copy_(plens + 1)
        buf["active"].copy_(torch.tensor([b < B for b in range(Bb)]))
        buf["context_limit"].fill_(req.context_limit)
        st = Batch(hist=hist, lens=buf["lens"], active=buf["active"],
                   tokens=[list(p) for p in req.prompts], prompt_lens=[len(p) for p in req.prompts],
                   done=[False] * B, finish=[None] * B, last_n=buf["last_n"].zero_(),
                   next_hit=[False] * B, context_limit=buf["context_limit"])
        for b, tok in enumerate(first[:B].tolist()):
            st.tokens[b].append(tok)
            self._finish_check(st, b, req)
        st.epoch, st.active_host = [0] * B, [True] * B
        self._sync_active(st)
        return st

    def _finish_check(self, st, b, req, new=None):
        """Stop row b at EOS, at max_new_tokens or at the context limit. `new`: how many tokens this
        round appended (only those need looking at: earlier ones were checked in their round)."""
        tokens, p = st.tokens[b], st.prompt_lens[b]
        n_generated = len(tokens) - p
        first = 0 if new is None else max(0, n_generated - new)
        for i in range(first, n_generated):
            tok = tokens[p + i]
            if tok in req.eos or i + 1 >= req.max_new_tokens:
                st.tokens[b] = st.tokens[b][:st.prompt_lens[b] + i + 1]
                st.done[b], st.finish[b] = True, "eos" if tok in req.eos else "length"
                return
        if len(st.tokens[b]) + req.k_used + 1 > req.context_limit:
            st.done[b], st.finish[b] = True, "context"

    def _commit_device(self, st, n, new):
        """Write the accepted tokens s1..sn and the new recovery token into the history (active rows). A row
        whose next round would not fit the context stops here, on the device (the host's _finish_check says
        "context" when it reads this round back): a round launched before that read-back must not move it on."""
        K1 = new.shape[1]
        n = torch.where(st.active, n, torch.zeros_like(n))
        idx = st.lens[:, None] + torch.arange(K1, device=n.device)
        keep = (torch.arange(K1, device=n.device)[None] <= n[:, None]) & st.active[:, None]
        st.hist.scatter_(1, idx, torch.where(keep, new, st.hist.gather(1, idx)))
        st.lens += torch.where(st.active, n + 1, torch.zeros_like(n))
        st.active &= st.lens + self.req.k_used + 1 <= st.context_limit
        st.last_n.copy_(n)

    def _commit_host(self, st, req, packed, stats):
        """The host's share of a round: each taking part row's new tokens, its finish check, its hit flag."""
        stats.accepted = [row[0] if on else 0 for row, on in zip(packed, stats.active)]
        for b, row in enumerate(packed):
            if not stats.active[b]:   # finished (or handed to a new sequence) before this round ended
                continue
            st.tokens[b] += row[1:2 + row[0]]
            self._finish_check(st, b, req, new=row[0] + 1)
            st.next_hit[b] = bool(row[-1])
        self._sync_active(st)

    def _sync_active(self, st):
        """Mirror the rows' done flags into the device mask, copying only when one changed: a copy from
        pageable host memory waits for the device's queue, which would stall a pipelined round."""
        active = [not d for d in st.done]
        if active != st.active_host:
            st.active[:len(active)] = torch.tensor(active, device=self.device)
            st.active_host = active

    def _timed(self, stats, name, devices=None):
        """Time a part of the round; profile=True synchronizes `devices` (default: both) around it."""
        devices = devices or {self.device, self.draft_device}
        return _Timer(stats, name, devices if self.profile and self.on_gpu else (), self.profile)

    # --- rounds ---------------------------------------------------------------------------------

    def _ar_round(self, st, req, stats, est):
        def step(tokens, positions, t):  # forward + sampling, one graph
            return self._sample(self._probs(self.target.forward(tokens, positions, self.tc)[:, -1], t, req),
                                self.rng["target"])
        with self._timed(stats, "verify"):
            pos = self._base(st, req)
            r = st.hist.gather(1, pos[:, None])
            r_new = self.t_run.run(("ar", id(self.tc), r.shape[0], req.top_k, req.top_p), step,
                                   tokens=r, positions=pos[:, None], t=req.t)
        n = torch.zeros_like(r_new)
        self._commit_device(st, n, r_new[:, None])
        return _packed(n, r_new[:, None], torch.zeros_like(n, dtype=torch.bool))

    def _draft_propose(self, st, req, fan=None, site="draft"):
        """K draft steps from the recovery token r (SD, and SSD's jit backup, which samples from its own
        stream, site "backup"). The first step also re-reads the token before r, so rows where the draft
        has not seen s_K yet (all K accepted last round) need no separate catch-up pass: every row runs
        the same shapes."""
        dd = self.draft_device
        m1 = self._base(st, req)
        B, V = st.hist.shape[0], self.draft.cfg.vocab_size
        tokens = torch.empty(B, req.k, dtype=torch.long, device=dd)
        qs = torch.empty(B, req.k, V, device=dd)
        step_pos = torch.stack([m1 - 1, m1], 1)
        step_tokens, step_pos = st.hist.gather(1, step_pos).to(dd), step_pos.to(dd)
        m1 = m1.to(dd)
        for i in range(req.k):
            f_i = _saguaro_f(fan[i] if fan is not None else 0, req.c)

            def step(tokens, positions, t, f_i=f_i):  # draft forward + (Saguaro) sampling, one graph
                logits = self.draft.forward(tokens, positions, self.dc)[:, -1]
                return self._draft_sample(logits, t, req, f_i, self.rng[site])
            key = ("draft", site, id(self.dc), tuple(step_tokens.shape), req.top_k, req.top_p, f_i, req.c)
            s, q = self.d_run.run(key, step, tokens=step_tokens, positions=step_pos, t=req.t_draft)
            tokens[:, i], qs[:, i] = s, q
            step_tokens, step_pos = tokens[:, i:i + 1], (m1 + 1 + i)[:, None]
        return tokens.to(self.device), qs.to(self.device)

    def _verify(self, st, req, proposal, q):
        """The target's pass over [r, s1..sK] and the fused exact verify (one kernel, no sync)."""
        m1 = self._base(st, req)
        r = st.hist.gather(1, m1[:, None])
        positions = m1[:, None] + torch.arange(req.k + 1, device=self.device)

        def step(tokens, positions, t, proposal, q):  # target forward + exact verify, one graph
            p = self._probs(self.target.forward(tokens, positions, self.tc), t, req)
            B, V = p.shape[0], p.shape[-1]
            u = torch.rand(B, req.k, device=p.device, generator=self.rng["target"])
            noise = ssd.exponential_noise((B, V), self.rng["target"], p.device)
            n, r_new = self.ops.verify(p.contiguous(), q, proposal, u, noise)
            j = torch.arange(req.k + 1, device=p.device)[None]
            return n, torch.where(j < n[:, None], torch.cat([proposal, proposal[:, -1:]], 1), r_new[:, None])
        key = ("verify", id(self.tc), r.shape[0], req.k, req.top_k, req.top_p)
        return self.t_run.run(key, step, tokens=torch.cat([r, proposal], 1), positions=positions, t=req.t,
                              proposal=proposal.contiguous(), q=q.float().contiguous())

    def _sd_round(self, st, req, stats, est):
        with self._timed(stats, "draft"):
            proposal, q = self._draft_propose(st, req)
        with self._timed(stats, "verify"):
            n, new = self._verify(st, req, proposal, q)
        self._commit_device(st, n, new)
        return _packed(n, new, torch.zeros_like(n, dtype=torch.bool))

    def _ngram_proposal(self, st, req):
        """ssd.ngram_proposal on the device: what followed the latest earlier occurrence of r."""
        m1 = st.lens - 1
        r = st.hist.gather(1, m1[:, None])
        idx = torch.arange(st.hist.shape[1], device=self.device)[None]
        match = (st.hist == r) & (idx < m1[:, None])
        last = torch.where(match, idx, torch.full_like(idx, -1)).max(1).values
        follow = last[:, None] + 1 + torch.arange(req.k, device=self.device)
        ok = (last[:, None] >= 0) & (follow <= m1[:, None])
        return torch.where(ok, st.hist.gather(1, follow.clamp(min=0)), r)

    def _ssd_round(self, st, req, stats, est):
        B = len(st.tokens)
        fan = req.fan or ssd.geometric_fan_out(req.k, req.budget, est.accept_rate, req.miss_exponent)
        fan = [min(f, self.target.cfg.vocab_size - 1) for f in fan]
        stats.fan_out = fan
        # 1. The outcome key (n, r) was looked up on the device at the end of the last round.
        stats.hit = list(st.next_hit)
        with self._timed(stats, "lookup"):   # done at the end of the last round (its hit flags were the one sync)
            proposal, q, hit = st.looked_up if st.looked_up is not None else self._lookup(st)
        # 2. Misses: the jit backup (the draft decodes K tokens now) or the cheap n-gram proposal.
        if not all(h or d for h, d in zip(stats.hit, st.done)):
            stats.backup = req.backup if req.backup != "auto" else ssd.choose_backup(B, est)
            with self._timed(stats, "backup"):
                s, qs = self._backup(st, req, fan, stats)
                proposal = torch.where(hit[:, None], proposal, s)
                q = torch.where(hit[:, None, None], q, qs)
        # 3 and 4 at the same time: the target verifies while the draft runs the glue pass, the fork
        # and the tree decode that make the next round's speculation cache.
        m1 = self._base(st, req)
        r = st.hist.gather(1, m1[:, None])
        job = self._submit_draft_side(m1, r, proposal, fan, req, stats)
        with self._timed(stats, "verify"):
            n, new = self._verify(st, req, proposal, q)
        with self._timed(stats, "wait_draft"):
            st.spec = self._join_draft_side(job)
        self._commit_device(st, n, new)
        st.looked_up = self._lookup(st)
        return _packed(n, new, st.looked_up[2])

    def _ssd_round_device(self, st, req, stats, est):
        """SSD's round with the host out of the way (ssd_round.SSDRound): the host picks the fan-out and the
        backup from the estimates so far (rules, no timing), then launches the round (one graph replay on a
        GPU). Returns the packed [n, new tokens, hit] per row; hits are decided on the device."""
        stats.fan_out = fan = self._ssd_fan(req, est)
        stats.backup = req.backup if req.backup != "auto" else ssd.choose_backup(len(st.tokens), est)
        graphs = self.use_graphs and not self.profile
        try:
            return self.ssd_round.launch(stats, stats.backup, fan, self.concurrent and graphs, graphs)
        except Exception as e:   # the draft failed while its round was captured: this round is AR
            if not graphs:
                raise
            self._draft_lost(e)
            return self._ar_round(st, req, stats, est)

    def _backup(self, st, req, fan, stats):
        if stats.backup == "jit":
            try:
                return self._draft_propose(st, req, fan, site="backup")
            except Exception as e:  # the draft is gone: this round takes the cheap proposal
                self._draft_lost(e)
                stats.backup = "fast"
        s = self._ngram_proposal(st, req)    # deterministic: verified with q = one-hot
        return s, ssd.deterministic_q(s, self.target.cfg.vocab_size)

    def _submit_draft_side(self, m1, r, proposal, fan, req, stats):
        if self.draft_failed:
            return None
        dd = self.draft_device
        packed = torch.cat([m1[:, None], r, proposal], 1).to(dd)   # the handshake, target -> draft: one copy
        m1, r, proposal = packed[:, 0], packed[:, 1:2], packed[:, 2:]
        if self.worker is None:  # sequential: run it now
            return _Done(self._safe(lambda: self._build_speculation_cache(m1, r, proposal, fan, req, stats)))
        return self.worker.submit(self._build_speculation_cache, m1, r, proposal, fan, req, stats)

    def _join_draft_side(self, job):
        if job is None:
            return None
        try:
            spec = job.result()
        except Exception as e:
            self._draft_lost(e)
            return None
        if isinstance(spec, Exception):
            self._draft_lost(spec)
            return None
        if self.worker is not None:
            self.worker.hand_over(spec.values())
        return spec

    def _safe(self, fn):
        try:
            return fn()
        except Exception as e:
            return e

    def _draft_lost(self, error):
        """Faults: without its draft the run finishes as AR on the target; nothing generated is lost."""
        if not self.draft_failed:
            self.log(f"ssd_fast: the draft failed ({type(error).__name__}: {error}); "
                     "finishing with the target alone (AR), the tokens so far are kept")
        self.draft_failed = True

    def _lookup(self, st):
        """Device-side lookup of the outcome key (last n, r) among the cached keys, on the draft's
        device: the key goes there, the K tokens (and their q rows, only if some row samples at
        temperature > 0) come back. Returns (proposal, q, hit) on the target's device."""
        spec, Bb, dev, dd = st.spec, st.hist.shape[0], self.device, self.draft_device
        V = self.target.cfg.vocab_size
        if spec is None:
            return (torch.zeros(Bb, self.req.k, dtype=torch.long, device=dev),
                    torch.zeros(Bb, self.req.k, V, device=dev), torch.zeros(Bb, dtype=torch.bool, device=dev))
        r = st.hist.gather(1, (st.lens - 1)[:, None])
        key = torch.cat([st.last_n[:, None], r], 1).to(dd)
        match = (spec["j"] == key[:, :1]) & (spec["cand"] == key[:, 1:])
        hit, idx = match.any(1), match.float().argmax(1)
        rows = torch.arange(Bb, device=dd)
        # back to the target: the K tokens and the hit flag in one copy (and the q rows when needed)
        back = torch.cat([spec["chains"][rows, idx], hit[:, None].long()], 1).to(dev)
        proposal, hit = back[:, :-1], back[:, -1].bool()
        if self.req.send_q:
            q = spec["q"][rows, idx].to(dev)
        else:  # greedy verify: any q gives the same result; one-hot(s) needs no transfer
            q = torch.zeros(*proposal.shape, V, device=dev).scatter_(-1, proposal[..., None], 1.0)
        return proposal, q, hit

    def _build_speculation_cache(self, m1, r, proposal, fan, req, stats):
        """The draft side of a round (m1: position of r per row). Returns the speculation cache:
        keys (j, candidate) and, per key, K tokens and the K q rows they were sampled from."""
        K, dev = req.k, self.draft_device
        with self._timed(stats, "glue", [dev]):
            glue = self.d_run.step(self.dc, torch.cat([r, proposal], 1), m1[:, None] + torch.arange(K + 1, device=dev))
        with self._timed(stats, "tree", [dev]):
            scores = glue.clone()
            scores[:, :K].scatter_(-1, proposal[..., None], float("-inf"))   # s_{j+1} would have been accepted
            cand = torch.cat([scores[:, j].topk(fan[j], dim=-1).indices for j in range(K + 1) if fan[j]], 1)
            N = cand.shape[1]
            branch_j = torch.cat([torch.full_like(cand[:, :f], j) for j, f in enumerate(fan) if f], 1)  # no host copy
            if N < self.dc.k_tree[0].shape[1]:   # fewer branches than the buffer (tiny vocabularies): pad
                pad = self.dc.k_tree[0].shape[1] - N
                cand = torch.cat([cand, cand[:, :1].expand(-1, pad)], 1)
                branch_j = torch.cat([branch_j, torch.full_like(cand[:, :pad], -1)], 1)
            B, N, V = cand.shape[0], cand.shape[1], self.draft.cfg.vocab_size
            chains = torch.empty(B, N, K, dtype=torch.long, device=dev)
            qs = torch.empty(B, N, K, V, device=dev)
            tokens, glue_j = cand, branch_j.clamp(min=0).contiguous()
            for depth in range(K):
                f = _saguaro_f(fan[depth], req.c)

                def step(tokens, positions, trunk, glue, t, depth=depth, f=f):
                    logits = self.draft.forward(tokens, positions, self.dc, tree=(trunk, glue, depth))
                    # Saguaro sampling: a token at depth d is proposal d+1, decided by outcome n = d.
                    return self._draft_sample(logits, t, req, f, self.rng["draft"])
                key = ("tree", id(self.dc), B, N, depth, f, req.c, req.top_k, req.top_p)
                s, q = self.d_run.run(key, step, tokens=tokens, positions=m1[:, None] + glue_j + 1 + depth,
                                      trunk=m1, glue=glue_j, t=req.t_draft)
                chains[:, :, depth], qs[:, :, depth] = s, q
                tokens = chains[:, :, depth]
            return dict(j=branch_j, cand=cand, chains=chains, q=qs)

    def choose_lookahead(self, batch=1, mode="ssd", k_max=8, accept_rate=0.7,
                         budgets=(4, 8, 12, 16, 20, 24, 32, 48)):
        """--k auto, and the speculation budget for --fan-out auto. SSD hides the draft only when its
        glue pass and K tree steps fit inside the target's verify, so measure at this batch size the
        verify (K+1 tokens), the glue pass (K+1 tokens) and a tree step (one token per branch; timed as
        a draft step over N tokens) and take, among the (K, N) that fit, the K with the most expected
        tokens per second of verify, E[tokens | a, K] / t_verify(K) with E = (1 - a^(K+1)) / (1 - a)
        (Leviathan et al. 2023, eq. 1), and the largest budget N for it. When nothing fits, the target
        waits: the score is E / (t_glue + K t_tree). SD has no overlap: E / (t_verify + K t_draft).
        Returns (K, N, table of the measurements in ms)."""
        Bb = bucket(batch)
        key = ("lookahead", Bb, mode, k_max, accept_rate, tuple(budgets))
        if key in self.calibrated:
            return self.calibrated[key]
        tc, dc = self._cache(self.target, "target", Bb), self._cache(self.draft, "draft", Bb)
        dev, dd = self.device, self.draft_device
        memo = {}

        def timed(run, cache, T, device):
            if (id(cache), T) not in memo:   # the last T slots: no row has reached them yet
                pos = (cache.slots - T + torch.arange(T, device=device))[None].expand(Bb, -1).contiguous()
                tok = torch.zeros(Bb, T, dtype=torch.long, device=device)
                memo[(id(cache), T)] = self._time(lambda: run.step(cache, tok, pos))
            return memo[(id(cache), T)]
        a = min(max(accept_rate, 1e-3), 1 - 1e-3)
        best, table = None, []
        for k in range(1, k_max + 1):
            expected = (1 - a ** (k + 1)) / (1 - a)
            t_verify = timed(self.t_run, tc, k + 1, dev)
            if mode == "sd":
                t_draft = timed(self.d_run, dc, 2, dd) + (k - 1) * timed(self.d_run, dc, 1, dd)
                score, n = expected / (t_verify + t_draft), 0
            else:
                t_glue = timed(self.d_run, dc, k + 1, dd)
                fits = [n for n in budgets if t_glue + k * timed(self.d_run, dc, n, dd) <= t_verify]
                n = max(fits) if fits else budgets[0]
                t_draft = t_glue + k * timed(self.d_run, dc, n, dd)
                score = expected / max(t_verify, t_draft)
            table.append(dict(k=k, budget=n, verify_ms=1e3 * t_verify, draft_ms=1e3 * t_draft, hidden=t_draft <= t_verify,
                              tokens_per_ms=score / 1e3))
            if best is None or score > best[0]:
                best = (score, k, n)
        self.calibrated[key] = (best[1], best[2], table)
        return self.calibrated[key]

    def fit_budget(self, batch, k, c=1.0, top_k=0, top_p=1.0, margin=0.85,
                   budgets=(8, 12, 16, 24, 32, 48, 64, 96, 128)) -> int:
        """The speculation budget (branches per row) for SSD with the draft side running concurrently:
        the largest whose real draft side (glue pass, fork, K tree steps: _build_speculation_cache, timed
        as it runs) takes at most `margin` of the target's verify at this batch size. More branches
        cover more outcomes (a higher hit rate, fewer backups); past the verify they make the target wait."""
        Bb = bucket(batch)
        key = ("budget", Bb, k, c, top_k, top_p, margin, tuple(budgets))
        if key in self.calibrated:
            return self.calibrated[key]
        dev, dd = self.device, self.draft_device
        tc = self._cache(self.target, "target", Bb)
        S = tc.slots
        pos = (S - k - 2 + torch.arange(k + 1, device=dev))[None].expand(Bb, -1).contiguous()
        t_verify = self._time(lambda: self.t_run.step(tc, torch.zeros_like(pos), pos))
        m1 = torch.full((Bb,), S - k - 2, device=dd)
        r, proposal = torch.zeros(Bb, 1, dtype=torch.long, device=dd), torch.zeros(Bb, k, dtype=torch.long, device=dd)
        # the request fields the draft side reads, to time it outside a generation
        req = SimpleNamespace(k=k, c=c, top_k=top_k, top_p=top_p, t_draft=torch.zeros(Bb, device=dd))
        saved, best = getattr(self, "dc", None), budgets[0]
        try:
            for n in budgets:
                n = min(n, self.target.cfg.vocab_size - 1)
                self.dc = self._cache(self.draft, "draft", Bb, n, k)
                fan = ssd.geometric_fan_out(k, n, 0.6)
                side = self._time(lambda: self._build_speculation_cache(m1, r, proposal, fan, req, ssd.RoundStats([])))
                if side > margin * t_verify:
                    break
                best = n
        finally:
            self.dc = saved
        for n in budgets:   # keep only the tree buffers the run will use
            cache = self.caches.get(("draft", Bb, n, k))
            if n != best and cache is not None and cache is not saved:
                # its graphs go too: they write into its buffers, and a later cache may reuse its id()
                self.d_run.graphs = {g: v for g, v in self.d_run.graphs.items() if g[1] != id(cache)}
                del self.caches[("draft", Bb, n, k)]
        self.log(f"ssd_fast: speculation budget {best} per row (verify {1e3 * t_verify:.2f} ms at batch {Bb}, K={k})")
        self.calibrated[key] = best
        return best

    def _time(self, fn, reps=3):
        fn()
        self._sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        self._sync()
        return (time.perf_counter() - t0) / reps

    def _sync(self):
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.synchronize(self.draft_device)


class DraftWorker:
    """The draft's side of SSD on its own thread: on a GPU it launches on its own CUDA stream, so its
    kernels run while the target's verify runs; on a CPU it computes next to the main thread.
    Inputs are handed over with an event (the draft stream waits for the main stream), outputs the
    other way round; record_stream keeps the caching allocator from reusing a buffer too early."""

    def __init__(self, device):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssd-draft")
        self.device = device
        self.stream = torch.cuda.Stream(device) if device is not None else None

    def submit(self, fn, *args):
        if self.stream is None:
            return self.pool.submit(_no_grad_call, fn, *args)
        main = torch.cuda.current_stream(self.device)
        ready = main.record_event()
        for t in args:
            if isinstance(t, torch.Tensor):
                t.record_stream(self.stream)
        return self.pool.submit(self._on_stream, ready, fn, *args)

    def _on_stream(self, ready, fn, *args):
        with on_device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            return _no_grad_call(fn, *args)

    def hand_over(self, tensors):
        """The main stream waits for the draft stream before it reads the draft's outputs."""
        if self.stream is None:
            return
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        for t in tensors:
            t.record_stream(main)


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


def _saguaro_f(f, c):
    """The fan-out a step's Saguaro rescaling depends on: none at C >= 1 (no rescaling). Graph keys use
    this, so a fan-out that follows the running acceptance estimate does not capture new graphs."""
    return f if c < 1.0 else 0


def _packed(n, new, hit):
    """What the host reads of a round, one row per sequence: [n, the K + 1 new tokens, hit] (ssd_round packs the
    same inside its graph)."""
    return torch.cat([n[:, None], new, hit[:, None].long()], 1)


def _no_grad_call(fn, *args):
    with torch.no_grad():
        return fn(*args)


class _Done:
    """An already computed result with a Future's result() (the sequential path)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Run:
    """One generate call in progress: its device state and the rounds so far."""

    def __init__(self, engine, st, req, est, mode, prefill_time):
        self.engine, self.st, self.req, self.est, self.mode = engine, st, req, est, mode
        self.prefill_time, self.rounds, self.B = prefill_time, [], len(req.prompts)
        ssd_round = engine._ssd_round_device if engine.ssd_round is not None else engine._ssd_round
        self.round_fn = {"ar": engine._ar_round, "sd": engine._sd_round, "ssd": ssd_round}[mode]
        self.device_hits = mode == "ssd" and engine.ssd_round is not None   # hit flags come back with the tokens
        self.pipelined = engine.pipeline and (mode in ("ar", "sd") or self.device_hits) and not engine.profile
        self._last_end = None   # when the previous round's results were read back
        self.est_before = copy.copy(est)   # the estimates before the latest round's update
        self._launches = 0      # rounds launched (which pinned read-back buffer a round uses)
        self._inflight = None   # a launched round not read back yet (pipelined AR/SD)

    def rounds_iter(self):
        """Run rounds until every row is done, yielding each round's stats. AR and SD rounds need nothing
        from the host to start the next one (the sequence state lives on the device), so on a GPU the
        next round is launched before this one's tokens are read back: the host's bookkeeping and the
        read-back then overlap the next round's kernels instead of leaving the GPU idle. A row that
        finished keeps riding along for that one extra round; its tokens there are discarded."""
        eng, st = self.engine, self.st
        pipelined = self.pipelined
        while not all(st.done) or self._inflight is not None:
            launched = self._launch() if not all(st.done) else None
            if not pipelined:
                stats = self._finish(launched)
            else:
                stats = self.drain()
                self._inflight = launched
            if stats is not None:
                yield stats

    def drain(self):
        """Read back and commit the round in flight, if any (also after Ctrl-C: nothing generated is lost)."""
        inflight, self._inflight = self._inflight, None
        return self._finish(inflight) if inflight is not None else None

    def _launch(self):
        """Launch one round on the device; its results are read back by _finish."""
        eng, st = self.engine, self.st
        if eng.draft_failed:   # the rest of the run is AR on the target
            self.round_fn = eng._ar_round
        t_round = time.perf_counter()
        stats = ssd.RoundStats(accepted=[])
        if eng.check_sync:   # tests: any host synchronization inside a round raises
            torch.cuda.set_sync_debug_mode("error")
        # SSD's fan-out and backup follow the estimates up to two rounds back, pipelined or not (pipelined, the
        # last round is still in flight): the same seed gives the same tokens either way
        est = self.est if self.pipelined else self.est_before
        try:
            out = self.round_fn(st, self.req, stats, est)
        finally:
            if eng.check_sync:
                torch.cuda.set_sync_debug_mode("default")
        ready = None
        if out.is_cuda:   # copy back without waiting (ordered before the next round's writes); _finish waits for
            packed = eng._pinned(out.shape, self._launches)   # this event only
            packed.copy_(out, non_blocking=True)
            packed = packed[:self.B]
            ready = torch.cuda.Event()
            ready.record()
        else:             # the SSD round's packed output is a buffer the next round overwrites
            packed = out[:self.B].clone()
        stats.times["host"] = time.perf_counter() - t_round   # the host's time to launch the round (no waiting)
        self._launches += 1
        return dict(stats=stats, packed=packed, ready=ready, t_round=t_round, epoch=list(st.epoch),
                    active=[not d for d in st.done])

    def _finish(self, r):
        """Read a launched round's results back (the one host synchronization of a round) and commit them.
        Rows that finished, or were given to a new sequence by admit, since the launch take no part.
        Returns its stats, or None when no row took part (the pipeline's one extra round at the end)."""
        eng, st, stats = self.engine, self.st, r["stats"]
        if r["ready"] is not None:
            r["ready"].synchronize()
        packed = r["packed"].tolist()
        stats.active = [a and not st.done[b] and st.epoch[b] == r["epoch"][b] for b, a in enumerate(r["active"])]
        t_end = time.perf_counter()
        # the round's wall time: since its launch, or, pipelined, since the previous round's results
        start = r["t_round"] if self._last_end is None else max(self._last_end, r["t_round"])
        stats.times["round"] = t_end - start
        self._last_end = t_end
        if eng.profile:
            stats.spans.append(("round", r["t_round"], t_end, "round"))
        if not any(stats.active):
            return None
        if self.device_hits and stats.hit is None:   # this round's hits, decided on the device
            stats.hit = [bool(row[-1]) for row in packed]
            if all(h or not on for h, on in zip(stats.hit, stats.active)):
                stats.backup = None                       # no row took the backup
        eng._commit_host(st, self.req, packed, stats)
        self.est_before = copy.copy(self.est)
        self.est.update(stats)
        self.rounds.append(stats)
        return stats

    def generated(self):
        return [t[p:] for t, p in zip(self.st.tokens, self.st.prompt_lens)]

    def stop(self, rows, reason="stop"):
        ssd.stop_rows(self.st, rows, reason)
        self.engine._sync_active(self.st)

    def result(self) -> ssd.GenerationResult:
        return ssd.GenerationResult(tokens=self.generated(), finish_reasons=self.st.finish, rounds=self.rounds,
                                    mode=self.mode, k=self.req.k_used, prefill_time=self.prefill_time)

    @torch.no_grad()
    def admit(self, prompt, temperature=None) -> int:
        """Continuous batching: between rounds, put a new prompt into a free row (one that finished,
        or a padding row of the bucket) while the other rows go on undisturbed. Its prefill runs on
        that row's slice of the caches; its speculation-cache entries are invalidated. Returns the
        row index: its tokens are generated()[row]. Raises ValueError when no row is free."""
        eng, st, req = self.engine, self.st, self.req
        free = [b for b in range(self.B) if st.done[b]] + list(range(self.B, st.hist.shape[0]))
        if not free:
            raise ValueError(f"no free row: all {st.hist.shape[0]} rows of this batch bucket are generating")
        prompt = list(prompt)
        needed = len(prompt) + req.max_new_tokens + req.k_used + 2
        if not prompt or needed > eng.max_seq:
            raise ValueError(f"an admitted prompt needs 1..{eng.max_seq - req.max_new_tokens - req.k_used - 2} tokens "
                             f"here (the engine's max_seq), got {len(prompt)}")
        req.context_limit = max(req.context_limit, needed)
        st.context_limit.fill_(req.context_limit)
        b = free[0]
        if temperature is not None:
            req.t[b], req.t_draft[b] = float(temperature), float(temperature)
            req.send_q = req.send_q or float(temperature) > 0   # a sampling row needs the draft's q rows
        elif b >= self.B:   # a padding row takes the first row's sampling settings
            req.t[b], req.t_draft[b] = req.t[0], req.t_draft[0]
        dev, T = eng.device, len(prompt)
        tokens = torch.tensor([prompt], device=dev)
        positions = torch.arange(T, device=dev)[None]
        logits = eng.target.forward(tokens, positions, _RowCache(eng.tc, b))[:, -1]
        if self.mode != "ar":
            dd = eng.draft_device
            eng.draft.forward(tokens.to(dd), positions.to(dd), _RowCache(eng.dc, b))
        first = int(eng._sample(eng._probs(logits, req.t[b:b + 1], req), eng.rng["target"])[0])
        st.hist[b, :T] = tokens[0]
        st.hist[b, T] = first
        st.lens[b], st.last_n[b] = T + 1, 0
        if st.spec is not None:    # the old occupant's speculations must never match
            st.spec["j"][b] = -1
        rnd = eng.ssd_round if self.mode == "ssd" else None
        if rnd is not None:
            if req.send_q and not rnd.send_q:   # a sampling row joins a greedy run: q rows from now on
                rnd.enable_q()
            rnd.spec_j[b] = -1
        if st.looked_up is not None:
            st.looked_up[2][b] = False
        if b >= self.B:
            for _ in range(b + 1 - self.B):
                st.tokens.append([]), st.prompt_lens.append(0), st.done.append(True), st.finish.append(None)
                st.next_hit.append(False), st.epoch.append(0), st.active_host.append(False)
            self.B = b + 1
        st.tokens[b], st.prompt_lens[b], st.done[b], st.finish[b] = prompt + [first], T, False, None
        st.next_hit[b] = False
        eng._finish_check(st, b, req)
        st.epoch[b] += 1   # a round launched before this call must not commit into the new sequence
        self.engine._sync_active(st)
        return b


class _CfgOnly:
    """What ssd.make_request needs of a model: its config."""

    def __init__(self, cfg):
        self.cfg = cfg


class _Timer:
    """Adds a part's seconds to stats.times; when profiling, also its real span (perf_counter start,
    end, and the thread it ran on: the draft worker's parts overlap the main thread's verify)."""

    def __init__(self, stats, name, sync_devices, spans=False):
        self.stats, self.name, self.sync_devices, self.spans = stats, name, sync_devices, spans

    def __enter__(self):
        for d in self.sync_devices:
            torch.cuda.synchronize(d)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        for d in self.sync_devices:
            torch.cuda.synchronize(d)
        t1 = time.perf_counter()
        self.stats.times[self.name] = self.stats.times.get(self.name, 0.0) + t1 - self.t0
        if self.spans:
            track = "draft worker" if threading.current_thread().name.startswith("ssd-draft") else "main thread"
            self.stats.spans.append((self.name, self.t0, t1, track))
