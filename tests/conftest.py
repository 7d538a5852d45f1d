"""Shared fixtures: tiny random Llama / Qwen3 checkpoints written to disk and reloaded offline."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():  # kernels run in Triton's interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped on CPU-only machines such as CI)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def make_checkpoint(path: Path, family: str = "llama", layout: str = "v5", shards: int = 1, seed: int = 0,
                    logit_scale: float = 1.0, **overrides):
    """Write a tiny random checkpoint with transformers; return (path, the transformers model).
    layout "classic" rewrites config.json with `rope_theta` + `rope_scaling` instead of the
    transformers-5 `rope_parameters`, as older checkpoints on the hub have it. A random model's
    next-token distributions are nearly uniform; logit_scale > 1 makes them peakier."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    model = model_cls(cfg_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # random norms and biases, so that a forgotten weight shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        model.model.norm.weight.mul_(logit_scale)  # peakier next-token distributions
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=f"{max(1, total // shards // 1000 + 1)}KB" if shards > 1 else "10GB")
    if layout == "classic":
        cfg = json.loads((path / "config.json").read_text())
        rope = dict(cfg.pop("rope_parameters", None) or {})
        cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
        cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        model = model_cls.from_pretrained(path).eval()
    return path, model


@pytest.fixture
def checkpoint(tmp_path):
    def make(name="m", **kw):
        return make_checkpoint(tmp_path / name, **kw)
    return make


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A tiny Llama target and a smaller draft sharing its vocabulary (loaded with ssd)."""
    import ssd
    root = tmp_path_factory.mktemp("pair")
    make_checkpoint(root / "target", seed=1)
    make_checkpoint(root / "draft", seed=2, num_hidden_layers=1, hidden_size=32, intermediate_size=48)
    return ssd.load_model(root / "target"), ssd.load_model(root / "draft")


# Bigram models: a tiny transformer whose attention output projection is zero, so the next-token distribution
# depends on the last token alone and the target's exact next-token table is known (test_power.py).
BIGRAM = dict(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=2048, logit_scale=6.0)
BIGRAM_DRAFT_NOISE = 1.0


def bigram_model(path: Path, seed: int):
    import ssd
    make_checkpoint(path, seed=seed, **BIGRAM)
    model = ssd.load_model(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()   # no attention: the next token depends on this one alone
    return model


@pytest.fixture(scope="session")
def bigram_pair(tmp_path_factory):
    """A bigram target and a draft close to it (the target's weights, perturbed), as a distilled draft is: then a
    rule that verifies with the wrong q emits nearly the q it really sampled from, far from the target."""
    root = tmp_path_factory.mktemp("bigram")
    target, draft = bigram_model(root / "t", 21), bigram_model(root / "t", 21)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(BIGRAM_DRAFT_NOISE * w.std() * torch.randn(w.shape, generator=g))
    return target, draft
