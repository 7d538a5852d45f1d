"""SSD's round with the host out of the way: the fast engine's SSD round when the draft shares the target's
device (one GPU, or the CPU) and the target is not tensor-parallel.

A round is three parts, each a function of persistent device tensors that it reads and writes in place:

  select       the proposal for this round: the last round's outcome key (n, r) looked up in the speculation
               cache; rows that miss take the backup, merged by selection (`where`), so nothing is decided on
               the host: the cheap n-gram proposal, or the jit backup (K draft steps, always launched when
               asked for, its result kept only where a row missed);
  draft side   the glue pass over [r, s1..sK], the fork (the top-F_max candidates of every outcome j, picked
               into the N branches by a slot table: the fan-out is device data, not shapes) and the K tree
               steps; writes the next round's speculation cache;
  target side  the target's pass over [r, s1..sK], the exact verify (greedy when no row samples: then no q
               rows exist at all), the commit into the history, and the packing of what the host reads.

On a GPU the whole round is ONE CUDA graph; with `concurrent` the draft side is a second stream inside it,
forked after `select` and joined at the end of the round (only the next round reads what it wrote), so the
draft builds the next cache while the target verifies. Nothing in a round needs the host, so rounds are
pipelined like AR and SD: round n+1 is launched before round n is read back. The graph is captured before the first round, keyed by shapes (batch bucket, K,
branches, which backup, whether q rows exist, concurrency); the warm-up runs that precede a capture are undone
(the state is restored, the random streams rewound), so capturing never changes a run.

Exactness is the reference's (ssd.py): the same rule for every draw, each draw from its site's stream
(target: the verify; draft: the tree; backup: the jit backup).
"""
from __future__ import annotations

import os
import time

import torch

import ssd

# CUDA graph conditional nodes: the jit backup would run only in rounds where a row missed. Opt-in
# (SSD_CONDITIONAL_NODES=1) where torch has them: the torch this engine was measured with (2.11) has not, so this
# path has not run on a GPU; without it the jit backup runs in every round and is kept where a row missed.
CONDITIONAL_NODES = os.environ.get("SSD_CONDITIONAL_NODES") == "1" and \
    hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


class SSDRound:
    """The state and the parts of SSD's round for one batch bucket and one shape (K, N branches, q rows or
    not). `eng` is the ssd_fast.Engine (its models, caches, ops, random streams); `st` its Batch."""

    def __init__(self, eng, Bb: int, k: int, branches: int, send_q: bool, f_cap: int):
        dev, V = eng.device, eng.target.cfg.vocab_size
        self.eng, self.Bb, self.k, self.N, self.send_q, self.V = eng, Bb, k, branches, send_q, V
        self.f_cap = max(1, f_cap)               # the largest fan-out at one outcome (top-k width of the fork)
        long = dict(dtype=torch.long, device=dev)
        # the speculation cache: branch i of row b holds key (spec_j, spec_cand) -> K tokens (and q rows)
        self.spec_j = torch.full((Bb, branches), -1, **long)
        self.spec_cand = torch.zeros(Bb, branches, **long)
        self.spec_chains = torch.zeros(Bb, branches, k, **long)
        # this round's proposal, from the cache or the backup, and where it came from
        self.prop = torch.zeros(Bb, k, **long)
        self.hit = torch.zeros(Bb, dtype=torch.bool, device=dev)
        self.any_miss = torch.zeros((), dtype=torch.bool, device=dev)
        self.jit_s = torch.zeros(Bb, k, **long)    # the jit backup's chains (a conditional graph node writes them)
        self.m1, self.r = torch.zeros(Bb, **long), torch.zeros(Bb, 1, **long)
        # the fan-out as data: branch i answers outcome slot_j[i] (-1: unused) with its slot_rank[i]-th candidate
        self.slot_j, self.slot_rank = torch.full((branches,), -1, **long), torch.zeros(branches, **long)
        self.fan_depth = torch.zeros(k + 1, **long)   # F per outcome (Saguaro reads it when C < 1 and F adapts)
        self.packed = torch.zeros(Bb, k + 3, **long)    # [n, the K + 1 new tokens, hit] per row
        self.spec_q = self.prop_q = self.jit_q = None
        self.draft_greedy = False   # every row's draft temperature is 0 and no q rows: the draft takes its argmax
        if send_q:
            self.enable_q()
        self.graphs, self.fan, self._fan_tables = {}, None, {}

    def enable_q(self):
        """q rows for sampling rows (a row admitted at temperature > 0 into a greedy run): the cache built
        without them can no longer be used, so every row misses once."""
        dev = self.eng.device
        self.spec_q = torch.zeros(self.Bb, self.N, self.k, self.V, device=dev)
        self.prop_q = torch.zeros(self.Bb, self.k, self.V, device=dev)
        self.jit_q = torch.zeros(self.Bb, self.k, self.V, device=dev)
        self.spec_j.fill_(-1)
        self.send_q, self.draft_greedy = True, False

    def reset(self):
        """A new generation: no speculation matches, and the fan-out tables are rewritten at its first round."""
        self.spec_j.fill_(-1)
        self.hit.fill_(False)
        self.fan = None

    def state(self):
        """The tensors a round writes that a later round reads (saved and restored around a capture's warm-up;
        the KV caches need no saving: a slot past a row's committed length is always written before read)."""
        st = self.eng.st_buffers(self.Bb)
        out = [st["hist"], st["lens"], st["active"], st["last_n"], self.spec_j, self.spec_cand, self.spec_chains,
               self.prop, self.hit, self.m1, self.r, self.packed, self.any_miss, self.jit_s]
        return out + ([self.spec_q, self.prop_q, self.jit_q] if self.send_q else [])

    # --- the fan-out as device data ------------------------------------------------------------------

    def set_fan(self, fan):
        """Point the slot tables and Saguaro's F per outcome (`fan_depth`) at `fan` (F_j <= f_cap per outcome j; their
        sum fills at most N branches). A table is made once per distinct fan-out, in pinned host memory, and copied in
        on the round's stream: no host synchronization, and the round in flight reads the old table before the copy
        lands. All three are written together, whether or not this call's Saguaro reads fan_depth, so the device state
        is a function of `self.fan` alone; `reset` forgets it, so a generation's first fan-out is always written, and a
        reused engine runs every call as a fresh one would."""
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

    def saguaro_f(self, d, req, fan):
        """Saguaro's F at outcome d for a sampling step: none at C >= 1; a host int when the fan-out is fixed
        (req.fan); the device value when it adapts (so the graph need not change with it)."""
        if req.c >= 1.0:
            return 0
        return fan[d] if req.fan is not None else self.fan_depth[d]

    # --- the three parts -----------------------------------------------------------------------------

    def select(self, backup: str, fan):
        """This round's proposal: the cached speculation of the last outcome, or the backup where a row missed.
        Inside a CUDA graph the jit backup is a conditional node: its K draft steps run only when a row missed."""
        hit, cached, cached_q = self.lookup()
        if backup == "jit" and CONDITIONAL_NODES and torch.cuda.is_current_stream_capturing():
            self.any_miss.copy_((~hit & self.eng.st.active).any())
            graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
            graph.begin_capture_to_if_node(self.any_miss)
            try:
                self._jit_into_buffers(fan)
            finally:
                graph.end_capture_to_conditional_node()
            s, qs = self.jit_s, self.jit_q
        elif backup == "jit" and self.eng.use_graphs:   # a warm-up before the capture (or no conditional nodes)
            s, qs = self._jit_into_buffers(fan)
        else:
            s, qs = self.backup(backup, fan)
        self.merge(hit, cached, cached_q, s, qs)

    def _jit_into_buffers(self, fan):
        s, qs = self.jit_backup(self.m1, fan)
        self.jit_s.copy_(s)
        if self.send_q:
            self.jit_q.copy_(qs)
        return self.jit_s, self.jit_q

    def lookup(self):
        """The last outcome key (n, r) of each row among the cached keys: (hit [Bb], the cached chain [Bb, K],
        its q rows or None)."""
        eng, st, req = self.eng, self.eng.st, self.eng.req
        m1 = eng._base(st, req)
        r = st.hist.gather(1, m1[:, None])
        self.m1.copy_(m1)
        self.r.copy_(r)
        match = (self.spec_j == st.last_n[:, None]) & (self.spec_cand == r)
        hit = match.any(1) & st.active
        idx = match.int().argmax(1)
        rows = torch.arange(self.Bb, device=m1.device)
        return hit, self.spec_chains[rows, idx], (self.spec_q[rows, idx] if self.send_q else None)

    def backup(self, kind: str, fan):
        """The backup proposal for every row (kept only where a row missed): the jit backup, or the n-gram one
        (deterministic, so verified with q = one-hot)."""
        if kind == "jit":
            return self.jit_backup(self.m1, fan)
        s = self.eng._ngram_proposal(self.eng.st, self.eng.req)
        return s, (ssd.deterministic_q(s, self.V) if self.send_q else None)

    def merge(self, hit, cached, cached_q, s, qs):
        self.prop.copy_(torch.where(hit[:, None], cached, s))
        if self.send_q:
            self.prop_q.copy_(torch.where(hit[:, None, None], cached_q, qs))
        self.hit.copy_(hit)

    def jit_backup(self, m1, fan):
        """K draft steps from r (site "backup"). The first step also re-reads the token before r, so a row whose
        last round accepted all K needs no catch-up pass."""
        eng, st, req, K = self.eng, self.eng.st, self.eng.req, self.k
        pos = torch.stack([m1 - 1, m1], 1)
        tokens = st.hist.gather(1, pos)
        chain, qs = [], []
        for i in range(K):
            logits = eng.draft.forward(tokens, pos, eng.dc)[:, -1]
            s, q = self.draft_token(logits, i, fan, "backup")
            chain.append(s)
            qs.append(q)
            tokens, pos = s[:, None], (m1 + 1 + i)[:, None]
        return torch.stack(chain, 1), (torch.stack(qs, 1) if self.send_q else None)

    def draft_side(self, fan):
        """Glue pass, fork and K tree steps: the next round's speculation cache (paper, section 3)."""
        self.tree(fan, *self.glue_and_fork())

    def glue_and_fork(self):
        """The draft reads [r, s1..sK] once (writing its KV for whatever prefix the target accepts); row j of its
        output guesses the recovery token of outcome n = j, and its top F_j tokens are that outcome's candidates
        (Saguaro's fan-out, section 4.1), picked into the N branches by the slot table."""
        eng, K, N = self.eng, self.k, self.N
        m1, dev = self.m1, self.m1.device
        glue = eng.draft.forward(torch.cat([self.r, self.prop], 1), m1[:, None] + torch.arange(K + 1, device=dev),
                                 eng.dc)
        # for j < K, s_{j+1} is no outcome at j: had the target drawn it, it would have been accepted
        glue[:, :K].scatter_(-1, self.prop[..., None], float("-inf"))
        top = glue.topk(self.f_cap, dim=-1).indices                       # [Bb, K + 1, F_max]
        branch_j = self.slot_j.clamp(min=0)
        cand = top[:, branch_j, self.slot_rank]                           # [Bb, N]
        return cand, branch_j[None].expand(self.Bb, N).contiguous()

    def tree(self, fan, cand, glue_j):
        """K draft steps for all N branches at once (tree attention: each sees the trunk, its glue and its chain)."""
        eng, req, K, m1 = self.eng, self.eng.req, self.k, self.m1
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
        kept (what sampling at temperature 0 gives, without drawing noise); else Engine._draft_sample."""
        if self.draft_greedy:
            return logits.argmax(-1), None
        eng = self.eng
        return eng._draft_sample(logits, eng.req.t_draft, eng.req, self.saguaro_f(d, eng.req, fan), eng.rng[site])

    def target_side(self):
        """The target's pass over [r, s1..sK], the exact verify and the commit (history, lengths, stops)."""
        eng, st, req, K = self.eng, self.eng.st, self.eng.req, self.k
        dev = self.m1.device
        logits = eng.target.forward(torch.cat([self.r, self.prop], 1),
                                    self.m1[:, None] + torch.arange(K + 1, device=dev), eng.tc)
        if self.send_q:   # Leviathan et al. 2023, Thm. 1 (with Saguaro's q', paper section 4.2)
            p = eng._probs(logits, req.t, req).contiguous()
            u = torch.rand(self.Bb, K, device=dev, generator=eng.rng["target"])
            noise = ssd.exponential_noise((self.Bb, self.V), eng.rng["target"], dev)
            with_ops = eng.ops.verify
            n, r_new = with_ops(p, self.prop_q, self.prop, u, noise)
        else:   # every row greedy: p and q are one-hot, so verify keeps the leading matches of the argmax
            best = logits.argmax(-1)
            n = (best[:, :K] == self.prop).long().cumprod(1).sum(1)
            r_new = best.gather(1, n[:, None])[:, 0]
        j = torch.arange(K + 1, device=dev)[None]
        new = torch.where(j < n[:, None], torch.cat([self.prop, self.prop[:, -1:]], 1), r_new[:, None])
        eng._commit_device(st, n, new)
        self.packed.copy_(torch.cat([n[:, None], new, self.hit[:, None].long()], 1))

    # --- one round ----------------------------------------------------------------------------------

    def round(self, backup: str, fan, concurrent: bool):
        """The three parts in order; with `concurrent` (on a GPU) the draft side on its own stream, forked after
        select and joined at the end (the target side reads nothing the draft side writes; the next round does)."""
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
        req = self.eng.req
        fixed = tuple(fan) if req.fan is not None and req.c < 1.0 else None
        return backup, concurrent, self.send_q, self.draft_greedy, fixed, req.c, req.top_k, req.top_p

    def prepare(self, backup, fan, concurrent):
        """The round's graph for `backup`, captured now (before the first round is timed) unless it exists."""
        self.set_fan(fan)
        key = self.graph_key(backup, fan, concurrent)
        if key not in self.graphs:
            self.graphs[key] = self.capture(lambda: self.round(backup, fan, concurrent))
        return self.graphs[key]

    def launch(self, stats, backup: str, fan, concurrent: bool, graphs: bool):
        """Run (or replay) one round; returns the packed device tensor [Bb, K + 3] the host reads."""
        if not graphs:
            self.set_fan(fan)
            self._parts(stats, backup, fan)
            return self.packed
        self.prepare(backup, fan, concurrent).replay()
        return self.packed

    def _parts(self, stats, backup, fan):
        """Eagerly, each part timed under the reference's names (the CPU, and profiling). If the draft fails, the
        round still verifies (with the cheap backup where the jit one failed) and the run goes on as AR."""
        eng = self.eng
        with eng._timed(stats, "lookup"):
            found = self.lookup()
        with eng._timed(stats, "backup"):
            try:
                proposal = self.backup(backup, fan)
            except Exception as e:
                if backup != "jit":
                    raise
                eng._draft_lost(e)
                stats.backup = "fast"
                proposal = self.backup("fast", fan)
        self.merge(*found, *proposal)
        try:
            with eng._timed(stats, "glue"):
                fork = self.glue_and_fork()
            with eng._timed(stats, "tree"):
                self.tree(fan, *fork)
        except Exception as e:
            eng._draft_lost(e)
            self.spec_j.fill_(-1)
        with eng._timed(stats, "verify"):
            self.target_side()

    def capture(self, fn):
        """fn as a CUDA graph on the engine's device. Two warm-up runs first (Triton compiles, cuBLAS picks its
        kernels): they advance the state and draw random numbers, so both are undone afterwards."""
        eng = self.eng
        t0 = time.perf_counter()
        gens = [eng.rng[s] for s in ssd.SITES]
        saved = [t.clone() for t in self.state()]
        rng_states = [g.get_state() for g in gens]
        stream = torch.cuda.Stream(eng.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
                for t, s in zip(self.state(), saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        # register only the streams the round draws from (each registered one costs launches at every replay):
        # greedy rounds draw nothing
        used = [g for g, s in zip(gens, rng_states) if not torch.equal(g.get_state(), s)]
        for g, s in zip(gens, rng_states):
            g.set_state(s)
        graph = torch.cuda.CUDAGraph()
        for g in used:
            graph.register_generator_state(g)
        with torch.cuda.graph(graph, pool=eng.t_run.pool, stream=stream, capture_error_mode="thread_local"):
            fn()
        torch.cuda.synchronize(eng.device)
        eng.log(f"ssd_fast: captured the SSD round (batch {self.Bb}, K={self.k}, {self.N} branches) as one CUDA "
                f"graph in {time.perf_counter() - t0:.1f} s")
        return graph
