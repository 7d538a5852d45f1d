"""Our transformer computes what transformers computes, for every config field that changes the math."""
import json

import pytest
import torch

import ssd

CASES = {
    "llama-llama3-rope-untied": dict(family="llama", tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-rope-tied-bias": dict(family="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "llama-mha-head_dim": dict(family="llama", num_key_value_heads=4, head_dim=24),
    "qwen3-qknorm-gqa-tied": dict(family="qwen3", tie_word_embeddings=True, head_dim=32, num_key_value_heads=1),
    "qwen3-bias-untied-yarn": dict(family="qwen3", tie_word_embeddings=False, attention_bias=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen3-sliding-window": dict(family="qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "llama-dynamic-rope": dict(family="llama", max_position_embeddings=24,
                               rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
}


def our_logits(model, ids):
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    return ssd.extend(model, cache, ids.tolist())


@pytest.mark.parametrize("layout", ["v5", "classic"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(checkpoint, case, layout):
    path, ref = checkpoint(layout=layout, **CASES[case])
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    got = our_logits(ssd.load_model(path), ids)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_incremental_decode_equals_full_pass(checkpoint):
    """Prefill then one token at a time gives the same logits as one pass (the KV cache is right)."""
    path, _ = checkpoint(family="qwen3")
    model = ssd.load_model(path)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1)).tolist()[0]
    full = our_logits(model, torch.tensor([ids]))[0]
    cache = model.new_cache(1, 32)
    steps = [ssd.extend(model, cache, [ids[:12]])[0, -1]] + [ssd.extend(model, cache, [[t]])[0, -1] for t in ids[12:]]
    torch.testing.assert_close(torch.stack(steps), full[11:], atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(checkpoint):
    path, ref = checkpoint(shards=3)
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(our_logits(ssd.load_model(path), ids), ref(ids).logits, atol=2e-5, rtol=1e-4)


def test_config_layouts_agree(checkpoint):
    """rope_theta/rope_scaling (classic) and rope_parameters (transformers 5) parse to the same config."""
    path, _ = checkpoint(name="v5", **CASES["llama-llama3-rope-untied"])
    classic, _ = checkpoint(name="classic", layout="classic", **CASES["llama-llama3-rope-untied"])
    a = ssd.ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    b = ssd.ModelConfig.from_dict(json.loads((classic / "config.json").read_text()))
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"


def test_unsupported_architecture_is_a_clear_error(checkpoint):
    path, _ = checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        ssd.load_model(path)


def test_missing_path_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ssd.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ssd.load_model(tmp_path)
