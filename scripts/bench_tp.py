"""Decode tokens/s of the fast engine with a tensor-parallel target: AR, SD and SSD for TP = 1, 2, 3 in one run.

    python3 scripts/bench_tp.py --out DIR                       (4 GPUs: the target on up to 3, the draft on the next)
    python3 scripts/bench_tp.py --out DIR --target random8b     (random Llama-3-8B-shaped target; TP=3 is skipped)
    python scripts/bench_tp.py --smoke --out DIR                (tiny random models on the CPU over gloo: the test)

What is measured: batch 1, temperature 0, the same prompts and output length (exactly --new-tokens per prompt,
EOS ignored) for every configuration; decode tokens/s = (generated - 1) / (wall time of generate - prefill),
median over --prompts prompts x --repeats passes after one warm-up call (CUDA graph capture), as
scripts/bench.py measures its "ours" systems (`bench.run_ours`). SD and SSD use K = --k; SSD runs with the
draft's side concurrent (`concurrent=True`) and the draft on its own GPU (cuda:TP) when one is visible.

Targets (--target):
  expanded   SmolLM2-135M-Instruct expanded --expand-k times in width (scripts/expand.py, k = 8: ~7.2B, 72 / 24
             heads), built the way scripts/bench.py builds its "expanded" pair, + the distilled draft
             (models/smollm2-draft): real acceptance. Needs the GGUF (SSD_GGUF, see scripts/bench.py's docstring).
  random8b   random-weight Llama-3-8B shape + Llama-3.2-1B-shaped draft: speed floors only, acceptance
             meaningless. 8 KV heads do not split over 3 GPUs: TP=3 is skipped with a note.
  tiny       (--smoke) a tiny random target (4 / 2 heads: TP=3 skipped) + a noisy copy as the draft.

Each TP size runs in its own process (rank 0 of that size, which spawns the other ranks): a clean CUDA and
torch.distributed state per configuration, and one configuration's failure or hang (--config-timeout-s)
keeps the others. Every rank builds its own copy of the target on its GPU in bf16 (the workers with
`load_target`, the same functions as rank 0), then keeps its shard. Outputs: DIR/results.json (every
measurement, with the configuration and versions) and DIR/results.md (the table).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
import ssd  # noqa: E402
import ssd_fast  # noqa: E402
import tp  # noqa: E402
import bench  # noqa: E402
import expand  # noqa: E402

MODES = ("ar", "sd", "ssd")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The target, on every rank
# ---------------------------------------------------------------------------------------------

def target_config(name: str, expand_k: int) -> ssd.ModelConfig:
    """The target's config without its weights (to know which TP sizes split it)."""
    if name == "expanded":
        import embedded
        return expand.expanded_config(ssd.ModelConfig.from_dict(ssd.read_config(embedded.ensure_target(progress=False))),
                                      expand_k)
    return ssd.ModelConfig.from_dict({"random8b": bench.LLAMA3_8B, "tiny": bench.TINY_TARGET}[name])


def load_target(name: str, expand_k: int, dtype_name: str, on_gpu: bool) -> ssd.Transformer:
    """The tensor-parallel workers' loader: the target as rank 0 builds it (bench.load_pair's recipe), on this
    rank's GPU (the worker has set it as the current device) in the engine's dtype."""
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    if name == "expanded":
        import embedded
        base = ssd.load_model(embedded.ensure_target(progress=False))      # CPU float32, as ssd.load_pair loads it
        return expand.expand_width(base, expand_k, dtype=dtype, device=device)
    if name == "random8b":
        return bench.random_model(bench.LLAMA3_8B, device, dtype, seed=0)
    if name == "tiny":
        return bench.random_model(bench.TINY_TARGET, device, dtype, seed=0, std=0.25)
    raise ValueError(f"unknown target {name!r}")


# ---------------------------------------------------------------------------------------------
# One TP size, in its own process
# ---------------------------------------------------------------------------------------------

def run_config(cfg: dict) -> list[dict]:
    """Rank 0 of one TP size: build the pair, the engine, measure every mode. Returns the records."""
    world, on_gpu = cfg["tp"], cfg["device"] != "cpu"
    dtype = getattr(torch, cfg["dtype"])
    device = torch.device(cfg["device"])
    count = torch.cuda.device_count() if on_gpu else 0
    draft_device = torch.device("cuda", world) if on_gpu and world < count else device
    note = None if draft_device != device or not on_gpu else f"no GPU left for the draft: it shares {device}"
    tag = f"[tp={world}]"
    t0 = time.perf_counter()
    log(f"{tag} building the pair ({cfg['target']}) on {device}")
    pair_name = {"expanded": "expanded", "random8b": "random8b", "tiny": "tiny"}[cfg["target"]]
    pair = bench.load_pair(pair_name, SimpleNamespace(expand_k=cfg["expand_k"], systems=[]), device, dtype)
    ids = [pair.tokenize(p["prompt"]) for p in bench.prompt_pool(cfg["prompts"])]
    doms = [[p["domain"]] for p in bench.prompt_pool(cfg["prompts"])]
    max_seq = max(map(len, ids)) + cfg["new_tokens"] + 2 * cfg["k"] + 16
    loader = (load_target, (cfg["target"], cfg["expand_k"], cfg["dtype"], on_gpu))
    log(f"{tag} starting the engine ({world} rank(s), draft on {draft_device})")
    engine = ssd_fast.Engine(pair.target, pair.draft, device=device, dtype=dtype, max_seq=max_seq, concurrent=True,
                             draft_device=draft_device, tp=world, tp_loader=loader if world > 1 else None, log=log)
    info = dict(pair.info)
    pair.target = pair.draft = None     # the engine holds its shard / copy
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    records = []
    try:
        log(f"{tag} ready after {time.perf_counter() - t0:.1f} s")
        for mode in cfg["modes"]:
            kw = dict(mode=mode, temperature=0.0, max_new_tokens=cfg["new_tokens"], eos_token_id=[], seed=0)
            if mode != "ar":
                kw["k"] = cfg["k"]
            rec = dict(tp=world, mode=mode, k=kw.get("k"), batch=1, temperature=0.0, new_tokens=cfg["new_tokens"],
                       target_device=f"{device}" + (f"..cuda:{world - 1}" if on_gpu and world > 1 else ""),
                       draft_device=str(draft_device), concurrent=mode == "ssd", note=note)
            t_mode = time.perf_counter()
            try:
                out = bench.run_ours(engine, [[x] for x in ids], doms, cfg["repeats"], kw)
                out.pop("per_batch", None)
                rec.update(status="ok", **out)
                log(f"{tag} {mode}: {out['decode_tok_s']:.1f} tok/s (median of {out['n_batches']}), "
                    f"{time.perf_counter() - t_mode:.1f} s")
            except Exception as e:      # one mode's failure keeps the others
                rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
                log(f"{tag} {mode}: {rec['error']}")
                if engine.target.__class__.__name__ == "TPTarget" and engine.target.failure:
                    records.append(rec)
                    break
            rec["wall_s"] = time.perf_counter() - t_mode
            records.append(rec)
    finally:
        engine.close()
    for r in records:
        r["pair"] = info
    return records


# ---------------------------------------------------------------------------------------------
# The driver: one process per TP size, then the report
# ---------------------------------------------------------------------------------------------

def plan(a) -> list[dict]:
    """What to run for each TP size, or why it is skipped."""
    cfg = target_config(a.target, a.expand_k)
    count = torch.cuda.device_count() if a.device != "cpu" else 0
    out = []
    for world in a.tp:
        why = None
        try:
            tp.check_divisible(cfg, world)
        except ValueError as e:
            why = str(e)
        if why is None and a.device != "cpu" and world > count:
            why = f"tp={world} needs {world} GPUs, {count} visible"
        out.append(dict(tp=world, skip=why))
    return out


def child_config(a, world: int) -> dict:
    return dict(tp=world, target=a.target, expand_k=a.expand_k, device=a.device, dtype=a.dtype, modes=a.modes, k=a.k,
                new_tokens=a.new_tokens, repeats=a.repeats, prompts=a.prompts)


def run_child(a, world: int, out: Path) -> list[dict]:
    path = out / f"tp{world}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(child_config(a, world)), "--out", str(out)]
    base = dict(tp=world, batch=1, temperature=0.0, new_tokens=a.new_tokens)
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)    # its own process group: rank 0 + workers
    try:
        proc.wait(timeout=a.config_timeout_s)
    except KeyboardInterrupt:        # Ctrl-C reaches this process group only
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log(f"[tp={world}] killed after {a.config_timeout_s} s")
        return [dict(base, mode=m, status="error", error=f"timed out after {a.config_timeout_s} s") for m in a.modes]
    if path.is_file():
        return json.loads(path.read_text())
    return [dict(base, mode=m, status="error", error=f"the tp={world} process exited with {proc.returncode} and no "
                                                      "results (see stderr above)") for m in a.modes]


def versions() -> dict:
    v = dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
             cuda=torch.version.cuda)
    if torch.cuda.is_available():
        v["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            pass
    return v


def write_report(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    recs, c = results["records"], results["config"]
    sizes = sorted({r["tp"] for r in recs})
    smoke = " (SMOKE: tiny random models on the CPU, the numbers mean nothing)" if c["smoke"] else ""
    L = [f"# Tensor-parallel target: decode tokens/s{smoke}", "",
         f"Target `{c['target']}`" + (f" (expand k = {c['expand_k']})" if c["target"] == "expanded" else "")
         + f", batch 1, T = 0, {c['new_tokens']} new tokens, K = {c['k']} (SD, SSD), median over {c['prompts']} "
         f"prompt(s) x {c['repeats']} repeat(s); SSD concurrent with the draft on its own GPU when one is left. "
         f"Device {c['device']}, {c['dtype']}; {results['versions'].get('gpus') or 'no GPU'}.", "",
         "| mode | " + " | ".join(f"TP={t} tok/s" for t in sizes) + " | " +
         " | ".join(f"TP={t} / TP=1" for t in sizes if t != 1) + " |",
         "|---" * (1 + len(sizes) + len([t for t in sizes if t != 1])) + "|"]
    by = {(r["tp"], r["mode"]): r for r in recs}

    def rate(t, m):
        r = by.get((t, m))
        return r["decode_tok_s"] if r and r.get("status") == "ok" else None
    for m in c["modes"]:
        cells = []
        for t in sizes:
            r = by.get((t, m))
            cells.append(f"{rate(t, m):.1f}" if rate(t, m) else (r or {}).get("status", "-"))
        for t in sizes:
            if t != 1:
                cells.append(f"{rate(t, m) / rate(1, m):.2f}x" if rate(t, m) and rate(1, m) else "-")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += ["", "| TP | mode | tokens/round | acceptance | cache hit rate | draft device | note |", "|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("status") != "ok":
            L.append(f"| {r['tp']} | {r['mode']} | | | | | {r.get('status')}: {r.get('note') or r.get('error', '')} |")
            continue
        L.append(f"| {r['tp']} | {r['mode']} | {_fmt(r.get('tokens_per_round'))} | {_fmt(r.get('acceptance_rate'))} | "
                 f"{_fmt(r.get('hit_rate'))} | {r.get('draft_device')} | {r.get('note') or ''} |")
    (out / "results.md").write_text("\n".join(L) + "\n")


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--smoke", action="store_true", help="tiny random models on the CPU (gloo), seconds: the test")
    ap.add_argument("--target", choices=["expanded", "random8b", "tiny"], help="default expanded (smoke: tiny)")
    ap.add_argument("--tp", help="comma list of TP sizes (default 1,2,3)")
    ap.add_argument("--modes", help="comma list of ar, sd, ssd (default all)")
    ap.add_argument("--k", type=int, help="draft tokens per round for SD and SSD (default 4; smoke 2)")
    ap.add_argument("--new-tokens", type=int, help="generated tokens per prompt (default 128; smoke 8)")
    ap.add_argument("--repeats", type=int, help="passes over the prompts (default 3; smoke 1)")
    ap.add_argument("--prompts", type=int, help="prompts, interleaved over the domains (default 2; smoke 1)")
    ap.add_argument("--expand-k", type=int, default=8, help="width expansion of the expanded target (default 8: ~7.2B)")
    ap.add_argument("--device", help="rank 0's device (default cuda:0 if visible, else cpu; smoke: cpu)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16 on GPUs, float32 on CPU")
    ap.add_argument("--config-timeout-s", type=float, default=180,
                    help="kill a TP size's processes (rank 0 and its workers) after this long")
    ap.add_argument("--budget-s", type=float, default=290, help="start no new TP size after this many seconds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    s = a.smoke
    for name, full, small in (("target", "expanded", "tiny"), ("tp", "1,2,3", "1,2,3"), ("modes", ",".join(MODES), None),
                              ("k", 4, 2), ("new_tokens", 128, 8), ("repeats", 3, 1), ("prompts", 2, 1)):
        if getattr(a, name) is None:
            setattr(a, name, small if s and small is not None else full)
    a.tp = [int(x) for x in str(a.tp).split(",") if x]
    a.modes = [m for m in a.modes.split(",") if m]
    if any(m not in MODES for m in a.modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    a.device = a.device or ("cpu" if s or not torch.cuda.is_available() else "cuda:0")
    if a.device == "cuda":
        a.device = "cuda:0"
    a.dtype = a.dtype or ("bfloat16" if a.device != "cpu" else "float32")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.child:                     # one TP size: records to DIR/tp{N}.json
        cfg = json.loads(a.child)
        records = run_config(cfg)
        (out / f"tp{cfg['tp']}.json").write_text(json.dumps(records, indent=1, default=str))
        return 0
    t0 = time.perf_counter()
    results = dict(config=dict(vars(a), smoke=a.smoke), versions=versions(), records=[])
    for item in plan(a):
        world = item["tp"]
        base = dict(tp=world, batch=1, temperature=0.0, new_tokens=a.new_tokens)
        if item["skip"] or time.perf_counter() - t0 > a.budget_s:
            why = item["skip"] or f"time budget (--budget-s {a.budget_s}) spent"
            log(f"[tp={world}] skipped: {why}")
            results["records"] += [dict(base, mode=m, status="skipped", note=why) for m in a.modes]
        else:
            log(f"[tp={world}] starting ({time.perf_counter() - t0:.0f} s so far)")
            results["records"] += run_child(a, world, out)
        write_report(results, out)     # after every size: a later failure keeps what was measured
    results["wall_s"] = time.perf_counter() - t0
    write_report(results, out)
    ok = [r for r in results["records"] if r.get("status") == "ok"]
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} ({len(ok)} measurements ok) in {results['wall_s']:.0f} s")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
