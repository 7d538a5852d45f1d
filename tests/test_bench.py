"""The benchmark suite's CPU-testable parts: the width expansion (scripts/expand.py), the speed model
(scripts/speed_model.py), the prompt files (data/prompts/) and scripts/bench.py end to end in --smoke mode:
the grid, its process isolation and failure rows, the draft-cost sweep and the tensor-parallel grid."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import ssd  # noqa: E402
import expand  # noqa: E402
import speed_model as sm  # noqa: E402
from conftest import make_checkpoint  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Width expansion
# ---------------------------------------------------------------------------------------------

VARIANTS = {
    "llama-tied-gqa": dict(family="llama", tie_word_embeddings=True),
    "llama-untied-gqa": dict(family="llama", tie_word_embeddings=False),
    "llama-mha-bias": dict(family="llama", tie_word_embeddings=False, num_key_value_heads=4,
                           attention_bias=True, mlp_bias=True),
    "qwen3-qknorm": dict(family="qwen3", tie_word_embeddings=True, head_dim=16),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("expand")
    out = {}
    for name, kw in VARIANTS.items():
        path, hf = make_checkpoint(root / name, seed=3, logit_scale=4.0, **kw)
        out[name] = (ssd.load_model(path), hf)
    return out


def full_logits(model, ids):
    return ssd.extend(model, model.new_cache(1, len(ids) + 1), [ids])[0]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_expansion_preserves_logits_and_greedy_tokens(tiny_models, variant, k):
    model, _ = tiny_models[variant]
    wide = expand.expand_width(model, k)
    c, w = model.cfg, wide.cfg
    assert (w.hidden_size, w.intermediate_size) == (k * c.hidden_size, k * c.intermediate_size)
    assert (w.num_attention_heads, w.num_key_value_heads, w.head_dim) == \
        (k * c.num_attention_heads, k * c.num_key_value_heads, c.head_dim)
    assert not w.tie_word_embeddings and wide.lm_head.weight.data_ptr() != wide.model.embed_tokens.weight.data_ptr()
    ids = [3, 17, 42, 5, 88, 13, 64, 7, 29, 51]
    a, b = full_logits(model, ids), full_logits(wide, ids)
    assert a.abs().max() > 1.0                        # peaky enough that the comparison means something
    torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-5)
    ra = ssd.generate(model, ids, max_new_tokens=16, eos_token_id=[])
    rb = ssd.generate(wide, ids, max_new_tokens=16, eos_token_id=[])
    assert ra.tokens == rb.tokens


def test_expansion_dtype_and_device_arguments(tiny_models):
    model, _ = tiny_models["llama-tied-gqa"]
    wide = expand.expand_width(model, 2, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in wide.parameters()} == {torch.bfloat16}
    assert all(not p.requires_grad for p in wide.parameters())
    assert model.lm_head.weight.dtype == torch.float32      # the original is left as it was
    with pytest.raises(ValueError):
        expand.expand_width(model, 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_formula(tiny_models, variant):
    model, _ = tiny_models[variant]
    assert expand.num_params(model.cfg) == sum(p.numel() for p in model.parameters())
    for k in (2, 3):
        wide = expand.expand_width(model, k)
        assert expand.num_params(wide.cfg) == sum(p.numel() for p in wide.parameters())
        assert expand.num_params(expand.expanded_config(model.cfg, k)) == expand.num_params(wide.cfg)


def test_parameter_count_of_expanded_smollm2():
    """SmolLM2-135M's shape (no weights needed): 134,515,008 parameters; x8 about 7.2B. Closed form: every
    layer matrix k^2, every layer norm k, embedding and (now untied) LM head k each, final norm k."""
    cfg = ssd.ModelConfig.from_dict(dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True))
    assert expand.num_params(cfg) == 134_515_008
    matrices = 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536
    for k in (1, 2, 8):
        closed = 30 * (k * k * matrices + k * 2 * 576) + (1 if k == 1 else 2) * k * 49152 * 576 + k * 576
        assert expand.num_params(expand.expanded_config(cfg, k) if k > 1 else cfg) == closed
    wide = expand.expanded_config(cfg, 8)
    assert expand.num_params(wide) == 7_248_038_400
    # bytes a decode step reads in bf16: the embedding table only one row (untied), the LM head whole
    assert expand.weight_bytes_per_token(wide) == 2 * (7_248_038_400 - 49152 * 4608 + 4608)


@pytest.mark.parametrize("variant", ["llama-tied-gqa", "llama-untied-gqa", "qwen3-qknorm"])
def test_transformers_model_from_expanded_weights(tiny_models, variant):
    """bench.py's transformers baselines run on our (expanded) weights: the transformers model it builds
    from the expanded model gives the original transformers model's logits."""
    import bench
    model, hf_original = tiny_models[variant]
    hf_wide = bench.hf_from_ours(expand.expand_width(model, 2))
    ids = torch.tensor([[3, 17, 42, 5, 88, 13, 64, 7]])
    with torch.no_grad():
        want = hf_original(ids).logits
        got = hf_wide(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


# ---------------------------------------------------------------------------------------------
# Speed model (hand-computed numbers)
# ---------------------------------------------------------------------------------------------

def test_expected_tokens():
    assert sm.expected_tokens(0.5, 2) == pytest.approx(1.75)          # 1 + 0.5 + 0.25
    assert sm.expected_tokens(0.8, 4) == pytest.approx((1 - 0.8 ** 5) / 0.2)
    assert sm.expected_tokens(1.0, 4) == 5.0
    assert sm.expected_tokens(0.0, 4) == 1.0
    with pytest.raises(ValueError):
        sm.expected_tokens(1.5, 2)


def test_acceptance_from_rounds():
    assert sm.acceptance_from_counts([2, 0, 1], k=2) == pytest.approx(3 / 5)   # 3 accepted, 2 rejections
    assert sm.acceptance_from_counts([4, 4], k=4) == 1.0
    assert sm.acceptance_from_counts([], k=4) is None
    rounds = [dict(accepted=[2, 0], hit=[True, False], backup="fast", active=[True, True]),
              dict(accepted=[1, 2], hit=[True, True], backup=None, active=[True, True]),
              dict(accepted=[0, 0], hit=[False, False], backup="jit", active=[True, False])]
    s = sm.round_stats(rounds, k=2)
    # draft-proposed rows: n = 2, 1, 2, 0 (the fast-backup miss is left out): 5 / (5 + 2)
    assert s["alpha"] == pytest.approx(5 / 7)
    assert s["hit_rate"] == pytest.approx(3 / 5)
    assert s["round_hit"] == pytest.approx(1 / 3)
    assert s["tokens_fast"] == 1
    assert s["tokens_per_round"] == pytest.approx((3 + 1 + 2 + 3 + 1) / 5)


def test_ar_and_sd_formulas():
    assert sm.ar_tokens_per_s(0.005) == pytest.approx(200.0)
    assert sm.ar_tokens_per_s(0.005, batch=4, t_overhead=0.001) == pytest.approx(4 / 0.006)
    # a = 0.5, K = 2: E = 1.75 tokens per 10 ms verify + 2 x 1 ms drafting = 12 ms
    assert sm.sd_tokens_per_s(0.5, 2, 0.010, 0.001) == pytest.approx(1.75 / 0.012)
    assert sm.sd_tokens_per_s(0.5, 2, 0.010, 0.001, batch=2) == pytest.approx(3.5 / 0.012)


def test_ssd_formula():
    kw = dict(a=0.5, k=2, hit_rate=0.8, t_verify=0.010, t_glue=0.001, t_tree_step=0.002, t_handshake=0.0001,
              t_backup=0.002)
    # draft side 1 + 2 x 2 = 5 ms fits inside the 10 ms verify: 0.1 + 10 + 0.2 x 2 = 10.5 ms for 1.75 tokens
    r = sm.ssd_round(**kw)
    assert r["hidden"] and r["draft_side"] == pytest.approx(0.005)
    assert r["time"] == pytest.approx(0.0105)
    assert r["tokens_per_s"] == pytest.approx(1.75 / 0.0105)
    # the closed form when the draft side is hidden: h max(V, D) + (1 - h)(V + B) + handshake
    assert r["time"] == pytest.approx(0.8 * 0.010 + 0.2 * (0.010 + 0.002) + 0.0001)
    # one device, no overlap: 0.1 + (10 + 5) + 0.4 = 15.5 ms
    assert sm.ssd_tokens_per_s(**kw, overlap=False) == pytest.approx(1.75 / 0.0155)
    # batch 2, jit: a round is clean with probability 0.8^2 = 0.64: 0.1 + 10 + 0.36 x 2 = 10.82 ms, 3.5 tokens
    r2 = sm.ssd_round(**kw, batch=2)
    assert r2["p_round"] == pytest.approx(0.64)
    assert r2["tokens_per_s"] == pytest.approx(3.5 / 0.01082)
    # a measured round-hit fraction replaces h^B
    assert sm.ssd_round(**kw, batch=2, round_hit=0.5)["time"] == pytest.approx(0.0001 + 0.010 + 0.5 * 0.002)
    # fast backup: tokens per row 0.8 x 1.75 + 0.2 x 1.2 = 1.64
    assert sm.ssd_tokens_per_s(**kw, backup="fast", tokens_fast=1.2) == pytest.approx(1.64 / 0.0105)
    # the draft side longer than the verify (K = 2, tree 6 ms): 0.1 + 13 + 0.4 = 13.5 ms
    assert sm.ssd_round(**dict(kw, t_tree_step=0.006))["time"] == pytest.approx(0.0135)


def test_predict_from_profile_parts():
    rounds = [ssd.RoundStats(accepted=[2], hit=[True], backup=None, active=[True],
                             times=dict(lookup=0.0001, verify=0.010, glue=0.001, tree=0.004, round=0.0156))
              for _ in range(4)]
    parts = sm.parts_from_profile(rounds)
    assert parts["verify"] == pytest.approx(0.010)
    assert parts["overhead"] == pytest.approx(0.0005)             # 15.6 - (0.1 + 10 + 1 + 4) ms
    stats = dict(alpha=0.5, hit_rate=1.0, round_hit=1.0, tokens_fast=None)
    assert sm.predict("ssd", parts, stats, k=2, overlap=True) == pytest.approx(1.75 / (0.0001 + 0.010 + 0.0005))
    assert sm.predict("ssd", parts, stats, k=2, overlap=False) == pytest.approx(1.75 / (0.0001 + 0.015 + 0.0005))
    sd_parts = dict(verify=0.010, draft=0.002, overhead=0.0)
    assert sm.predict("sd", sd_parts, stats, k=2) == pytest.approx(1.75 / 0.012)
    assert sm.predict("ar", dict(verify=0.004), {}, k=0) == pytest.approx(250.0)
    assert sm.predict("sd", sd_parts, dict(alpha=None), k=2) is None
    with pytest.raises(ValueError):
        sm.predict("beam", sd_parts, stats, k=2)


def test_projection_is_labelled_and_consistent():
    # 70B in bf16 on 4 GPUs of 3.35 TB/s at full efficiency: 141.2 GB / 13.4 TB/s = 10.537 ms
    t = sm.step_time_floor(70.6e9, 3.35e12, 2.0, n_gpus=4)
    assert t == pytest.approx(70.6e9 * 2 / (4 * 3.35e12))
    assert sm.step_time_floor(1e9, 1e12, efficiency=0.5, t_comm=0.001) == pytest.approx(0.005)
    p = sm.project_70b_1b(3.35e12, a=0.8, hit_rate=0.9, t_handshake=1e-4, efficiency=1.0, t_allreduce=0.0,
                          k_values=[2, 4])
    d = p.as_dict()
    assert "PROJECTION" in d["label"] and "PROJECTION" in d["sd"]["label"] and "PROJECTION" in d["ssd"]["label"]
    assert all("PROJECTION" in row["label"] for row in d["per_k"])
    assert d["ar_tok_s"] == pytest.approx(1 / t)
    t_draft = 1.24e9 * 2 / 3.35e12
    row4 = next(r for r in d["per_k"] if r["k"] == 4)
    assert row4["sd_tok_s"] == pytest.approx(sm.expected_tokens(0.8, 4) / (t + 4 * t_draft))
    # SSD at K = 4: glue + 4 tree steps = 5 draft steps (3.7 ms) hide inside the 10.5 ms verify
    assert row4["draft_side_hidden"]
    assert row4["ssd_tok_s"] == pytest.approx(sm.expected_tokens(0.8, 4) / (1e-4 + t + 0.1 * 4 * t_draft))
    assert d["ssd"]["tok_s"] >= d["sd"]["tok_s"] > d["ar_tok_s"]
    per_k = sm.project(0.01, 0.001, {2: 0.5, 4: 0.9}, {2: 1.0, 4: 1.0}, 0.0, k_values=[2, 4]).per_k
    assert [r["a"] for r in per_k] == [0.5, 0.9]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def test_prompt_files():
    import bench
    seen = set()
    sources = (ROOT / "data" / "prompts" / "SOURCES.md").read_text()
    for domain in bench.DOMAINS:
        rows = bench.load_prompts(domain)
        assert len(rows) >= 32, domain
        texts = [r["prompt"] for r in rows]
        assert all(isinstance(t, str) and len(t.strip()) > 10 for t in texts)
        assert all(r.get("source") for r in rows)
        assert len(set(texts)) == len(texts), f"duplicate prompts in {domain}"
        assert not seen & set(texts), "a prompt appears in two domains"
        seen |= set(texts)
        assert f"{domain}.jsonl" in sources
    pool = bench.prompt_pool(8)
    assert [p["domain"] for p in pool] == list(bench.DOMAINS) * 2
    assert bench.prompts_needed(16, 2) == 16 and bench.prompts_needed(1, 2) == 8 and bench.prompts_needed(3, 1) == 6


# ---------------------------------------------------------------------------------------------
# scripts/bench.py end to end
# ---------------------------------------------------------------------------------------------

def test_bench_smoke_end_to_end(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--out", str(out), "--in-process",
           "--systems", "hf,hf_static,hf_assisted,ref,ar,sd,ssd,ssd_seq", "--ssd-concurrent", "on", "--ks", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and "tokens_per_s.png" in pngs and "predicted_vs_measured.png" in pngs
    cfg = res["config"]
    for key in ("torch", "transformers", "gpus", "temperatures", "batch_sizes", "ks", "new_tokens", "repeats",
                "prompts", "saguaro_cs", "fan_out"):
        assert key in cfg, key
    recs = res["records"]
    bad = [(r["key"], r.get("error")) for r in recs if r["status"] != "ok"]
    assert not bad, bad
    systems = {r["system"] for r in recs}
    assert systems == {"hf", "hf_static", "hf_assisted", "ref", "ar", "sd", "ssd", "ssd_seq"}
    assert {r["batch"] for r in recs} == {1, 2} and {r["temperature"] for r in recs} == {0.0, 1.0}
    assert any(r["c"] < 1 for r in recs)                        # the Saguaro C sweep ran
    for r in recs:
        assert r["decode_tok_s"] > 0 and math.isfinite(r["decode_tok_s"])
        if r["system"] in ("ar", "sd", "ssd", "ssd_seq"):
            assert r["predicted_tok_s"] > 0 and r["parts_ms"]["verify"] > 0
        if r["system"] in ("sd", "ssd"):
            assert r["tokens_per_round"] >= 1 and 0 <= r["alpha"] <= 1
        if r["system"] == "ssd":
            assert 0 <= r["hit_rate"] <= 1 and r["concurrent"]
            if r["batch"] <= 4:   # the measured timeline, with the draft worker's track
                trace = json.loads((out / r["trace"]).read_text())
                tracks = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
                assert "draft worker" in tracks and any(e["name"] == "verify" for e in trace["traceEvents"])
    assert any("SSD round time on a hit" in g["goal"] for g in res["goals"])
    assert not any(r["system"] == "hf_assisted" and r["batch"] > 1 for r in recs)
    assert "PROJECTION" in md and "tiny_expanded" in md and "Where SSD stops paying off" in md
    assert res["projection"]["label"].startswith("PROJECTION")
    # --report-only rebuilds the report from results.json, merging another run's file
    other = tmp_path / "other.json"
    extra = dict(res, records=[dict(recs[0], key=recs[0]["key"] + "|copy")])
    other.write_text(json.dumps(extra))
    (out / "results.md").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--report-only", "--out", str(out),
                           "--merge", str(other)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.md").is_file()
    assert len(json.loads((out / "results.json").read_text())["records"]) == len(recs) + 1


def _bench(args, env=None, timeout=900):
    """Run scripts/bench.py; returns (driver pid, results.json, results.md)."""
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke"] + args, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return proc.pid, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_bench_runs_each_system_in_its_own_process_and_survives_a_crash(tmp_path):
    """Every SD measurement's process dies (os.abort, as after an illegal memory access): each becomes a row
    with its error, and AR, measured after them, still runs, in a process of its own."""
    import os
    env = dict(os.environ, BENCH_CRASH_SYSTEM="sd")
    pid, res, md = _bench(["--out", str(tmp_path), "--pairs", "tiny", "--systems", "sd,ar", "--batch-sizes", "1",
                           "--temperatures", "0", "--ks", "2,3", "--no-profile"], env=env)
    recs = {r["key"]: r for r in res["records"]}
    sd = [r for r in recs.values() if r["system"] == "sd"]
    ar = [r for r in recs.values() if r["system"] == "ar"]
    assert len(sd) == 2 and all(r["status"] == "error" and "the process exited with" in r["error"] for r in sd)
    assert len(ar) == 1 and ar[0]["status"] == "ok" and ar[0]["decode_tok_s"] > 0
    assert ar[0]["pid"] not in (pid, os.getpid())                 # measured in a child of the driver
    assert "FAILED: the process exited with" in md and "ours SD" in md
    assert (tmp_path / "logs" / "tiny_sd.log").is_file()


def test_draft_cost_sweep_smoke(tmp_path):
    pid, res, md = _bench(["--out", str(tmp_path), "--suite", "sweep", "--in-process"])
    recs = res["records"]
    assert all(r["status"] == "ok" and r["sweep"] for r in recs), [r.get("error") for r in recs]
    widths = {(r["system"], r["dw"], r["k"]) for r in recs}
    assert widths == {("ar", 1, 0)} | {(s, w, k) for s in ("sd", "ssd") for w in (1, 2) for k in (1, 2)}
    # the x2 draft is the same draft, wider: twice the width, (about) four times the layer weights
    d1 = next(r["draft"] for r in recs if r["system"] == "sd" and r["dw"] == 1)
    d2 = next(r["draft"] for r in recs if r["system"] == "sd" and r["dw"] == 2)
    assert d2["hidden"] == 2 * d1["hidden"] and d2["params"] > 3 * d1["params"] - 2 * 320 * d1["hidden"]
    rows = bench_module().sweep_rows(recs)
    assert len(rows) == 4 and all(r["ssd_vs_sd"] > 0 and r["pred_ssd_vs_sd"] > 0 and r["pred_ssd_vs_ar"] > 0
                                  and r["cost_ratio"] > 0 for r in rows)
    assert "Where SSD pays" in md and "largest disagreement" in md
    assert (tmp_path / "draft_cost_sweep.png").is_file()
    assert res["config"]["suite"] == "sweep" and res["config"]["draft_widths"] == [1, 2]


def test_tensor_parallel_grid_smoke(tmp_path):
    """--tp: ar and ssd with the target split over 1 and 2 processes (gloo on the CPU); 3 does not divide the
    tiny target's heads and becomes a skipped row with the reason."""
    pid, res, md = _bench(["--out", str(tmp_path), "--pairs", "tiny", "--systems", "ar,ssd", "--tp", "1,2,3",
                           "--batch-sizes", "1", "--temperatures", "0", "--ks", "2", "--no-profile", "--in-process"])
    status = {(r["system"], r["tp"]): r["status"] for r in res["records"]}
    assert status == {("ar", 1): "ok", ("ssd", 1): "ok", ("ar", 2): "ok", ("ssd", 2): "ok",
                      ("ar", 3): "skipped", ("ssd", 3): "skipped"}, res["records"]
    assert all("divisible by 3" in r["error"] for r in res["records"] if r["tp"] == 3)
    assert "## Tensor-parallel target" in md and "TP=2 / TP=1" in md


def bench_module():
    import bench
    return bench


def test_profile_round_smoke(tmp_path):
    """scripts/profile_round.py (how the GPU's rounds are compared with a baseline) runs AR, SD and SSD side by side on
    the tiny pair, on a CPU: a renamed engine attribute fails here, not on a GPU."""
    import profile_round
    profile_round.main(["--pair", "tiny", "--ks", "2", "--temperatures", "0", "--systems", "ar,sd,ssd", "--prompts", "1",
                        "--new-tokens", "8", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "profile_round.json").read_text())["rows"]
    assert [r["system"] for r in rows] == ["ar", "sd", "ssd"] and all(r["tok_s"] > 0 for r in rows)
