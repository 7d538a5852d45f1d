"""Benchmark of the fast engine on one GPU, side by side with transformers, in one run.

  python scripts/bench_fast.py --out bench_fast.json            (scripts/gpu_run.sh runs it on the H200)

Sections (each prints its table rows as it finishes; all numbers are medians over repeats):
  bandwidth   device-to-device copy, bytes read + written per second
  llama8b     AR decode, batch 1, of a random-weight Llama-3-8B-shaped model: tokens/s against the
              floor (bytes of weights read per token / measured bandwidth), and transformers' generate
              on the same weights (default dynamic cache, and static cache)
  smollm2     the embedded pair (SmolLM2-135M-Instruct target, the distilled draft): our AR, SD and SSD
              against transformers' generate and its assisted generation with the same draft;
              plus the time of one verify and one draft step, and a profiled round breakdown
Decode tokens/s exclude the prefill: ours from the engine's per-round times, transformers' as
(N-1) / (time for N new tokens - time for 1 new token).
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
sys.path.insert(0, str(ROOT))
import embedded  # noqa: E402
import ssd  # noqa: E402
import ssd_fast  # noqa: E402

CHAT_PROMPTS = ["What is the capital of France? Answer in two sentences.",
                "Write a short story about a robot who learns to paint.",
                "Explain how a binary search works, with a Python example.",
                "A farmer has 12 cows and buys 7 more. Each cow gives 3 liters of milk. How much milk per day?"]


def sync():
    torch.cuda.synchronize()


def measure_bandwidth(gb=2.0, reps=10):
    x = torch.empty(int(gb * 2**30) // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        y.copy_(x)
        end.record()
        sync()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() * 2 / statistics.median(times)


def decode_rate(result):
    """Decode tokens/s of one of our runs: tokens after the first (which the prefill produced) over
    the summed round times."""
    tokens = sum(len(t) for t in result.tokens) - len(result.tokens)
    return tokens / sum(r.times["round"] for r in result.rounds)


def ours(engine, prompts, repeats, **kw):
    engine.generate(prompts[0], **kw)   # warm-up: graph capture
    rates, tpr, acc, hit = [], [], [], []
    for _ in range(repeats):
        for p in prompts:
            res = engine.generate(p, **kw)
            s = res.summary()
            rates.append(decode_rate(res))
            tpr.append(s["tokens_per_round"])
            acc.append(s["acceptance_rate"] or 0)
            hit.append(s["cache_hit_rate"] or 0)
    return dict(tok_s=statistics.median(rates), tokens_per_round=statistics.median(tpr),
                acceptance=statistics.median(acc), hit_rate=statistics.median(hit))


def hf_rate(model, prompts, new_tokens, repeats, **gen_kw):
    def run(ids, n):
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **gen_kw)
        sync()
        return time.perf_counter() - t0
    rates = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        run(ids, 4)  # warm-up
        for _ in range(repeats):
            t1, tn = run(ids, 1), run(ids, new_tokens)
            rates.append((new_tokens - 1) / (tn - t1))
    return statistics.median(rates)


def hf_model(config, state):
    """A transformers Llama on the GPU in bf16 holding the given weights (our module names are HF's)."""
    from transformers import LlamaForCausalLM
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    hf.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=False)
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


LLAMA8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               tie_word_embeddings=False)


def random_llama8b() -> ssd.Transformer:
    """A random-weight Llama-3-8B-shaped model, built on the GPU in bf16 (speed floors only)."""
    cfg = ssd.ModelConfig.from_dict(LLAMA8B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = ssd.Transformer(cfg)
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.inv_freq, model.attn_scale = ssd.rope_inv_freq(cfg)
    return model


def bench_llama8b(res, args):
    from transformers import LlamaConfig
    c = LLAMA8B
    model = random_llama8b()
    cfg = model.cfg
    engine = ssd_fast.Engine(model, None, device="cuda", max_seq=1024)
    weights = sum(t.numel() * t.element_size() for L in engine.target.layers for t in L.values() if t is not None)
    weights += engine.target.lm_head.numel() * 2 + engine.target.norm.numel() * 2   # the embedding: one row per token
    floor = res["bandwidth_Bps"] / weights
    prompt = [[int(x) for x in torch.randint(0, cfg.vocab_size, (16,))]]
    r = ours(engine, prompt, args.repeats, mode="ar", max_new_tokens=args.new_tokens, eos_token_id=[])
    out = dict(weight_bytes_per_token=weights, floor_tok_s=floor, ours_ar_tok_s=r["tok_s"],
               fraction_of_floor=r["tok_s"] / floor)
    print(f"llama8b  ours AR {r['tok_s']:.1f} tok/s, floor {floor:.1f} tok/s ({r['tok_s'] / floor:.0%})", flush=True)
    res["llama8b"] = out
    save(res, args)
    del engine
    torch.cuda.empty_cache()
    hf = hf_model(LlamaConfig(**{k: v for k, v in c.items() if k != "model_type"}), model.state_dict())
    out["hf_default_tok_s"] = hf_rate(hf, prompt, 32, 1)
    out["ours_vs_hf_default"] = r["tok_s"] / out["hf_default_tok_s"]
    save(res, args)
    out["hf_static_tok_s"] = hf_rate(hf, prompt, 64, 1, cache_implementation="static")
    out["ours_vs_hf_static"] = r["tok_s"] / out["hf_static_tok_s"]
    print(f"llama8b  transformers default {out['hf_default_tok_s']:.1f}, static {out['hf_static_tok_s']:.1f} tok/s",
          flush=True)
    res["llama8b"] = out
    del hf, model
    torch.cuda.empty_cache()


def bench_smollm2(res, args):
    from transformers import LlamaConfig, LlamaForCausalLM
    target, draft, tok, tdir = ssd.load_pair(mode="ssd", log=lambda *a: None)
    ddir = embedded.default_draft(progress=False)[0]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    engine = ssd_fast.Engine(target, draft, device="cuda")
    gen = dict(max_new_tokens=args.new_tokens, eos_token_id=[], k=args.k)
    out = {"k": args.k, "new_tokens": args.new_tokens}
    for mode in ("ar", "sd", "ssd"):
        out[mode] = ours(engine, prompts, args.repeats, mode=mode, **gen)
        print(f"smollm2  ours {mode}: {out[mode]}", flush=True)
    for mode in ("sd", "ssd"):   # where the time goes: every part timed with a sync (slower than above)
        prof = engine.generate(prompts[0], mode=mode, profile=True, **gen)
        parts = {}
        for r in prof.rounds[1:]:
            for name, t in r.times.items():
                parts.setdefault(name, []).append(t)
        out[f"{mode}_profile_ms"] = {name: 1e3 * statistics.median(v) for name, v in parts.items()}
        print(f"smollm2  {mode} round parts (ms, median): {out[f'{mode}_profile_ms']}", flush=True)
    # transformers on the same weights
    hf = LlamaForCausalLM.from_pretrained(tdir, dtype=torch.bfloat16).to("cuda").eval()
    dcfg = json.loads((Path(ddir) / "config.json").read_text())
    dcfg.pop("ssd_shared_embedding", None)
    hf_draft = hf_model(LlamaConfig(**{k: v for k, v in dcfg.items() if k != "model_type"}), draft.state_dict())
    out["hf_default_tok_s"] = hf_rate(hf, prompts, args.new_tokens, 1)
    out["hf_static_tok_s"] = hf_rate(hf, prompts, args.new_tokens, 1, cache_implementation="static")
    out["hf_assisted_tok_s"] = hf_rate(hf, prompts, args.new_tokens, 1, assistant_model=hf_draft)
    for mode in ("ar", "sd", "ssd"):
        out[f"{mode}_vs_hf_default"] = out[mode]["tok_s"] / out["hf_default_tok_s"]
    out["sd_vs_hf_assisted"] = out["sd"]["tok_s"] / out["hf_assisted_tok_s"]
    print(f"smollm2  transformers default {out['hf_default_tok_s']:.1f}, static {out['hf_static_tok_s']:.1f}, "
          f"assisted {out['hf_assisted_tok_s']:.1f} tok/s", flush=True)
    res["smollm2"] = out


def save(res, args):
    Path(args.out).write_text(json.dumps(res, indent=2, default=float))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_fast.json")
    ap.add_argument("--sections", default="smollm2,llama8b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    import transformers
    import triton
    res = dict(command=" ".join(sys.argv), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__)
    res["bandwidth_Bps"] = measure_bandwidth()
    print(f"bandwidth {res['bandwidth_Bps'] / 1e12:.2f} TB/s", flush=True)
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            {"smollm2": bench_smollm2, "llama8b": bench_llama8b}[section](res, args)
        except Exception as e:  # keep the other sections' numbers
            import traceback
            traceback.print_exc()
            res[section + "_error"] = repr(e)
        print(f"[{section}: {time.perf_counter() - t0:.0f} s]", flush=True)
        save(res, args)
    print(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
