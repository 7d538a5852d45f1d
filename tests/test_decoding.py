"""Greedy SD and SSD equal greedy AR token for token, and transformers' greedy output."""
import pytest
import torch

import ssd

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [1, 2], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 12], [33]]


def run(model, prompts, draft=None, **kw):
    return ssd.generate(model, prompts, draft=draft, eos_token_id=[], max_new_tokens=kw.pop("max_new_tokens", 24), **kw)


@pytest.mark.parametrize("mode,k,fan_out,backup", [
    ("sd", 1, "auto", "auto"), ("sd", 4, "auto", "auto"), ("ssd", 1, "auto", "jit"), ("ssd", 3, "auto", "auto"),
    ("ssd", 4, 2, "fast"), ("ssd", 5, [3, 1, 0, 0, 1, 2], "jit"), ("ssd", 2, "auto", "fast")])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_ar(tiny_pair, mode, k, fan_out, backup, batch):
    target, draft = tiny_pair
    prompts = PROMPTS[:batch]
    ar = run(target, prompts)
    spec = run(target, prompts, draft=draft, mode=mode, k=k, fan_out=fan_out, backup=backup)
    assert spec.tokens == ar.tokens
    assert all(len(t) == 24 for t in spec.tokens) and set(spec.finish_reasons) == {"length"}


def test_greedy_equals_transformers(checkpoint):
    path, ref = checkpoint(family="qwen3", tie_word_embeddings=True)
    dpath, dref = checkpoint(name="d", family="qwen3", seed=3, num_hidden_layers=1)
    target, draft = ssd.load_model(path), ssd.load_model(dpath, shared_embedding=None)
    prompt = PROMPTS[0]
    ids = torch.tensor([prompt])
    expected = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
    assisted = ref.generate(ids, assistant_model=dref, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert assisted[0, len(prompt):].tolist() == expected        # transformers agrees with itself
    for mode in ("ar", "sd", "ssd"):
        out = run(target, [prompt], draft=draft if mode != "ar" else None, mode=mode, k=3, max_new_tokens=20)
        assert out.tokens[0] == expected, mode


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_draft_equal_to_target_accepts_everything(tiny_pair, mode):
    target, _ = tiny_pair
    k = 4
    out = run(target, PROMPTS[:2], draft=target, mode=mode, k=k, max_new_tokens=1 + 6 * (k + 1), backup="jit")
    s = out.summary()
    assert s["acceptance_rate"] == 1.0
    assert s["tokens_per_round"] == k + 1
    if mode == "ssd":  # at T=0 the bonus token is the draft's own argmax: every round after the first hits
        assert all(all(r.hit) for r in out.rounds[1:])


def test_eos_and_max_new_tokens_are_exact(tiny_pair):
    target, draft = tiny_pair
    ar = run(target, PROMPTS[:1], max_new_tokens=30)
    eos = ar.tokens[0][7]
    for mode in ("ar", "sd", "ssd"):
        out = ssd.generate(target, PROMPTS[:3], draft=draft, mode=mode, k=4, max_new_tokens=11, eos_token_id=eos)
        assert out.tokens[0] == ar.tokens[0][:ar.tokens[0].index(eos) + 1] and out.finish_reasons[0] == "eos"
        assert all(len(t) <= 11 for t in out.tokens)
        assert all(len(t) == 11 or t[-1] == eos for t in out.tokens)


def test_context_limit_stops_with_a_reason(checkpoint):
    path, _ = checkpoint(max_position_embeddings=40)
    model = ssd.load_model(path)
    out = run(model, [list(range(1, 30))], draft=model, mode="sd", k=3, max_new_tokens=50)
    assert out.finish_reasons == ["context"] and 29 + len(out.tokens[0]) <= 40


def test_round_statistics(tiny_pair):
    target, draft = tiny_pair
    out = run(target, PROMPTS[:2], draft=draft, mode="ssd", k=3)
    s = out.summary()
    assert 1 <= s["tokens_per_round"] <= 4 and 0 <= s["cache_hit_rate"] <= 1
    assert {"lookup", "verify", "glue", "tree"} <= set(s["time_s"]) and s["overlapped_time_s"] <= sum(s["time_s"].values())
    assert out.rounds[0].hit == [False, False] and out.rounds[0].backup in ("jit", "fast")


def test_geometric_fan_out():
    for a in (0.3, 0.6, 0.9):
        fan = ssd.geometric_fan_out(4, 20, a)
        assert sum(fan) == 20 and len(fan) == 5
        assert all(fan[j] >= fan[j + 1] for j in range(3))          # decreasing until the bonus
    assert ssd.geometric_fan_out(4, 20, 0.9)[4] > ssd.geometric_fan_out(4, 20, 0.3)[4]


def test_backup_choice_depends_on_batch():
    est = ssd.Estimates(k=4, accept_rate=0.7, hit_rate=0.85, t_verify=1.0, t_jit=0.6)
    assert ssd.choose_backup(1, est) == "jit"
    assert ssd.choose_backup(64, est) == "fast"


def test_ngram_proposal():
    assert ssd.ngram_proposal([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    assert ssd.ngram_proposal([4, 5], 2) == [5, 5]


@pytest.mark.parametrize("kw,message", [
    (dict(k=0, mode="sd"), "k .* must be an integer >= 1"), (dict(temperature=-0.5), "temperature must be"),
    (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
    (dict(saguaro_c=0.0, mode="ssd"), "saguaro_c"), (dict(mode="sd", draft=None), "needs a draft"),
    (dict(max_new_tokens=250), None)])
def test_bad_arguments(tiny_pair, kw, message):
    target, draft = tiny_pair
    kw = {"draft": draft, **kw}
    if message is None:  # a long prompt: fails only when the prompt itself does not fit
        with pytest.raises(ValueError, match="does not fit the context window"):
            ssd.generate(target, list(range(1, 97)) * 3, **kw)
        return
    with pytest.raises(ValueError, match=message):
        ssd.generate(target, PROMPTS[0], **kw)


def test_mismatched_vocabulary(checkpoint):
    a, _ = checkpoint(name="a")
    b, _ = checkpoint(name="b", vocab_size=101)
    with pytest.raises(ValueError, match="vocabulary"):
        ssd.generate(ssd.load_model(a), [1, 2], draft=ssd.load_model(b), mode="sd")


def test_rows_cut_short_mid_round_in_a_batch(tiny_pair):
    """A row that reaches max_new_tokens inside a round rides along frozen: its cache must not grow
    (this once wrote past the KV cache)."""
    target, draft = tiny_pair
    for mode, k in (("ssd", 4), ("sd", 6)):
        out = ssd.generate(target, [PROMPTS[2]] * 8, draft=target, draft_temperature=1.3, mode=mode, k=k,
                           temperature=1.0, max_new_tokens=32, seed=1, eos_token_id=[], backup="jit")
        assert all(len(t) == 32 for t in out.tokens)
