"""The streaming loader (loader.py): a checkpoint on disk in several bf16 shards, read tensor by tensor into the
fast engine's layout, gives the reference's weights (ssd.load_model + FastModel) bit for bit, so the same logits
and greedy tokens; each tensor-parallel rank reads only its slices; the host memory stays near one tensor; the
memory check's arithmetic on a 70B-shaped config."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ssd_engine import loader
import ssd
import ssd_fast
from ssd_engine import fast_model
from ssd_engine import tp
from conftest import ROOT

torch.set_num_threads(1)    # small products: more threads than idle cores only slow them down (see cli.cpu_threads)
OPS = fast_model.Ops(use_triton=False)
QUIET = dict(log=lambda *a: None, linear="torch", device="cpu")
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [1, 2, 3]]


def write_llama(path, shards, seed=0, vocab=97, d=64, layers=2, heads=4, kv_heads=2, inter=96, bias=False,
                tie=False, extra=None):
    """A random Llama-shaped checkpoint in bf16 written with safetensors, its tensors spread over `shards` files
    (norms and biases random too, so a misplaced one shows). `extra`: more config.json keys."""
    g = torch.Generator().manual_seed(seed)
    D = d // heads
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        shapes.update({f"model.layers.{i}.input_layernorm.weight": (d,),
                       f"model.layers.{i}.post_attention_layernorm.weight": (d,),
                       a + "q_proj.weight": (heads * D, d), a + "k_proj.weight": (kv_heads * D, d),
                       a + "v_proj.weight": (kv_heads * D, d), a + "o_proj.weight": (d, heads * D),
                       m + "gate_proj.weight": (inter, d), m + "up_proj.weight": (inter, d),
                       m + "down_proj.weight": (d, inter)})
        if bias:
            shapes.update({a + "q_proj.bias": (heads * D,), a + "k_proj.bias": (kv_heads * D,),
                           a + "v_proj.bias": (kv_heads * D,), a + "o_proj.bias": (d,), m + "gate_proj.bias": (inter,),
                           m + "up_proj.bias": (inter,), m + "down_proj.bias": (d,)})
    tensors = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * (0.5 if len(shape) == 2 else 0.1)
        tensors[name] = (t + (1.0 if "norm" in name else 0.0)).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    for n in range(shards):      # interleaved: a layer's q, k and v sit in different files
        save_file({k: tensors[k] for k in names[n::shards]}, str(path / f"model-{n + 1:05d}-of-{shards:05d}.safetensors"))
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=d,
               intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, eos_token_id=vocab - 1, **(extra or {}))
    (path / "config.json").write_text(json.dumps(cfg))
    return path, tensors


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    target, _ = write_llama(root / "target", shards=3, seed=1, bias=True)
    draft, _ = write_llama(root / "draft", shards=2, seed=2, layers=1, tie=True)
    # our draft's layout (models/smollm2-draft): no embedding of its own, a projection of the target's
    shared, tensors = write_llama(root / "shared", shards=1, seed=3, layers=1, d=32, tie=True, extra={
        "ssd_shared_embedding": {"source": "target", "projection": "model.embed_proj.weight"}})
    tensors.pop("model.embed_tokens.weight")
    tensors["model.embed_proj.weight"] = (torch.randn(32, 64) * 0.2).to(torch.bfloat16)
    (shared / "model-00001-of-00001.safetensors").unlink()
    save_file(tensors, str(shared / "model.safetensors"))
    return {"target": target, "draft": draft, "shared": shared}


def fast_tensors(m: fast_model.FastModel):
    out = {"embed": m.embed, "lm_head": m.lm_head, "norm": m.norm}
    for i, L in enumerate(m.layers):
        out.update({f"{i}.{k}": v for k, v in L.items()})
    return out


def assert_same_weights(got, want):
    a, b = fast_tensors(got), fast_tensors(want)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_weights_and_logits_equal_the_reference(ckpts, dtype):
    ref = fast_model.FastModel(ssd.load_model(ckpts["target"]), "cpu", dtype, OPS)
    ckpt = loader.Checkpoint(ckpts["target"])
    got = ckpt.fast_model("cpu", dtype, OPS)
    assert_same_weights(got, ref)
    assert got.n_params == ref.n_params and got.cfg == ref.cfg
    tokens = torch.tensor([PROMPTS[0]])
    positions = torch.arange(7)[None]
    assert torch.equal(got.forward(tokens, positions, got.new_cache(1, 16)),
                       ref.forward(tokens, positions, ref.new_cache(1, 16)))
    (load,) = ckpt.loads
    assert load["bytes"] == sum(f.stat().st_size for f in ckpt.files) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in ckpt.files)       # every weight byte, once
    assert load["tensors"] == len(ckpt.index)


def test_shared_embedding_draft_equals_the_reference(ckpts):
    target = ssd.load_model(ckpts["target"])
    want = fast_model.FastModel(ssd.load_model(ckpts["shared"], shared_embedding=target.model.embed_tokens.weight),
                              "cpu", torch.float32, OPS)
    t = loader.Checkpoint(ckpts["target"])
    got = loader.Checkpoint(ckpts["shared"], shared_embedding_from=t).fast_model("cpu", torch.float32, OPS)
    assert_same_weights(got, want)
    assert got.lm_head is got.embed                                                # tied
    with pytest.raises(ValueError, match="borrows its embedding from its target"):
        loader.Checkpoint(ckpts["shared"])


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_engine_from_checkpoints_is_greedy_equal(ckpts, mode):
    ref = ssd_fast.Engine(ssd.load_model(ckpts["target"]), ssd.load_model(ckpts["draft"]), **QUIET)
    eng = ssd_fast.Engine(loader.Checkpoint(ckpts["target"]), loader.Checkpoint(ckpts["draft"]), **QUIET)
    kw = dict(mode=mode, k=3, max_new_tokens=12)
    assert eng.generate(PROMPTS, **kw).tokens == ref.generate(PROMPTS, **kw).tokens


def test_bad_checkpoints_are_clear_errors(ckpts, tmp_path):
    path, _ = write_llama(tmp_path / "bad", shards=1, layers=1)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \[96, 64\] but config.json implies \[128, 64\]"):
        loader.Checkpoint(path)
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="checkpoint is missing weights"):
        loader.Checkpoint(path)
    with pytest.raises(FileNotFoundError, match="has no \\*.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
        loader.Checkpoint(tmp_path / "empty")


# --- tensor parallelism: each rank's slices ------------------------------------------------------------

@pytest.mark.parametrize("world", [2])
def test_rank_slices_equal_the_sharded_reference(ckpts, world):
    """Rank r's streamed share equals tp.shard_model's (the unsharded weights sliced), vocabulary padding
    included (97 rows over 2 ranks), and it reads only its slice's bytes."""
    model = ssd.load_model(ckpts["target"])
    ckpt = loader.Checkpoint(ckpts["target"])
    for rank in range(world):
        want = fast_model.FastModel(tp.shard_model(model, rank, world), "cpu", torch.float32, OPS)
        assert_same_weights(ckpt.fast_shard(rank, world, "cpu", torch.float32, OPS), want)
    whole = ckpt.read_bytes()[0]
    assert all(0.45 * whole < ckpt.read_bytes(r, world)[0] < 0.55 * whole for r in range(world))


def test_tp2_streamed_over_gloo_equals_tp1(ckpts):
    """Every rank (rank 0 and a gloo worker process) streams its own slices from disk; greedy AR, SD and SSD
    equal the one-process engine's in float32, and the logits match."""
    seen = []
    target = loader.Checkpoint(ckpts["target"], progress=lambda *a: seen.append(a))
    ref = ssd_fast.Engine(ssd.load_model(ckpts["target"]), ssd.load_model(ckpts["draft"]), **QUIET)
    eng = ssd_fast.Engine(target, loader.Checkpoint(ckpts["draft"], name="draft"), tp=2, **QUIET)
    try:
        tokens, positions = torch.tensor([PROMPTS[0], [96, 95, 0, 1, 2, 3, 4]]), torch.arange(7)[None].repeat(2, 1)
        torch.testing.assert_close(eng.target.forward(tokens, positions, eng.target.new_cache(2, 16)),
                                   ref.target.forward(tokens, positions, ref.target.new_cache(2, 16)),
                                   atol=1e-5, rtol=1e-5)
        for mode in ("ar", "sd", "ssd"):
            kw = dict(mode=mode, k=3, max_new_tokens=10)
            assert eng.generate(PROMPTS, **kw).tokens == ref.generate(PROMPTS, **kw).tokens, mode
    finally:
        eng.close()
    assert sorted(r["rank"] for r in target.loads) == [0, 1]
    whole = target.read_bytes()[0]
    assert all(r["bytes"] < 0.55 * whole for r in target.loads)
    assert {a[1] for a in seen} == {0, 1} and all(a[0] == "target" for a in seen)   # both ranks' progress


# --- host memory ------------------------------------------------------------------------------------------

MEASURE = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from ssd_engine import fast_model, loader
import ssd
from pathlib import Path
ops = fast_model.Ops(use_triton=False)
torch.zeros(1) @ torch.zeros(1)
Path("/proc/self/clear_refs").write_text("5")          # the peak from here on
before = loader.host_memory()[0]
if sys.argv[1] == "stream":
    m = loader.Checkpoint(sys.argv[2]).fast_model("cpu", torch.bfloat16, ops)
else:
    m = fast_model.FastModel(ssd.load_model(sys.argv[2]), "cpu", torch.bfloat16, ops)
kept = sum(t.numel() * t.element_size() for t in [m.embed, m.norm, *(v for L in m.layers for v in L.values()
           if v is not None)] + ([] if m.lm_head is m.embed else [m.lm_head]))
print(json.dumps(dict(above=loader.host_memory()[1] - before, kept=kept)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_host_memory_is_near_one_tensor(tmp_path):
    """A ~50 MB bf16 checkpoint (largest tensor 8.4 MB) loaded to bf16 on the CPU in a fresh process: the peak
    resident memory above the baseline is at most the model kept (it lives on the host here) + 1.5x the largest
    tensor + 24 MB of slack (allocator, lazily loaded code). The reference's loader needs the float32 model and
    the state dict on top: it must break that bound (so the bound means something)."""
    path, tensors = write_llama(tmp_path / "m", shards=4, vocab=8192, d=512, layers=6, heads=8, kv_heads=2,
                                inter=1536)
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    runs = {}
    for how in ("stream", "reference"):
        proc = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT)), how, str(path)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[how] = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = runs["stream"]["kept"] + 1.5 * largest + 24e6
    assert runs["stream"]["above"] <= bound, (runs, bound)
    assert runs["reference"]["above"] > bound, (runs, bound)


# --- will it fit? -------------------------------------------------------------------------------------------

LLAMA_70B = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                 num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                 tie_word_embeddings=False)
H200 = 141e9


def test_70b_fits_on_four_gpus_not_on_one():
    cfg = ssd.ModelConfig.from_dict(LLAMA_70B)
    params = 80 * (8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 8192 * 28672 + 2 * 8192) + 2 * 128256 * 8192 + 8192
    assert loader.weight_bytes(cfg, 2, 1) == 2 * params                            # 141.1 GB in bf16
    est = loader.estimate_memory(cfg, 2, tp=4, batch=1, context=4096, gpu_bytes=H200)
    assert est.fits and len(est.per_gpu) == 4
    per_rank = est.per_gpu["target rank 0"]
    norms = 80 * 2 * 8192 + 8192                                              # replicated on every rank
    assert per_rank["weights"] == 2 * ((params - norms) // 4 + norms)          # 35.3 GB
    assert per_rank["kv"] == 2 * 80 * 2 * 128 * 2 * (4096 + 2 * 4 + 2)       # its 2 KV heads, 4106 slots
    for gpu_bytes in (H200, 150e9):                                           # 141 GB; an H200 as torch counts it
        est = loader.estimate_memory(cfg, 2, tp=1, batch=1, context=4096, gpu_bytes=gpu_bytes)
        assert not est.fits
        assert est.message.startswith("the model does not fit in GPU memory: target: 141.1 GB of weights")
        assert "Try: --tp 2 (" in est.message
    # a long context and a large batch: the KV cache is what does not fit; the message says what to cut
    est = loader.estimate_memory(cfg, 2, tp=4, batch=64, context=131072, gpu_bytes=H200, prompt_tokens=100)
    assert not est.fits and "--max-context" in est.message and "prompts at once" in est.message
    lo = int(est.message.split("--max-context ")[1].split()[0])
    assert loader.estimate_memory(cfg, 2, 4, 64, lo, H200, prompt_tokens=100).fits
    assert not loader.estimate_memory(cfg, 2, 4, 64, lo + 1, H200, prompt_tokens=100).fits


def test_estimate_counts_what_the_engine_allocates(ckpts):
    """weight_bytes and kv_bytes against the real tensors of the fast engine, whole and per rank."""
    ckpt = loader.Checkpoint(ckpts["target"])
    for world in (1, 2):
        for rank in range(world):
            m = ckpt.fast_shard(rank, world, "cpu", torch.bfloat16, OPS)
            held = sum(t.numel() * t.element_size() for t in fast_tensors(m).values() if t is not None)
            assert loader.weight_bytes(ckpt.cfg, 2, world) == held
            cache = m.new_cache(4, 40, branches=6, k=3)
            allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v + cache.k_tree + cache.v_tree)
            assert loader.kv_bytes(ckpt.cfg, 2, world, 4, 40, branches=6, k=3) == allocated


def test_bench_load_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--smoke", "--tp", "1",
                           "--dir", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["disk"]["bytes"] > 5e6 and out["disk"]["gbps"] > 0
    (load,) = out["loads"]
    assert load["status"] == "ok" and load["ranks"][0]["bytes"] > 5e6 and len(load["greedy_tokens"]) == 4
    assert load["host_peak_above_baseline_max"] > 0 and set(load["goals"]) == {"host_memory", "time"}
