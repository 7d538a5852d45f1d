"""Where a decoding round's time goes, AR, SD and SSD side by side (a CUDA GPU, or the CPU for a smoke run).

    python scripts/profile_round.py --pair expanded --ks 2,4,6 --temperatures 0,1 --out DIR

One process, the same models and prompts for every system (bench.py's pairs and prompt pool, batch 1 by
default), one warm-up call per configuration (CUDA graph capture), then per prompt one timed generate call.
Reported per system, K and temperature (medians over the prompts' calls):
  tok/s           decode tokens per second (wall time of generate minus its prefill)
  host_us         the host's time to launch one round (Engine: stats.times["host"]), measured with the rounds
                  read back one at a time, so the device is idle and the launch never waits for room in its queue
                  (pipelined, a launch can wait for the round in flight: that is not host work)
  round_ms        wall time per round (pipelined rounds: between two read-backs)
  tokens/round    new tokens per round and row
  verify_ms       the bare verify: the target's CUDA graph over K + 1 positions replayed back to back (mean)
  hit_round_ms    SSD: rounds where every row hit; hit_over_verify = hit_round_ms / verify_ms
  hit_rate        SSD: the fraction of rows whose speculation was cached
SSD runs twice: its draft side on a second stream inside the round's graph ("ssd") and after the target's part on
the same stream ("ssd_seq"). Writes DIR/profile_round.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    sys.path.insert(0, str(p))
import bench  # noqa: E402
import ssd_fast  # noqa: E402
from ssd_engine import fast_model  # noqa: E402

SYSTEMS = ("ar", "sd", "ssd", "ssd_seq")


def bare_verify(engine, k: int, batch: int) -> float:
    """Seconds of the target's forward over K + 1 positions (a CUDA graph replay where graphs run)."""
    Bb = fast_model.bucket(batch)
    tc = engine.cache(engine.target, "target", Bb)
    pos = (tc.slots - k - 2 + torch.arange(k + 1, device=engine.device))[None].expand(Bb, -1).contiguous()
    tok = torch.zeros_like(pos)
    return engine.time(lambda: engine.t_run.step(tc, tok, pos), reps=30)


def measure(engine, prompts, kw) -> dict:
    engine.generate(prompts[0], **kw)          # warm-up: graphs captured
    rates, rounds = [], []
    for p in prompts:
        t0 = time.perf_counter()
        res = engine.generate(p, **kw)
        wall = time.perf_counter() - t0
        rates.append((sum(len(t) for t in res.tokens) - len(p)) / (wall - res.prefill_time))
        rounds += res.rounds[2:]               # steady state: not the first rounds of a call
    times = [r.times["round"] for r in rounds]
    engine.pipeline = False                    # the host's own time: a launch onto an idle device
    idle = engine.generate(prompts[0], **kw).rounds[2:]
    engine.pipeline = True
    per_round = [sum(n + 1 for n, on in zip(r.accepted, r.active) if on) / max(1, sum(r.active)) for r in rounds]
    out = dict(tok_s=statistics.median(rates), tok_s_all=rates, host_us=1e6 * statistics.median(r.times["host"] for r in idle),
               host_us_pipelined=1e6 * statistics.median(r.times["host"] for r in rounds),
               round_ms=1e3 * statistics.median(times), tokens_per_round=statistics.mean(per_round), rounds=len(rounds))
    if kw["mode"] == "ssd":
        hits = [h for r in rounds for h, on in zip(r.hit, r.active) if on]
        hit_rounds = [r.times["round"] for r in rounds if all(h or not on for h, on in zip(r.hit, r.active))]
        out.update(hit_rate=sum(hits) / max(1, len(hits)),
                   hit_round_ms=1e3 * statistics.median(hit_rounds) if hit_rounds else None)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="expanded", help="a bench.py pair: smollm2, expanded, random8b, tiny")
    ap.add_argument("--ks", default="2,4,6")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="prompts (calls) per configuration")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--expand-k", type=int, default=8)
    ap.add_argument("--saguaro-c", type=float, default=1.0)
    ap.add_argument("--budgets", default="", help="SSD's speculation budgets per row to try, e.g. 20,40,80 "
                                                  "(default: the engine's)")
    ap.add_argument("--backups", default="auto", help="SSD's backups to try: auto, jit, fast (comma-separated)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: the command line's, bootstrap.cpu_threads)")
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        from ssd_engine import bootstrap
        torch.set_num_threads(bootstrap.cpu_threads(a.threads, torch))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = argparse.Namespace(expand_k=a.expand_k, systems=[])
    pair = bench.load_pair(a.pair, args, device, dtype)
    pool = bench.prompt_pool(a.prompts * a.batch)
    ids = [pair.tokenize(p["prompt"]) for p in pool]
    prompts = [ids[i:i + a.batch] for i in range(0, len(ids), a.batch)][:a.prompts]
    max_seq = max(len(x) for x in ids) + a.new_tokens + 64
    target = fast_model.FastModel.of(pair.target, device, dtype, fast_model.Ops(device.type == "cuda"), "auto")
    draft = fast_model.FastModel.of(pair.draft, device, dtype, target.ops, "auto")
    quiet = dict(device=device, dtype=dtype, max_seq=max_seq, log=lambda *m: None)
    engines = {"seq": ssd_fast.Engine(target, draft, concurrent=False, **quiet),
               "con": ssd_fast.Engine(target, draft, concurrent=True, **quiet)}
    systems = a.systems.split(",")
    rows = []
    for t in [float(x) for x in a.temperatures.split(",")]:
        for k in [int(x) for x in a.ks.split(",")]:
            verify = bare_verify(engines["seq"], k, a.batch)
            budgets = [int(b) for b in a.budgets.split(",") if b] or [None]
            runs = [(s, None, None) for s in systems if not s.startswith("ssd")]
            runs += [(s, n, b) for s in systems if s.startswith("ssd") for n in budgets for b in a.backups.split(",")]
            for system, budget, backup in runs:
                if system == "ar" and k != int(a.ks.split(",")[0]):
                    continue
                mode = "ssd" if system.startswith("ssd") else system
                kw = dict(mode=mode, temperature=t, max_new_tokens=a.new_tokens, eos_token_id=[], seed=0)
                if mode != "ar":
                    kw["k"] = k
                if mode == "ssd":
                    kw.update(saguaro_c=a.saguaro_c, backup=backup, **({"fan_out_budget": budget} if budget else {}))
                engine = engines["con" if system == "ssd" else "seq"]
                r = dict(system=system, temperature=t, k=k if mode != "ar" else None, batch=a.batch, budget=budget,
                         backup=backup, verify_ms=1e3 * verify, **measure(engine, prompts, kw))
                if r.get("hit_round_ms"):
                    r["hit_over_verify"] = r["hit_round_ms"] / r["verify_ms"]
                rows.append(r)
                print(json.dumps({x: (round(v, 3) if isinstance(v, float) else v) for x, v in r.items()
                                  if x != "tok_s_all"}), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(pair=a.pair, info=pair.info, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, argv=sys.argv)
    (out / "profile_round.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    print(f"{'system':8} {'N':>4} {'bkp':>4} {'T':>3} {'K':>3} {'tok/s':>8} {'host us':>8} {'round ms':>9} {'tok/rnd':>8} {'verify':>7} "
          f"{'hit rnd':>8} {'hit/ver':>8} {'hit rate':>8}")
    for r in rows:
        f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        print(f"{r['system']:8} {str(r['budget'] or '-'):>4} {str(r['backup'] or '-')[:4]:>4} {r['temperature']:>3g} {str(r['k'] or '-'):>3} {r['tok_s']:8.1f} {r['host_us']:8.1f} "
              f"{r['round_ms']:9.3f} {r['tokens_per_round']:8.2f} {r['verify_ms']:7.3f} {f(r.get('hit_round_ms'), 3):>8} "
              f"{f(r.get('hit_over_verify')):>8} {f(r.get('hit_rate')):>8}")


if __name__ == "__main__":
    main()
