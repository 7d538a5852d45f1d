"""SSD's round (ssd.ssd_round) on the device, written once for every layout of the fast engine.

A round is three parts, each a function of persistent device tensors that it reads and writes in place:

  select       the proposal for this round: the last round's outcome key (n, r) looked up in the speculation
               cache; rows that miss take the backup, merged by selection (`where`), so nothing is decided on
               the host: the cheap n-gram proposal, or the jit backup (K draft steps, launched whenever it is
               the round's backup, its result kept only where a row missed);
  draft side   the glue pass over [r, s1..sK], the fork (the top-F_max candidates of every outcome j, picked
               into the N branches by a slot table: the fan-out is device data, not shapes) and the K tree
               steps; writes the next round's speculation cache;
  target side  the target's pass over [r, s1..sK], the exact verify (greedy when no row samples: then no q
               rows exist at all), the commit into the history, and the packing of what the host reads.

Layouts (`layout`):
  "graph"   the draft shares the target's device and the target is not split: on a GPU the whole round is ONE
            CUDA graph, the draft side a second stream inside it when `concurrent` (forked after select, joined at
            the end of the round: only the next round reads what it wrote). On a CPU the parts run in order.
  "worker"  the draft on its own device, or a tensor-parallel target (whose forwards its worker processes mirror):
            the speculation cache and the draft side live on the draft's device; the draft side is its own graph
            there, run by a worker thread on its own stream when `concurrent` (DraftWorker), in line otherwise; the
            target side is its own graph, through the target's runner. The handshake crosses devices: the outcome
            key and [r, s1..sK] one way, the looked-up chain (and its q rows when some row samples) the other. It
            also runs with both sides on one GPU (what the tests use where only one GPU exists).
Nothing in a round needs the host, so rounds are pipelined like AR and SD: round n+1 is launched before round n is
read back. A graph is captured before the first round (graphs.capture: its warm-ups are undone).

Exactness is the reference's (ssd.py): the same rule for every draw, each draw from its site's stream
(target: the verify; draft: the tree; backup: the jit backup).
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import ssd
from ssd_engine import batch, graphs, rounds, sampling
from ssd_engine.fast_model import on_device

# CUDA graph conditional nodes: the jit backup would run only in rounds where a row missed. Opt-in
# (SSD_CONDITIONAL_NODES=1) where torch has them: the torch this engine was measured with (2.11) has not, so this
# path has not run on a GPU; without it the jit backup runs in every round and is kept where a row missed.
CONDITIONAL_NODES = os.environ.get("SSD_CONDITIONAL_NODES") == "1" and \
    hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")
SIDE_STREAM_PRIORITY = -1   # the draft side's stream on one GPU: high priority (CUDA: lower numbers are higher)


class SSDRound:
    """The state and the parts of SSD's round for one batch bucket and one shape (K, N branches, q rows or not).
    `eng` is the Engine (its models, caches, ops, random streams, runners); `begin` hands it a batch and request."""

    def __init__(self, eng, Bb: int, k: int, branches: int, send_q: bool, f_cap: int, layout: str = "graph"):
        td, dd, V = eng.device, eng.draft_device, eng.target.cfg.vocab_size
        self.eng, self.Bb, self.k, self.N, self.send_q, self.V, self.layout = eng, Bb, k, branches, send_q, V, layout
        self.f_cap = max(1, f_cap)               # the largest fan-out at one outcome (top-k width of the fork)
        self.split = dd != td                     # the handshake crosses devices
        on_t, on_d = dict(dtype=torch.long, device=td), dict(dtype=torch.long, device=dd)
        # the speculation cache, on the draft's device: branch i of row b holds key (spec_j, spec_cand) -> K tokens
        self.spec_j = torch.full((Bb, branches), -1, **on_d)
        self.spec_cand = torch.zeros(Bb, branches, **on_d)
        self.spec_chains = torch.zeros(Bb, branches, k, **on_d)
        # this round's proposal, from the cache or the backup, and where it came from (the target's device)
        self.prop = torch.zeros(Bb, k, **on_t)
        self.hit = torch.zeros(Bb, dtype=torch.bool, device=td)
        self.any_miss = torch.zeros((), dtype=torch.bool, device=td)
        self.m1, self.r = torch.zeros(Bb, **on_t), torch.zeros(Bb, 1, **on_t)
        self.packed = torch.zeros(Bb, k + 3, **on_t)    # [n, the K + 1 new tokens, hit] per row
        # what the draft side reads, on the draft's device (the same tensors when it shares the target's)
        self.d_m1, self.d_r, self.d_prop = ((torch.zeros_like(t, device=dd) for t in (self.m1, self.r, self.prop))
                                            if self.split else (self.m1, self.r, self.prop))
        self.d_two = torch.zeros(Bb, 2, **on_d)          # the jit backup's first tokens (the one before r, and r)
        self.jit_s = torch.zeros(Bb, k, **on_d)          # the jit backup's chains (a conditional node writes them)
        # the fan-out as data: branch i answers outcome slot_j[i] (-1: unused) with its slot_rank[i]-th candidate
        self.slot_j, self.slot_rank = torch.full((branches,), -1, **on_d), torch.zeros(branches, **on_d)
        self.fan_depth = torch.zeros(k + 1, **on_d)      # F per outcome (Saguaro reads it when C < 1 and F adapts)
        self.spec_q = self.prop_q = self.jit_q = None
        self.draft_greedy = False   # every row's draft temperature is 0 and no q rows: the draft takes its argmax
        if send_q:
            self.enable_q()
        self.graphs, self.fan, self._fan_tables = {}, None, {}
        self.st = self.req = None

    def enable_q(self):
        """q rows for sampling rows (a row admitted at temperature > 0 into a greedy run): the cache built
        without them can no longer be used, so every row misses once."""
        td, dd = self.eng.device, self.eng.draft_device
        self.spec_q = torch.zeros(self.Bb, self.N, self.k, self.V, device=dd)
        self.prop_q = torch.zeros(self.Bb, self.k, self.V, device=td)
        self.jit_q = torch.zeros(self.Bb, self.k, self.V, device=dd)
        self.spec_j.fill_(-1)
        self.send_q, self.draft_greedy = True, False

    def begin(self, st, req):
        """A new generation on batch `st`: no speculation matches, and the fan-out tables are rewritten at its first
        round (so a reused engine runs every call as a fresh one would)."""
        self.st, self.req = st, req
        self.spec_j.fill_(-1)
        self.hit.fill_(False)
        self.fan = None
        if req.send_q and not self.send_q:
            self.enable_q()
        self.send_q, self.draft_greedy = req.send_q, req.draft_greedy

    def forget(self, row):
        """Row `row` was handed to a new sequence (admit): its old speculations must never match."""
        self.spec_j[row] = -1

    def state(self):
        """The tensors a round writes that a later round reads (saved and restored around a capture's warm-ups)."""
        st = self.st
        out = [st.hist, st.lens, st.active, st.last_n, self.spec_j, self.spec_cand, self.spec_chains, self.prop,
               self.hit, self.m1, self.r, self.packed, self.any_miss, self.jit_s, self.d_two]
        if self.split:
            out += [self.d_m1, self.d_r, self.d_prop]
        return out + ([self.spec_q, self.prop_q, self.jit_q] if self.send_q else [])

    # --- the fan-out as device data ------------------------------------------------------------------

    def set_fan(self, fan):
        """Point the slot tables and Saguaro's F per outcome (`fan_depth`) at `fan` (F_j <= f_cap per outcome j; their
        sum fills at most N branches). A table is made once per distinct fan-out, in pinned host memory, and copied in
        on the round's stream: no host synchronization, and the round in flight reads the old table before the copy
        lands. All three are written together, whether or not this call's Saguaro reads fan_depth, so the device state
        is a function of `self.fan` alone."""
        fan = tuple(fan)
        if fan == self.fan:
            return
        if fan not in self._fan_tables:
            slots = [(j, rank) for j, f in enumerate(fan) for rank in range(f)][:self.N]
            slots += [(-1, 0)] * (self.N - len(slots))
            host = torch.tensor(slots, dtype=torch.long).T.contiguous(), torch.tensor(fan, dtype=torch.long)
            if self.eng.on_gpu:   # pinned, so that the copies below never synchronize (kept alive in the table)
                host = tuple(t.pin_memory() for t in host)
            self._fan_tables[fan] = (host[0][0], host[0][1], host[1], host)
        j, rank, depth, _ = self._fan_tables[fan]
        self.slot_j.copy_(j, non_blocking=True)
        self.slot_rank.copy_(rank, non_blocking=True)
        self.fan_depth.copy_(depth, non_blocking=True)
        self.fan = fan

    def saguaro_f(self, d, fan):
        """Saguaro's F at outcome d for a sampling step: none at C >= 1; a host int when the fan-out is fixed
        (req.fan); the device value when it adapts (so the graph need not change with it)."""
        if self.req.c >= 1.0:
            return 0
        return fan[d] if self.req.fan is not None else self.fan_depth[d]

    # --- select ----------------------------------------------------------------------------------------

    def select(self, backup: str, fan):
        """This round's proposal: the cached speculation of the last outcome, or the backup where a row missed.
        Inside a CUDA graph the jit backup is a conditional node: its K draft steps run only when a row missed."""
        hit, cached, cached_q = self.lookup()
        if backup == "jit" and CONDITIONAL_NODES and torch.cuda.is_current_stream_capturing():
            self.any_miss.copy_((~hit & self.st.active).any())
            graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
            graph.begin_capture_to_if_node(self.any_miss)
            try:
                self.jit_into_buffers(fan)
            finally:
                graph.end_capture_to_conditional_node()
            s, qs = self._on_target(self.jit_s, self.jit_q)
        else:
            s, qs = self.backup(backup, fan)
        self.merge(hit, cached, cached_q, s, qs)

    def lookup(self):
        """The last outcome key (n, r) of each row among the cached keys, on the draft's device: (hit [Bb], the cached
        chain [Bb, K], its q rows or None), on the target's."""
        st, dd = self.st, self.eng.draft_device
        m1 = batch.base(st, self.req, self.eng.tc.slots)
        self.m1.copy_(m1)
        self.r.copy_(st.hist.gather(1, m1[:, None]))
        last_n, r = st.last_n[:, None], self.r
        if self.split:   # the key to the draft's device, in one copy
            key = torch.cat([last_n, r], 1).to(dd)
            last_n, r = key[:, :1], key[:, 1:]
        match = (self.spec_j == last_n) & (self.spec_cand == r)
        idx = match.int().argmax(1)
        rows = torch.arange(self.Bb, device=dd)
        hit, chain, q = self._on_target(match.any(1), self.spec_chains[rows, idx],
                                        self.spec_q[rows, idx] if self.send_q else None)
        return hit & st.active, chain, q

    def backup(self, kind: str, fan):
        """The backup proposal for every row (kept only where a row missed): the jit backup, or the n-gram one
        (deterministic, so verified with q = one-hot)."""
        if kind == "jit":
            return self._on_target(*self.jit_into_buffers(fan))
        s = rounds.ngram_proposal(self.st, self.st.lens - 1, self.k)
        return s, (ssd.deterministic_q(s, self.V) if self.send_q else None)

    def jit_into_buffers(self, fan):
        """K draft steps from r (site "backup"), on the draft's device, into jit_s (and jit_q). The first step also
        re-reads the token before r, so a row whose last round accepted all K needs no catch-up pass."""
        pos = torch.stack([self.m1 - 1, self.m1], 1)
        if self.layout == "worker":   # a graph of its own on the draft's device: its inputs copied there first
            self.d_two.copy_(self.st.hist.gather(1, pos))
            if self.split:
                self.d_m1.copy_(self.m1)
            key = ("ssd-jit", id(self), self.graph_key("jit", fan, False))
            self.eng.d_run.run(key, lambda: self._jit_steps(fan, self.d_two))
        else:
            self._jit_steps(fan, self.st.hist.gather(1, pos))
        return self.jit_s, self.jit_q

    def _jit_steps(self, fan, tokens):
        eng, m1 = self.eng, self.d_m1
        pos = torch.stack([m1 - 1, m1], 1)
        for i in range(self.k):
            logits = eng.draft.forward(tokens, pos, eng.dc)[:, -1]
            s, q = self.draft_token(logits, i, fan, "backup")
            self.jit_s[:, i] = s
            if self.send_q:
                self.jit_q[:, i] = q
            tokens, pos = s[:, None], (m1 + 1 + i)[:, None]

    def merge(self, hit, cached, cached_q, s, qs):
        self.prop.copy_(torch.where(hit[:, None], cached, s))
        if self.send_q:
            self.prop_q.copy_(torch.where(hit[:, None, None], cached_q, qs))
        self.hit.copy_(hit)

    def _on_target(self, *tensors):
        """Draft-device tensors on the target's device (a no-op when they share one)."""
        return tuple(None if t is None else t.to(self.eng.device) for t in tensors)

    # --- the draft side ----------------------------------------------------------------------------------

    def handshake(self):
        """[r, s1..sK] and the positions, to the draft's device (nothing to do when it shares the target's)."""
        if self.split:
            for d, t in ((self.d_m1, self.m1), (self.d_r, self.r), (self.d_prop, self.prop)):
                d.copy_(t)

    def draft_side(self, fan, stats=None):
        """Glue pass, fork and K tree steps: the next round's speculation cache (paper, section 3). `stats`: time
        the two parts (eager rounds)."""
        with self._timed(stats, "glue"):
            fork = self.glue_and_fork()
        with self._timed(stats, "tree"):
            self.tree(fan, *fork)

    def glue_and_fork(self):
        """The draft reads [r, s1..sK] once (writing its KV for whatever prefix the target accepts); row j of its
        output guesses the recovery token of outcome n = j, and its top F_j tokens are that outcome's candidates
        (Saguaro's fan-out, section 4.1), picked into the N branches by the slot table."""
        eng, K, N, m1 = self.eng, self.k, self.N, self.d_m1
        glue = eng.draft.forward(torch.cat([self.d_r, self.d_prop], 1),
                                 m1[:, None] + torch.arange(K + 1, device=m1.device), eng.dc)
        # for j < K, s_{j+1} is no outcome at j: had the target drawn it, it would have been accepted
        glue[:, :K].scatter_(-1, self.d_prop[..., None], float("-inf"))
        top = glue.topk(self.f_cap, dim=-1).indices                       # [Bb, K + 1, F_max]
        branch_j = self.slot_j.clamp(min=0)
        cand = top[:, branch_j, self.slot_rank]                           # [Bb, N]
        return cand, branch_j[None].expand(self.Bb, N).contiguous()

    def tree(self, fan, cand, glue_j):
        """K draft steps for all N branches at once (tree attention: each sees the trunk, its glue and its chain)."""
        eng, K, m1 = self.eng, self.k, self.d_m1
        tokens = cand
        for depth in range(K):
            logits = eng.draft.forward(tokens, m1[:, None] + glue_j + 1 + depth, eng.dc, tree=(m1, glue_j, depth))
            # Saguaro sampling: a token at depth d is proposal d+1, decided by outcome n = d
            s, q = self.draft_token(logits, depth, fan, "draft")
            self.spec_chains[:, :, depth] = s
            if self.send_q:
                self.spec_q[:, :, depth] = q
            tokens = s
        self.spec_cand.copy_(cand)
        self.spec_j.copy_(self.slot_j[None].expand(self.Bb, self.N))

    def draft_token(self, logits, d, fan, site):
        """The draft's token (and q' row) at step d: its argmax when every row drafts greedily and no q rows are
        kept (what sampling at temperature 0 gives, without drawing noise); else sampling.draft_sample."""
        if self.draft_greedy:
            return logits.argmax(-1), None
        eng = self.eng
        return sampling.draft_sample(eng.ops, logits, self.req.t_draft, self.req, self.saguaro_f(d, fan),
                                     eng.rng[site], self.f_cap)

    # --- the target side ---------------------------------------------------------------------------------

    def target_side(self):
        """The target's pass over [r, s1..sK], the exact verify and the commit (history, lengths, stops)."""
        eng, st, req, K = self.eng, self.st, self.req, self.k
        dev = self.m1.device
        logits = eng.target.forward(torch.cat([self.r, self.prop], 1),
                                    self.m1[:, None] + torch.arange(K + 1, device=dev), eng.tc)
        if self.send_q:   # Leviathan et al. 2023, Thm. 1 (with Saguaro's q', paper section 4.2)
            p = sampling.probs(logits, req.t, req).contiguous()
            u = torch.rand(self.Bb, K, device=dev, generator=eng.rng["target"])
            noise = ssd.exponential_noise((self.Bb, self.V), eng.rng["target"], dev)
            n, r_new = eng.ops.verify(p, self.prop_q, self.prop, u, noise)
        else:   # every row greedy: p and q are one-hot, so verify keeps the leading matches of the argmax
            best = logits.argmax(-1)
            n = (best[:, :K] == self.prop).long().cumprod(1).sum(1)
            r_new = best.gather(1, n[:, None])[:, 0]
        new = rounds.new_tokens(self.prop, n, r_new)
        batch.commit_device(st, n, new, req.k_used)
        self.packed.copy_(batch.packed(n, new, self.hit))

    # --- one round ----------------------------------------------------------------------------------

    def round(self, backup: str, fan, concurrent: bool):
        """The graph layout's round: the three parts in order; with `concurrent` (on a GPU) the draft side on its own
        stream, forked after select and joined at the end (the target side reads nothing the draft side writes; the
        next round does)."""
        self.select(backup, fan)
        if concurrent:
            main = torch.cuda.current_stream()
            side = self.eng.side_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.draft_side(fan)
            self.target_side()
            main.wait_stream(side)
        else:
            self.draft_side(fan)
            self.target_side()

    def graph_key(self, backup, fan, concurrent):
        """What a captured round depends on besides the shapes of this object: the backup, concurrency, whether
        q rows exist, and the request's constants (a fixed Saguaro fan-out, C, top-k, top-p)."""
        req = self.req
        fixed = tuple(fan) if req.fan is not None and req.c < 1.0 else None
        return backup, concurrent, self.send_q, self.draft_greedy, fixed, req.c, req.top_k, req.top_p

    def prepare(self, backup, fan, concurrent):
        """The graph layout's round for `backup` as one CUDA graph, captured now (before the first round is timed)
        unless it exists."""
        self.set_fan(fan)
        key = self.graph_key(backup, fan, concurrent)
        if key not in self.graphs:
            eng, t0 = self.eng, time.perf_counter()
            with on_device(eng.device):
                self.graphs[key], _ = graphs.capture(lambda: self.round(backup, fan, concurrent), eng.t_run.pool,
                                                     [eng.rng[s] for s in ssd.SITES], self.state())
                torch.cuda.synchronize(eng.device)
            eng.log(f"ssd_fast: captured the SSD round (batch {self.Bb}, K={self.k}, {self.N} branches) as one CUDA "
                    f"graph in {time.perf_counter() - t0:.1f} s")
        return self.graphs[key]

    def launch(self, stats, backup: str, fan):
        """Run (or replay) one round; returns the packed device tensor [Bb, K + 3] the host reads."""
        eng = self.eng
        if self.layout == "graph" and eng.use_graphs and not eng.profile:
            self.prepare(backup, fan, eng.concurrent).replay()
        else:
            self.set_fan(fan)
            self._parts(stats, backup, fan)
        return self.packed

    def _parts(self, stats, backup, fan):
        """The parts one by one (the worker layout; the graph layout on a CPU or when profiling), each timed under
        the reference's names. The worker layout runs the draft side and the target side as graphs of their own,
        the draft side on the worker thread when there is one. If the draft fails, the round still verifies (with
        the cheap backup where the jit one failed) and the run goes on as AR."""
        eng = self.eng
        with eng.timed(stats, "lookup"):
            found = self.lookup()
        with eng.timed(stats, "backup"):
            try:
                proposal = self.backup(backup, fan)
            except Exception as e:
                if backup != "jit":
                    raise
                eng.draft_lost(e)
                stats.backup = "fast"
                proposal = self.backup("fast", fan)
        self.merge(*found, *proposal)
        self.handshake()
        job = None if eng.draft_failed else self._submit_draft_side(fan, stats)
        with eng.timed(stats, "verify", [eng.device]):
            if self.layout == "worker":
                eng.t_run.run(("ssd-target", id(self), self.send_q, self.req.top_k, self.req.top_p),
                              lambda: self.target_side(), state=self._target_state())
            else:
                self.target_side()
        with eng.timed(stats, "wait_draft"):
            self._join_draft_side(job)

    def _target_state(self):
        st = self.st
        return [st.hist, st.lens, st.active, st.last_n, self.packed]

    def _submit_draft_side(self, fan, stats):
        """The draft side: now (in line), or on the worker thread's stream (it waits for select on the main stream)."""
        eng = self.eng

        def run():
            if self.layout == "worker" and eng.use_graphs and not eng.profile:
                eng.d_run.run(("ssd-draft", id(self), self.graph_key("-", fan, False)), lambda: self.draft_side(fan))
            else:
                self.draft_side(fan, stats if eng.profile or not eng.on_gpu else None)
        if eng.worker is None:
            try:
                run()
            except Exception as e:
                return e
            return None
        return eng.worker.submit(run)

    def _join_draft_side(self, job):
        """Wait for the draft side (its launch, on a GPU); the main stream then waits for its stream. A failure:
        nothing matches any more and the run goes on as AR."""
        eng = self.eng
        try:
            error = job.result() if hasattr(job, "result") else job
        except Exception as e:
            error = e
        if isinstance(error, Exception):
            eng.draft_lost(error)
            self.spec_j.fill_(-1)
        elif eng.worker is not None:
            eng.worker.hand_over()

    def _timed(self, stats, name):
        return self.eng.timed(stats, name, [self.eng.draft_device]) if stats is not None else contextlib.nullcontext()


class DraftWorker:
    """The draft side on its own thread: on a GPU it launches on its own CUDA stream, so its kernels run while the
    target's verify runs; on a CPU it computes next to the main thread. Inputs are handed over with an event (the
    draft stream waits for the main stream), outputs the other way round (hand_over)."""

    def __init__(self, device, same_gpu=False):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssd-draft")
        self.device = device
        priority = SIDE_STREAM_PRIORITY if same_gpu else 0
        self.stream = torch.cuda.Stream(device, priority=priority) if device is not None else None

    def submit(self, fn):
        if self.stream is None:
            return self.pool.submit(_no_grad_call, fn)
        ready = [torch.cuda.current_stream(self.device).record_event()]
        return self.pool.submit(self._on_stream, ready, fn)

    def _on_stream(self, ready, fn):
        with on_device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready.pop())   # the event is freed here, before the result is handed back
            return _no_grad_call(fn)

    def hand_over(self):
        """The main stream waits for the draft stream before it reads the draft's outputs."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


def _no_grad_call(fn):
    with torch.no_grad():
        return fn()
