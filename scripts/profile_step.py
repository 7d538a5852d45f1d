"""Where the time of one memory-bound decode step goes (random-weight Llama-3-8B shape, batch 1, bf16).

    python scripts/profile_step.py [--out DIR]        (a CUDA GPU; about a minute)

Prints, for the fast engine's AR step:
  0. which implementation the engine chose for each projection (cuBLAS or the skinny Triton kernel) and the
     times it chose by (a pass over every layer's weight, one row);
  1. the step's CUDA graph replayed back to back (device time per token) against a whole AR round of
     Engine.generate (graph + the eager bookkeeping + the one host synchronization), with the rounds
     pipelined (the default) and read back one at a time: the difference is what the host costs per token;
     then the same with every projection on cuBLAS (linear="torch"), for comparison;
  2. the kernels of one eager step by device time (torch.profiler), grouped;
  3. each weight matrix's GEMV (F.linear with one row) alone: achieved bytes/s against the measured
     copy bandwidth, which says how close cuBLAS gets to the floor on these shapes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    sys.path.insert(0, str(p))
import ssd_fast  # noqa: E402


def event_time(fn, reps=50, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    import bench
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    bw = bench.measure_bandwidth("cuda")
    res["bandwidth_Bps"] = bw
    model = bench.random_model(bench.LLAMA3_8B, "cuda", torch.bfloat16, seed=0)
    engine = ssd_fast.Engine(model, None, device="cuda", max_seq=1024, log=lambda *a: None)
    fm = engine.target
    weights = sum(t.numel() * t.element_size() for L in fm.layers for t in L.values() if t is not None)
    weights += fm.lm_head.numel() * 2 + fm.norm.numel() * 2
    res["floor_s"] = weights / bw

    # 0. the projections' implementation, chosen by timing at load (FastModel.choose_linear)
    res["linear_choice"] = {k: ("cuBLAS" if v is None else "skinny " + "x".join(map(str, v))) for k, v in fm.linear.items()}
    res["linear_times_ms"] = fm.linear_times
    print("projections (one pass over every layer's weight, 1 row, ms; the engine keeps the fastest):")
    for name, times in fm.linear_times.items():
        nbytes = sum(w.numel() * w.element_size() for w in fm._weights(name))
        best = min(times.values())
        print(f"  {name:10s} -> {res['linear_choice'][name]:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in times.items())
              + f"  (best: {nbytes / (best / 1e3) / bw:.0%} of the copy bandwidth)")

    # 1. graph replay vs a whole round, with the rounds pipelined (default) and one at a time
    prompt = [[int(x) for x in torch.randint(0, 128256, (16,))]]
    for pipeline in (False, True):
        engine.pipeline = pipeline
        engine.generate(prompt, mode="ar", max_new_tokens=16, eos_token_id=[])
        out = engine.generate(prompt, mode="ar", max_new_tokens=128, eos_token_id=[])
        rounds = [r.times["round"] for r in out.rounds[2:]]
        res["round_s" if pipeline else "round_s_unpipelined"] = statistics.median(rounds)
    graph = [g for k, g in engine.t_run.graphs.items() if k[0] == "ar"][0]
    res["graph_replay_s"] = event_time(graph.graph.replay)
    tc = engine.tc
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1, 1), 40, dtype=torch.long, device="cuda")
    res["eager_forward_s"] = event_time(lambda: fm.forward(tok, pos, tc), reps=10)
    print(f"floor {1e3 * res['floor_s']:.3f} ms/token ({weights / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s)")
    print(f"AR round (generate) {1e3 * res['round_s']:.3f} ms pipelined, {1e3 * res['round_s_unpipelined']:.3f} ms "
          f"one at a time | graph replay {1e3 * res['graph_replay_s']:.3f} ms | "
          f"eager forward {1e3 * res['eager_forward_s']:.3f} ms")
    chosen = dict(fm.linear)
    fm.linear = {}                                        # every projection on cuBLAS; graphs captured again
    engine.t_run.graphs.clear()
    engine.generate(prompt, mode="ar", max_new_tokens=16, eos_token_id=[])
    out = engine.generate(prompt, mode="ar", max_new_tokens=128, eos_token_id=[])
    res["round_s_cublas"] = statistics.median([r.times["round"] for r in out.rounds[2:]])
    graph = [g for k, g in engine.t_run.graphs.items() if k[0] == "ar"][0]
    res["graph_replay_s_cublas"] = event_time(graph.graph.replay)
    fm.linear = chosen
    print(f"with every projection on cuBLAS: AR round {1e3 * res['round_s_cublas']:.3f} ms pipelined | graph replay "
          f"{1e3 * res['graph_replay_s_cublas']:.3f} ms")
    print(f"fraction of the floor (pipelined round): {res['floor_s'] / res['round_s']:.1%} as chosen, "
          f"{res['floor_s'] / res['round_s_cublas']:.1%} all cuBLAS")

    # 2. kernels of one eager step
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fm.forward(tok, pos, tc)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key, t / 3 / 1e3, e.count // 3))
    rows.sort(key=lambda r: -r[1])
    res["kernels_ms_per_step"] = rows[:25]
    print("\nkernels of one eager step (device ms per step, launches per step):")
    for name, ms, n in rows[:25]:
        print(f"  {ms:8.3f} ms  x{n:<4d} {name[:110]}")

    # 3. each projection's GEMV alone
    L = fm.layers[0]
    shapes = {"wqkv": L["wqkv"], "wo": L["wo"], "w_gate_up": L["w_gate_up"], "w_down": L["w_down"], "lm_head": fm.lm_head}
    print("\nGEMV (F.linear, one row, bf16) alone, 4 rotating copies of each weight (beyond the 50 MB L2):")
    gemv = {}
    for name, w in shapes.items():
        ws = itertools.cycle([w.clone() for _ in range(4)])
        for m in (1, 5):
            xm = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            t = event_time(lambda: F.linear(xm, next(ws)), reps=30)
            frac = w.numel() * 2 / t / bw
            gemv[f"{name}_M{m}"] = dict(shape=list(w.shape), s=t, fraction_of_bandwidth=frac)
            print(f"  {name:10s} {str(list(w.shape)):16s} M={m}: {1e6 * t:8.1f} us, {frac:.0%} of the copy bandwidth")
        del ws
    res["gemv"] = gemv
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_step.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
