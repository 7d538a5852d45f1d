"""One generate call in progress (Engine.start): the run loop. It launches rounds, reads each back (the one host
synchronization of a round), commits the tokens on the host, updates the running estimates (acceptance, hit
rate) that steer SSD's fan-out and backup, and admits new sequences between rounds (continuous batching).

Pipelining: no round needs anything from the host to start (the sequence state lives on the device), so on a GPU
round n+1 is launched before round n is read back, and the host's bookkeeping overlaps the device's work."""
from __future__ import annotations

import copy
import threading
import time

import torch

import ssd
from ssd_engine import batch, rounds, sampling
from ssd_engine.fast_model import _RowCache


class Run:
    """One generate call in progress: its device state and the rounds so far."""

    def __init__(self, engine, st, req, est, mode, prefill_time, ssd_round=None):
        self.engine, self.st, self.req, self.est, self.mode = engine, st, req, est, mode
        self.prefill_time, self.rounds, self.B = prefill_time, [], len(req.prompts)
        self.ssd_round = ssd_round
        self.round_fn = {"ar": rounds.ar_round, "sd": rounds.sd_round, "ssd": self._ssd_round}[mode]
        self.pipelined = engine.pipeline and not engine.profile
        self._last_end = None   # when the previous round's results were read back
        self.est_before = copy.copy(est)   # the estimates before the latest round's update
        self._launches = 0      # rounds launched (which pinned read-back buffer a round uses)
        self._inflight = None   # a launched round not read back yet (pipelined)

    def _ssd_round(self, eng, st, req, stats, est):
        """The host picks the fan-out and the backup from the estimates so far (rules, no timing), then launches the
        round (ssd_round.SSDRound). Hits are decided on the device and come back with the tokens."""
        stats.fan_out = fan = eng.ssd_fan(req, est, self.ssd_round.f_cap)
        stats.backup = req.backup if req.backup != "auto" else ssd.choose_backup(len(st.tokens), est)
        try:
            return self.ssd_round.launch(stats, stats.backup, fan)
        except Exception as e:   # the draft failed while its round was captured: this round is AR
            if not eng.use_graphs:
                raise
            eng.draft_lost(e)
            return rounds.ar_round(eng, st, req, stats, est)

    def rounds_iter(self):
        """Run rounds until every row is done, yielding each round's stats. A row that finished keeps riding along
        for the one round in flight; its tokens there are discarded."""
        st = self.st
        while not all(st.done) or self._inflight is not None:
            launched = self._launch() if not all(st.done) else None
            if not self.pipelined:
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
            self.round_fn = rounds.ar_round
        t_round = time.perf_counter()
        stats = ssd.RoundStats(accepted=[])
        if eng.check_sync:   # tests: any host synchronization inside a round raises
            torch.cuda.set_sync_debug_mode("error")
        # SSD's fan-out and backup follow the estimates up to two rounds back, pipelined or not (pipelined, the
        # last round is still in flight): the same seed gives the same tokens either way
        est = self.est if self.pipelined else self.est_before
        try:
            out = self.round_fn(eng, st, self.req, stats, est)
        finally:
            if eng.check_sync:
                torch.cuda.set_sync_debug_mode("default")
        ready = None
        if out.is_cuda:   # copy back without waiting (ordered before the next round's writes); _finish waits for
            packed = eng.pinned(out.shape, self._launches)   # this event only
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
        """Read a launched round's results back and commit them. Rows that finished, or were given to a new sequence
        by admit, since the launch take no part. Returns its stats, or None when no row took part (the pipeline's
        one extra round at the end)."""
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
        if self.mode == "ssd" and stats.hit is None:   # this round's hits, decided on the device
            stats.hit = [bool(row[-1]) for row in packed]
            if all(h or not on for h, on in zip(stats.hit, stats.active)):
                stats.backup = None                       # no row took the backup
        batch.commit_host(st, self.req, packed, stats)
        self.est_before = copy.copy(self.est)
        self.est.update(stats)
        self.rounds.append(stats)
        return stats

    def generated(self):
        return [t[p:] for t, p in zip(self.st.tokens, self.st.prompt_lens)]

    def stop(self, rows, reason="stop"):
        ssd.stop_rows(self.st, rows, reason)
        batch.sync_active(self.st)

    def result(self) -> ssd.GenerationResult:
        return ssd.GenerationResult(tokens=self.generated(), finish_reasons=self.st.finish, rounds=self.rounds,
                                    mode=self.mode, k=self.req.k_used, prefill_time=self.prefill_time)

    @torch.no_grad()
    def admit(self, prompt, temperature=None) -> int:
        """Continuous batching: between rounds, put a new prompt into a free row (one that finished, or a padding
        row of the bucket) while the other rows go on undisturbed. Its prefill runs on that row's slice of the
        caches; its speculation-cache entries are invalidated. Returns the row index: its tokens are
        generated()[row]. Raises ValueError when no row is free."""
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
        first = int(sampling.sample(eng.ops, sampling.probs(logits, req.t[b:b + 1], req), eng.rng["target"])[0])
        st.hist[b, :T] = tokens[0]
        st.hist[b, T] = first
        st.lens[b], st.last_n[b] = T + 1, 0
        rnd = self.ssd_round
        if rnd is not None:
            if req.send_q and not rnd.send_q:   # a sampling row joins a greedy run: q rows from now on
                rnd.enable_q()
            rnd.forget(b)
        if b >= self.B:
            for _ in range(b + 1 - self.B):
                st.tokens.append([]), st.prompt_lens.append(0), st.done.append(True), st.finish.append(None)
                st.epoch.append(0), st.active_host.append(False)
            self.B = b + 1
        st.tokens[b], st.prompt_lens[b], st.done[b], st.finish[b] = prompt + [first], T, False, None
        batch.finish_check(st, b, req)
        st.epoch[b] += 1   # a round launched before this call must not commit into the new sequence
        batch.sync_active(st)
        return b


class Timer:
    """Adds a part's seconds to stats.times; when profiling, also its real span (perf_counter start, end, and the
    thread it ran on: the draft worker's parts overlap the main thread's verify)."""

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
