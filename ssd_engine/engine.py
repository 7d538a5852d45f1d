"""The Engine: load once, generate many. It owns the devices, the models (re-laid by fast_model), the random
streams, the KV caches and the runners that replay their CUDA graphs; a generate call becomes a Run (run.py) of
rounds (rounds.py for AR and SD, ssd_round.py for SSD). ssd_fast.py is its front door."""
from __future__ import annotations

import time
from types import SimpleNamespace   # what ssd.make_request reads of a model: its config

import torch

import ssd
from ssd_engine import batch, policy
from ssd_engine import tp as tensor_parallel
from ssd_engine.fast_model import FastModel, Ops, bucket
from ssd_engine.graphs import Runner
from ssd_engine.run import Run, Timer
from ssd_engine.ssd_round import CONDITIONAL_NODES, SIDE_STREAM_PRIORITY, DraftWorker, SSDRound


class Engine:
    """`Engine(target, draft)` takes ssd.Transformer models (loaded on the CPU by ssd.load_model) and re-lays them on
    the device, or ready FastModels, or loader.Checkpoint handles (streamed from disk straight to the device in the
    engine's dtype, each tensor-parallel rank its slice).

    device / draft_device: where the target and the draft run (default: a GPU when there is one; the draft on the
    target's device). tp=N splits the target over N processes (GPUs from `device` on; tp.py), each building it with
    `tp_loader`; `close()` stops them. SSD's layout (ssd_round.py): one CUDA graph per round when the draft shares
    the target's device and the target is not split; else the worker layout, whose draft side runs on a worker
    thread when `concurrent` (default: when the draft has its own GPU). `draft_worker=True` asks for the worker layout
    on one device too. `concurrent` in the graph layout: the draft side on a second stream inside the graph (default
    on where graphs run). `pipeline=False` reads every round back before launching the next. `linear`: the
    projections of one-row decode steps (FastModel; "auto" times cuBLAS against the skinny Triton kernel per
    projection at load, with CUDA graphs)."""

    def __init__(self, target: ssd.Transformer, draft: ssd.Transformer | None = None, device=None,
                 dtype=None, cuda_graphs=True, max_seq=4096, log=print, concurrent=None, draft_device=None,
                 tp=1, tp_loader=None, pipeline=True, linear="auto", triton_ops=(), draft_worker=False):
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
        self.use_graphs = graphs = cuda_graphs and on_gpu
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
        # speculation tree) and the jit backup's. Each is seeded from the user's seed by ssd.derive_seed, so no two
        # streams advance in lockstep: the verifier's uniforms are independent of the numbers that made the
        # proposals, which exactness needs (seeding two GPUs alike would make them the same numbers). Each graph
        # registers the generators it draws from, so a replay draws fresh numbers from them.
        self.rng = ssd.random_streams(0, {"target": self.device, "draft": self.draft_device,
                                          "backup": self.draft_device})
        self.t_run.generators = (self.rng["target"],)
        if self.d_run is not None:
            self.d_run.generators = (self.rng["draft"], self.rng["backup"])
        self.max_seq = min(max_seq, target.cfg.max_position_embeddings)
        self.caches, self.calibrated, self.buffers, self.ssd_rounds, self._pinned = {}, {}, {}, {}, {}
        self.check_sync = self.profile = self.draft_failed = False
        self.log, self.pipeline = log, pipeline
        # SSD's layout (ssd_round.py) and whether its draft side runs concurrently with the verify
        shared = self.draft_device == self.device
        self.layout = "graph" if shared and tp == 1 and not draft_worker else "worker"
        if concurrent is None:
            concurrent = graphs if self.layout == "graph" else (on_gpu and not shared) or draft_worker
        self.concurrent = bool(concurrent)
        self.worker = (DraftWorker(self.draft_device if on_gpu else None, same_gpu=shared)
                       if self.layout == "worker" and self.concurrent and draft is not None else None)
        self._side_stream = None
        self.st = self.tc = self.dc = self.ssd_round = None   # the latest run's batch, caches and SSD round

    def close(self):
        """Stop a tensor-parallel target's worker processes (tp > 1); nothing to do otherwise."""
        if hasattr(self.target, "close"):
            self.target.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- generate -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, settings: ssd.Settings | None = None, on_round=None, profile=False,
                 **kw) -> ssd.GenerationResult:
        """Same arguments and result as ssd.generate (the models are the engine's: a Settings, or its fields as
        keywords), and k="auto" (see resolve_k_auto). With profile=True every part of a round is timed with a
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
        """Iterate over the new token ids of one prompt, a chunk per round, as they are accepted (the settings of
        generate). The chunks concatenated are generate's tokens."""
        run = self._start([list(prompt)], settings, **kw)
        sent = 0
        for _ in run.rounds_iter():
            tokens = run.generated()[0]
            if len(tokens) > sent:
                yield tokens[sent:]
                sent = len(tokens)

    def start(self, prompts, settings: ssd.Settings | None = None, **kw) -> Run:
        """A generation in progress, round by round: `for stats in run.rounds_iter(): ...`, with `run.admit(prompt)`
        between rounds to add a sequence (continuous batching), `run.generated()`, `run.stop(rows)` and
        `run.result()`. Same settings as generate."""
        return self._start(prompts, settings, **kw)

    def _start(self, prompts, settings: ssd.Settings | None = None, profile=False, **kw) -> Run:
        s = ssd.Settings.of(settings, **kw)
        mode = s.mode
        if mode != "ar" and self.draft is None:
            raise ValueError(f"mode {mode} needs a draft model: build the Engine with one")
        B = 1 if prompts and isinstance(prompts[0], int) else len(prompts)
        # Choices that change the output never depend on a timing unless asked (k="auto" measures, and says
        # what it chose): the same seed and arguments give the same tokens on the same machine.
        s, _ = self.resolve_k_auto(B, s)
        if mode == "ssd" and s.fan_out == "auto" and s.fan_out_budget is None:
            hides = self.layout == "graph" and self.use_graphs and self.concurrent
            s = ssd.Settings.of(s, fan_out_budget=policy.ssd_budget(s.k, hides))
        req = ssd.make_request(SimpleNamespace(cfg=self.target.cfg), prompts,
                               SimpleNamespace(cfg=self.draft.cfg) if self.draft else None,
                               s, max_context=self.max_seq)
        for site, gen in self.rng.items():    # after any measuring above, which may have drawn
            gen.manual_seed(ssd.derive_seed(s.seed, site))
        self.profile = profile
        Bb = bucket(B)
        req.send_q = bool((req.t > 0).any())   # at temperature 0 the verify needs no q rows
        req.draft_greedy = not req.send_q and not bool((req.t_draft > 0).any())   # (host values: no sync)
        buf = self.batch_buffers(Bb, req.k)    # req's device tensors are the persistent buffers (graphs read them)
        req.t = buf["t"].copy_(torch.cat([req.t, torch.zeros(Bb - B)]))
        req.t_draft = buf["t_draft"].copy_(torch.cat([req.t_draft, torch.zeros(Bb - B)]))
        branches = (sum(req.fan) if req.fan else req.budget) if mode == "ssd" else 0
        self.tc = self.cache(self.target, "target", Bb)
        self.dc = self.cache(self.draft, "draft", Bb, branches, req.k) if mode != "ar" else None
        est = ssd.Estimates(k=req.k)
        if mode == "ssd":   # the batch-aware backup weighs the jit backup's cost by a rule, not a timing
            est.jit_cost_ratio = policy.jit_cost_ratio(self.target.cfg, self.draft.cfg, req.k, Bb, self.on_gpu)
            # a graph without conditional nodes launches the jit backup in every round
            est.jit_always = self.use_graphs and not profile and not CONDITIONAL_NODES
        t0 = time.perf_counter()
        self.st = st = batch.prefill(self, req, buf, mode)
        prefill_time = time.perf_counter() - t0
        self.ssd_round = self._prepare_ssd_round(st, req, est, Bb, branches) if mode == "ssd" else None
        return Run(self, st, req, est, mode, prefill_time, self.ssd_round)

    def resolve_k_auto(self, batch: int, settings: ssd.Settings) -> tuple[ssd.Settings, str | None]:
        """`k="auto"`: the settings with the measured K (policy.choose_lookahead) and, for SSD with an automatic
        fan-out and no budget given, the speculation budget whose draft side fits the verify; and a line saying what
        was chosen (None when nothing was measured). The one place k="auto" is resolved (generate and the CLI)."""
        s = settings
        if s.k != "auto":
            return s, None
        if s.mode == "ar" or self.draft is None:
            return ssd.Settings.of(s, k=1), None
        k, budget, table = self.choose_lookahead(batch, s.mode)
        fan_out_budget = s.fan_out_budget
        if s.mode == "ssd" and s.fan_out == "auto" and fan_out_budget is None:
            # choose_lookahead times a tree step by a draft step over N tokens (a proxy that ran low on H200s at
            # batch 4 and 16); with the draft side on a worker beside the verify, time the real one for this K
            overlapped = self.worker is not None and self.on_gpu
            fan_out_budget = self.fit_budget(batch, k, s.saguaro_c, s.top_k, s.top_p) if overlapped else budget
        row = table[k - 1]
        line = (f"--k auto: K={k}" + (f", speculation budget {fan_out_budget}" if s.mode == "ssd" and fan_out_budget
                                      else "")
                + f" (verify {row['verify_ms']:.2f} ms, drafting {row['draft_ms']:.2f} ms"
                + (", hidden behind the verify)" if row["hidden"] else ", the target waits)"))
        return ssd.Settings.of(s, k=k, fan_out_budget=fan_out_budget), line

    def choose_lookahead(self, batch=1, mode="ssd", **kw):
        return policy.choose_lookahead(self, batch, mode, **kw)

    def fit_budget(self, batch, k, c=1.0, top_k=0, top_p=1.0, **kw) -> int:
        return policy.fit_budget(self, batch, k, c, top_k, top_p, **kw)

    def _prepare_ssd_round(self, st, req, est, Bb, branches) -> SSDRound:
        """The SSD round of this shape (one per batch bucket, K, branches, fan-out cap), begun on this batch; in the
        graph layout on a GPU its CUDA graphs are captured before the first round: one per backup the run may
        take."""
        f_cap = min(max(req.fan) if req.fan else branches, self.target.cfg.vocab_size - 1)
        key = (Bb, req.k, branches, f_cap)
        if key not in self.ssd_rounds:
            self.ssd_rounds[key] = SSDRound(self, Bb, req.k, branches, req.send_q, f_cap, self.layout)
        rnd = self.ssd_rounds[key]
        rnd.begin(st, req)
        if self.layout == "graph" and self.use_graphs and not self.profile:
            for backup in (("fast", "jit") if req.backup == "auto" else (req.backup,)):
                rnd.prepare(backup, self.ssd_fan(req, est, f_cap), self.concurrent)
        return rnd

    def ssd_fan(self, req, est, f_cap):
        """This round's fan-out: the fixed one, or Saguaro's geometric one from the running acceptance estimate."""
        fan = req.fan or ssd.geometric_fan_out(req.k, req.budget, est.accept_rate, req.miss_exponent)
        return [min(f, f_cap) for f in fan]

    def draft_lost(self, error):
        """Faults: without its draft the run finishes as AR on the target; nothing generated is lost."""
        if not self.draft_failed:
            self.log(f"ssd_fast: the draft failed ({type(error).__name__}: {error}); "
                     "finishing with the target alone (AR), the tokens so far are kept")
        self.draft_failed = True

    # --- buffers, streams, timing ---------------------------------------------------------------

    def cache(self, model, name, batch, branches=0, k=0):
        """A model's KV cache for a batch bucket (and SSD's tree buffers), made once and kept."""
        key = (name, batch, branches, k)
        if key not in self.caches:
            self.caches[key] = model.new_cache(batch, self.max_seq + 2 * k + 2, branches, k)
        return self.caches[key]

    def batch_buffers(self, Bb, k):
        """The sequence state of a batch bucket as persistent device tensors (batch.new_buffers): the SSD round's
        CUDA graph reads and writes them in place, so they outlive a generate call."""
        if (Bb, k) not in self.buffers:
            self.buffers[(Bb, k)] = batch.new_buffers(Bb, self.max_seq, k, self.device, self.draft_device)
        return self.buffers[(Bb, k)]

    def pinned(self, shape, i):
        """One of two pinned host buffers per shape for a round's read-back (round i uses buffer i % 2: pipelined,
        round i + 2 is launched only after round i was read). No allocation per round."""
        key = tuple(shape)
        if key not in self._pinned:
            self._pinned[key] = [torch.empty(key, dtype=torch.long, pin_memory=True) for _ in range(2)]
        return self._pinned[key][i % 2]

    def side_stream(self):
        """The second CUDA stream the graph layout's draft side is captured on (one per engine)."""
        if self._side_stream is None:   # high priority: its short kernels go first while the verify's long ones wait
            self._side_stream = torch.cuda.Stream(self.device, priority=SIDE_STREAM_PRIORITY)
        return self._side_stream

    def timed(self, stats, name, devices=None):
        """Time a part of the round; profile=True synchronizes `devices` (default: both) around it."""
        devices = devices or {self.device, self.draft_device}
        return Timer(stats, name, devices if self.profile and self.on_gpu else (), self.profile)

    def time(self, fn, reps=3):
        """Seconds per call of fn (after one warm-up call), the devices synchronized around."""
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

