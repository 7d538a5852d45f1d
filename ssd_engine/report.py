"""What the command line and the server report: the visible text (EOS hidden, stop strings cut), streaming it,
the summary line, the JSON object and the Chrome trace of the rounds."""
from __future__ import annotations

import dataclasses
import sys


# ---------------------------------------------------------------------------------------------
# Text: EOS, stop strings, streaming
# ---------------------------------------------------------------------------------------------

def find_stop(text: str, stops) -> int:
    """Index of the earliest stop string in text, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def visible(tok, ids, eos, stops):
    """(text to show, ids it comes from, stopped): EOS never shows; a stop string cuts the text before
    it, and the ids are cut to the shortest prefix whose text contains it."""
    ids = list(ids)
    text = tok.decode([t for t in ids if t not in eos])
    cut = find_stop(text, stops) if stops else -1
    if cut < 0:
        return text, ids, False
    for m in range(1, len(ids) + 1):
        if find_stop(tok.decode([t for t in ids[:m] if t not in eos]), stops) >= 0:
            ids = ids[:m]
            break
    return text[:cut], ids, True


class Streamer:
    """Writes one row's text as rounds are accepted: decodes the whole generated sequence and writes
    the new suffix, holding back an incomplete UTF-8 character ("\ufffd" at the end) and any tail that
    may be the start of a stop string."""

    def __init__(self, tok, eos, stops, write):
        self.tok, self.eos, self.stops, self.write, self.printed = tok, eos, stops, write, ""

    def update(self, ids) -> bool:
        text, _, stopped = visible(self.tok, ids, self.eos, self.stops)
        if not stopped:
            hold = len(text) - len(text.rstrip("\ufffd"))
            for s in self.stops:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            text = text[:len(text) - hold]
        self._emit(text)
        return stopped

    def finish(self, text: str):
        self._emit(text)

    def _emit(self, text):
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.write(text[len(self.printed):])
            self.printed = text


def write_out(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Statistics, the JSON object and the timeline
# ---------------------------------------------------------------------------------------------

def decode_seconds(result) -> float:
    """Time spent in rounds: the fast engine records each round's wall time as "round"; ssd.generate times
    the parts, which run one after another."""
    return sum(r.times["round"] if "round" in r.times else sum(r.times.values()) for r in result.rounds)


def summary_line(summary: dict, decode_s: float, placement) -> str:
    n = summary["generated_tokens"]
    rate = f"{n / decode_s:.1f} tok/s" if decode_s > 0 else "- tok/s"
    parts = [f"{n} tokens in {decode_s:.2f} s", rate, f"{summary['tokens_per_round']:.2f} tokens/round",
             f"prefill {summary['prefill_s']:.2f} s"]
    if summary.get("load_s") is not None:
        parts.append(f"load {summary['load_s']:.1f} s")
    if summary["acceptance_rate"] is not None:
        parts.append(f"acceptance {summary['acceptance_rate']:.2f}")
    if summary["cache_hit_rate"] is not None:
        parts.append(f"cache hit rate {summary['cache_hit_rate']:.2f}")
        backups = summary.get("backups") or {}
        if any(backups.values()):
            parts.append("backups " + ", ".join(f"{k} {v}" for k, v in backups.items() if v))
    parts.append(f"{summary['mode'].upper()}" + (f" K={summary['k']}" if summary["k"] else ""))
    where = f"target on {placement.target_devices()}"
    where += f", draft on {placement.draft}" if placement.draft else ", no draft"
    parts.append(where)
    return "[" + ", ".join(parts) + "]"


def json_object(boot, result, token_ids, texts, reasons, summary) -> dict:
    """--json: the prompts, ids, text, finish reasons, statistics, rounds, devices, models and settings."""
    devices = {"target": boot.placement.target, "draft": boot.placement.draft}
    if boot.placement.tp > 1:
        devices["tp"] = boot.placement.tp
    models = {"target": str(boot.target_dir), "draft": str(boot.draft_dir) if boot.draft_dir else None,
              "draft_about": boot.about or (boot.draft_dir.name if boot.draft_dir else None)}
    return {"prompts": boot.prompts, "prompt_ids": boot.prompt_ids, "token_ids": token_ids, "text": texts,
            "finish_reasons": reasons, "stats": summary, "rounds": [dataclasses.asdict(r) for r in result.rounds],
            "devices": devices, "models": models, "backend": "fast", "chat": boot.chat, "load": boot.load,
            "max_context": boot.max_seq, "settings": boot.settings}


PARTS_IN_PARALLEL = ("glue", "tree")    # SSD: what the draft's GPU does during the verify


def chrome_trace(result, title: str) -> dict:
    """The rounds as a Chrome trace. The fast engine records each part's real span (profile=True):
    one track per thread (the main thread: lookup, backup, verify, waiting for the draft; the draft
    worker: glue pass and tree decode), so the overlap is what happened. ssd.generate runs the parts
    one after the other: they are laid end to end on the track "as run", and for SSD a second track
    shows the draft's glue pass and tree decode starting with the verify, as they would on a second GPU."""
    if any(r.spans for r in result.rounds):
        return _measured_trace(result, title)
    us = 1e6
    events = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": title}},
              {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "as run (sequential)"}},
              {"name": "prefill", "ph": "X", "pid": 1, "tid": 1, "ts": 0.0,
               "dur": round(result.prefill_time * us, 3), "args": {}}]
    if result.mode == "ssd":
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": 2,
                       "args": {"name": "draft GPU (overlapped)"}})
    start = result.prefill_time
    for i, r in enumerate(result.rounds):
        info = _round_info(i, r)
        t, verify_at = start, None
        for name, dur in r.times.items():
            if name == "round":
                continue
            if name == "verify":
                verify_at = t
            events.append({"name": name, "ph": "X", "pid": 1, "tid": 1, "ts": round(t * us, 3),
                           "dur": round(dur * us, 3), "args": info})
            t += dur
        if result.mode == "ssd" and verify_at is not None:
            u = verify_at
            for name in PARTS_IN_PARALLEL:
                if name in r.times:
                    events.append({"name": name, "ph": "X", "pid": 1, "tid": 2, "ts": round(u * us, 3),
                                   "dur": round(r.times[name] * us, 3), "args": info})
                    u += r.times[name]
        start += max(r.times.get("round", 0.0), t - start)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _round_info(i, r) -> dict:
    info = {"round": i, "accepted": r.accepted}
    if r.hit is not None:
        info.update(hit=r.hit, backup=r.backup, fan_out=r.fan_out)
    return info


def _measured_trace(result, title: str) -> dict:
    us = 1e6
    base = min(t0 for r in result.rounds for _, t0, _, _ in r.spans) - result.prefill_time
    tracks = {"round": 1, "main thread": 2, "draft worker": 3}
    events = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": title}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
               for name, tid in tracks.items()]
    events.append({"name": "prefill", "ph": "X", "pid": 1, "tid": 1, "ts": 0.0,
                   "dur": round(result.prefill_time * us, 3), "args": {}})
    for i, r in enumerate(result.rounds):
        info = _round_info(i, r)
        for name, t0, t1, track in r.spans:
            events.append({"name": name if name != "round" else f"round {i}", "ph": "X", "pid": 1,
                           "tid": tracks.get(track, 4), "ts": round((t0 - base) * us, 3),
                           "dur": round((t1 - t0) * us, 3), "args": info})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
