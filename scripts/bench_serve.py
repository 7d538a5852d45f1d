"""Served throughput against the engine's own: N concurrent streaming clients on the HTTP server (server.py)
beside the same engine's batch-N `generate`, on the same prompts, in the same process run. Prints JSON.

    python scripts/bench_serve.py --clients 16 --max-tokens 256 --mode ssd [any model/device flag of the CLI]
    python scripts/bench_serve.py --smoke            # the embedded pair on the CPU, 4 clients, a few tokens

Both sides generate exactly --max-tokens tokens per prompt (EOS ignored: the server's `ignore_eos` extension) at
temperature 0, from the same token ids (sent to /v1/completions as a token-id prompt). The engine side is one
`Engine.generate` over the N prompts (its wall time, prefill included); the served side is N clients in a
separate process (so that they do not take the server's interpreter lock), all sent at once, each streaming
its answer: total tokens / the time from the first request to the last answer, and per request the time to the
first token (TTFT), the mean time between streamed chunks per token (inter-token latency) and the end-to-end time.
Each side is measured --repeats times after a warm-up; the median repeat is reported, and `ratio` is served /
engine tokens per second (the goal: >= 0.8 with 16 clients). Then each prompt is generated alone by the engine:
`greedy_equal_alone` counts the clients whose served text equals it (what `ssd_fast.py --prompt` prints).
"""
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssd_engine import server  # noqa: E402

TOPICS = ["the moon", "volcanoes", "honey bees", "the printing press", "jazz", "glaciers", "the immune system",
          "chess openings", "bread baking", "lighthouses", "the Roman roads", "octopuses", "solar panels", "tea",
          "origami", "deserts", "coral reefs", "the telescope", "bicycles", "maps", "rainbows", "penguins",
          "the compass", "paper money", "windmills", "silk", "comets", "the piano", "bridges", "salt", "owls",
          "the alphabet"]


def prompts(tok, n):
    """N distinct prompts, through the chat template when the model has one."""
    texts = [f"Write a short story about {TOPICS[i % len(TOPICS)]}." + (f" (#{i // len(TOPICS)})"
                                                                       if i >= len(TOPICS) else "") for i in range(n)]
    if tok.has_chat_template:
        return [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    return [tok.encode(t) for t in texts]


def spread(values):
    values = sorted(values)
    if not values:
        return None
    return {"mean": statistics.fmean(values), "p50": values[len(values) // 2],
            "p90": values[min(len(values) - 1, int(0.9 * len(values)))], "max": values[-1]}


# --- the clients (their own process) ---

def _clients(url, model, prompt_ids, max_tokens, timeout):
    """All requests at once, each streaming; returns the wall time and per-request timings."""
    import asyncio

    import httpx

    async def one(client, ids):
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        chunks, text, usage, finish = [], [], None, None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    raise RuntimeError(msg["error"]["message"])
                if msg.get("usage"):
                    usage = msg["usage"]
                for c in msg["choices"]:
                    if c.get("text"):
                        chunks.append(time.perf_counter())
                        text.append(c["text"])
                    finish = c.get("finish_reason") or finish
        t_end = time.perf_counter()
        tokens = usage["completion_tokens"]
        return {"tokens": tokens, "ttft_s": chunks[0] - t0 if chunks else None, "e2e_s": t_end - t0,
                "itl_s": (chunks[-1] - chunks[0]) / (tokens - 1) if len(chunks) > 1 and tokens > 1 else None,
                "chunks": len(chunks), "finish_reason": finish, "t0": t0, "t_end": t_end, "text": "".join(text),
                "speculative": usage.get("speculative")}

    async def run():
        limits = httpx.Limits(max_connections=len(prompt_ids) + 4, max_keepalive_connections=len(prompt_ids) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
            return await asyncio.gather(*(one(client, ids) for ids in prompt_ids))
    rows = asyncio.run(run())
    wall = max(r["t_end"] for r in rows) - min(r["t0"] for r in rows)
    return {"wall_s": wall, "requests": rows}


def _client_process(out, *args):
    try:
        out.put(("ok", _clients(*args)))
    except Exception as e:   # said in the parent
        out.put(("error", f"{type(e).__name__}: {e}"))


def run_clients(url, model, prompt_ids, max_tokens, timeout=600.0, in_process=False):
    if in_process:
        return _clients(url, model, prompt_ids, max_tokens, timeout)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(out, url, model, prompt_ids, max_tokens, timeout), daemon=True)
    proc.start()
    try:
        status, value = out.get(timeout=timeout + 60)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"the clients failed: {value}")
    return value


# --- the measurement ---

def bench(scheduler, cfg, prompt_ids, max_tokens, repeats=3, in_process_clients=False, check_alone=True, log=print):
    """Engine batch-N, then N streaming clients on the server (same engine, idle between the two); with
    check_alone, the engine also generates each prompt alone and the last served texts are compared to those."""
    engine, n = scheduler.engine, len(prompt_ids)
    settings = dict(mode=cfg.mode, k=scheduler.k, temperature=0.0, max_new_tokens=max_tokens, eos_token_id=[],
                    **scheduler.spec)
    engine_runs = []
    engine.generate(prompt_ids, **{**settings, "max_new_tokens": min(max_tokens, 8)})    # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(prompt_ids, **settings)
        wall = time.perf_counter() - t0
        tokens = sum(len(t) for t in out.tokens)
        s = out.summary()
        engine_runs.append({"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                            "tokens_per_round": s["tokens_per_round"], "acceptance_rate": s["acceptance_rate"],
                            "cache_hit_rate": s["cache_hit_rate"]})
        log(f"engine batch {n}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s")
    served_runs = []
    with server.ThreadedServer(server.create_app(scheduler, cfg)) as srv:
        run_clients(srv.url, cfg.model_name, prompt_ids, min(max_tokens, 8), in_process=in_process_clients)
        for _ in range(repeats):
            res = run_clients(srv.url, cfg.model_name, prompt_ids, max_tokens, in_process=in_process_clients)
            rows = res["requests"]
            tokens = sum(r["tokens"] for r in rows)
            served_runs.append({
                "tokens": tokens, "wall_s": res["wall_s"], "tokens_per_s": tokens / res["wall_s"],
                "ttft_s": spread([r["ttft_s"] for r in rows if r["ttft_s"] is not None]),
                "itl_ms": spread([1000 * r["itl_s"] for r in rows if r["itl_s"] is not None]),
                "e2e_s": spread([r["e2e_s"] for r in rows]),
                "chunks_per_request": statistics.fmean(r["chunks"] for r in rows),
                "tokens_per_round": statistics.fmean(r["speculative"]["tokens_per_round"] or 0 for r in rows),
                "finish_reasons": sorted({r["finish_reason"] for r in rows}),
                "all_tokens": all(r["tokens"] == max_tokens for r in rows)})
            log(f"served, {n} clients: {tokens} tokens in {res['wall_s']:.2f} s = "
                f"{tokens / res['wall_s']:.1f} tok/s")
        load = scheduler.load()
    matches = None
    if check_alone:   # greedy through the server = each prompt alone (what `ssd_fast.py --prompt` prints)?
        from ssd_engine import report
        eos = set(cfg.eos)
        alone = [report.visible(cfg.tokenizer, engine.generate([p], **settings).tokens[0], eos, [])[0] for p in prompt_ids]
        matches = sum(a == r["text"] for a, r in zip(alone, rows))
        log(f"greedy texts equal to each prompt alone: {matches} of {n}")
    median = lambda runs: sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]   # noqa: E731
    eng, srv_ = median(engine_runs), median(served_runs)
    return {"clients": n, "max_tokens": max_tokens, "mode": cfg.mode, "k": scheduler.k if cfg.mode != "ar" else 0,
            "max_batch": scheduler.max_batch, "device": str(engine.device), "draft_device": str(engine.draft_device),
            "prompt_tokens": [len(p) for p in prompt_ids], "engine": eng, "served": srv_,
            "ratio": srv_["tokens_per_s"] / eng["tokens_per_s"], "goal": 0.8,
            "batch_window_ms": scheduler.batch_window * 1000, "greedy_equal_alone": matches,
            "engine_repeats": engine_runs, "served_repeats": served_runs, "server_counters": load}


def build_parser():
    ap = server.build_parser()
    ap.prog = "scripts/bench_serve.py"
    g = ap.add_argument_group("benchmark")
    g.add_argument("--clients", type=int, default=16, help="concurrent streaming clients = the engine's batch (16)")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens per request, exactly (EOS ignored; 256)")
    g.add_argument("--repeats", type=int, default=3, help="measurements per side; the median is reported (3)")
    g.add_argument("--out", metavar="FILE", help="also write the JSON here")
    g.add_argument("--no-check-alone", action="store_true",
                   help="skip generating each prompt alone to compare the served greedy texts with")
    g.add_argument("--smoke", action="store_true",
                   help="a quick check of the logic on the CPU: the embedded pair, 4 clients, 6 tokens, 1 repeat")
    return ap


def main(argv=None):
    def log(*a):
        print(*a, file=sys.stderr, flush=True)
    ap = build_parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.clients, args.max_tokens, args.repeats = 4, 6, 1
        args.device, args.mode = "cpu", args.mode if "--mode" in (argv or sys.argv) else "sd"
        args.max_context = args.max_context or 128
        args.threads = args.threads or 1
    if args.clients < 1 or args.max_tokens < 1 or args.repeats < 1:
        ap.error("--clients, --max-tokens and --repeats must be >= 1")
    args.max_batch = args.clients                # the server's batch = the engine's
    args.max_new_tokens = max(args.max_new_tokens, args.max_tokens)
    try:
        server.check_args(args)
        scheduler, cfg = server.load(args, log)
    except (server.UsageError, ValueError, FileNotFoundError) as e:
        log(f"error: {e}")
        return 2
    result = bench(scheduler, cfg, prompts(cfg.tokenizer, args.clients), args.max_tokens, args.repeats,
                   check_alone=not args.no_check_alone, log=log)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    log(f"served {result['served']['tokens_per_s']:.1f} tok/s vs engine batch-{args.clients} "
        f"{result['engine']['tokens_per_s']:.1f} tok/s: ratio {result['ratio']:.3f} (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
