"""Statistical exactness with power: tests that realistic mistakes make fail.

The models are bigram models: a tiny random transformer whose attention output projection is zero, so the
logits at a position depend only on the token there. Then the target's exact next-token table P (V x V) is
known, and EVERY generated token, from the first one on, is a transition prev -> next that must follow P,
whatever the round, the cache hit or miss, the backup or the row. Counting transitions over long generations
gives thousands of checks per run, and a flat model (vocabulary 8, small logits) makes the bias of a wrong rule
large. Each negative control is a mistake that has been made in real SD/SSD code; each must fail the same test
that the real code passes. Rows of a batch, EOS, top-p and ragged prompts are covered; the context limit with a
real (attending) model is checked greedily in test_context.py.
"""
import pytest
import torch

import ssd_kernels
import ssd
import ssd_fast
import ssd_round
from conftest import make_checkpoint

V = 8
BIGRAM = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=1024, logit_scale=6.0)
PROMPTS = [[1, 4, 2], [5], [0, 3, 6, 7, 2, 2], [7, 1]]          # ragged
P_PASS, P_FAIL = 1e-4, 1e-6
DRAFT_NOISE = 1.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def bigram(path, seed):
    make_checkpoint(path, seed=seed, **BIGRAM)
    model = ssd.load_model(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()   # no attention: the next token depends on this one alone
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The target and a draft close to it (the target's weights, perturbed), as a distilled draft is: then a
    rule that verifies with the wrong q emits nearly the q it really sampled from, far from the target."""
    root = tmp_path_factory.mktemp("bigram")
    target, draft = bigram(root / "t", 21), bigram(root / "t", 21)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(DRAFT_NOISE * w.std() * torch.randn(w.shape, generator=g))
    return target, draft


def table(model, temperature=1.0, top_k=0, top_p=1.0):
    """P[x, y] = probability of y after x, in float64."""
    cache = model.new_cache(V, 2)
    logits = ssd.extend(model, cache, [[x] for x in range(V)])[:, -1].double()
    return ssd.to_probs(logits, torch.tensor(temperature, dtype=torch.float64), top_k, top_p)


def transitions_p_value(prompts, generated, P, eos=()):
    """Pearson chi-square of all transitions prev -> next in the generations (the first one from the prompt's
    last token) against P; per previous token, cells of expected count < 5 are pooled. A transition that P
    forbids (e.g. outside top-p) fails at once."""
    counts = torch.zeros(V, V, dtype=torch.float64)
    for prompt, gen in zip(prompts, generated):
        seq = list(prompt) + list(gen)
        for a, b in zip(seq[len(prompt) - 1:-1], seq[len(prompt):]):
            counts[a, b] += 1
    if (counts * (P == 0)).sum() > 0:
        return 0.0
    stat, dof = 0.0, 0
    for a in range(V):
        n = counts[a].sum()
        if n == 0:
            continue
        e, o = n * P[a], counts[a]
        big = e >= 5
        cells = [(float(o[big][i]), float(e[big][i])) for i in range(int(big.sum()))]
        small_e, small_o = float(e[~big].sum()), float(o[~big].sum())
        if small_e > 0:
            cells.append((small_o, small_e))
        stat += sum((oi - ei) ** 2 / ei for oi, ei in cells)
        dof += len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# The decoding paths, each at temperature 1 unless it says otherwise.
PATHS = {
    "sd": dict(mode="sd", k=2),
    "sd-top-p": dict(mode="sd", k=3, top_p=0.8),
    "ssd-jit-saguaro": dict(mode="ssd", k=2, backup="jit", fan_out=2, saguaro_c=0.4, draft_temperature=0.8),
    "ssd-fast": dict(mode="ssd", k=1, backup="fast", fan_out=2),
}
ROWS, NEW = 32, 48


def generate(backend, models, prompts, device="cpu", seed=3, **kw):
    target, draft = models
    kw = dict(dict(temperature=1.0, max_new_tokens=NEW, eos_token_id=[], seed=seed), **kw)
    if backend == "reference":
        return ssd.generate(target, prompts, draft=draft, **kw)
    engine = ssd_fast.Engine(target, draft, device=device, dtype=torch.float32, log=lambda *a: None,
                             **kw.pop("engine", {}))
    return engine.generate(prompts, **kw)


def batch_prompts(n=ROWS):
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def check(models, out, prompts, path, expect_pass=True):
    P = table(models[0], top_p=PATHS[path].get("top_p", 1.0))
    p = transitions_p_value(prompts, out.tokens, P)
    if expect_pass:
        assert p > P_PASS, f"{path}: p = {p:.2e}"
    else:
        assert p < P_FAIL, f"{path}: a mistake went unseen (p = {p:.2e})"


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), ("fast", "cpu"),
                                            pytest.param("fast", "cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("path", list(PATHS))
def test_transitions_follow_the_target(models, backend, device, path):
    prompts = batch_prompts()
    out = generate(backend, models, prompts, device, **PATHS[path])
    if PATHS[path]["mode"] == "ssd":
        assert out.summary()["cache_hit_rate"] > 0.2     # the hits happen, so they are tested
    check(models, out, prompts, path)


def test_eos_rows_stop_and_stay_exact(models):
    """Rows end at EOS at different rounds; the transitions before it still follow P (SSD, fast engine)."""
    prompts = batch_prompts()
    out = generate("fast", models, prompts, eos_token_id=[5], **PATHS["ssd-jit-saguaro"])
    assert "eos" in out.finish_reasons and all(t[-1] == 5 for t, r in zip(out.tokens, out.finish_reasons) if r == "eos")
    check(models, out, prompts, "ssd-jit-saguaro")


# --- negative controls: realistic mistakes, each must fail ---------------------------------------

_draft_sample, _verify_ref = ssd.draft_sample, ssd_kernels.verify_ref     # the right ones, before any patching

def _sampled_from_q_prime_verified_with_q(logits, t, opts, fan_out, c, gen):
    q = ssd.to_probs(logits, t, opts.top_k, opts.top_p)
    return ssd.sample(ssd.saguaro_rescale(q, fan_out, c), gen), q


def _sampled_at_other_temperature(logits, t, opts, fan_out, c, gen):
    s, _ = _draft_sample(logits, t * 0.7, opts, fan_out, c, gen)
    return s, ssd.saguaro_rescale(ssd.to_probs(logits, t, opts.top_k, opts.top_p), fan_out, c)


def _resample_from_p(p, q, proposal, u, noise):
    """verify, but a rejection samples the target's p instead of the residual max(0, p - q)."""
    n, _ = _verify_ref(p, q, proposal, u, noise)
    p_n = p[torch.arange(p.shape[0]), n]
    return n, ssd_kernels.sample_exponential_race_ref(p_n, noise)


def _cached_q_kept_on_a_miss(self, hit, cached, cached_q, s, qs):
    """The SSD round's merge, but a row that missed keeps the cache's q rows next to the backup's tokens."""
    _merge(self, hit, cached, cached_q, s, cached_q)


_merge = ssd_round.SSDRound.merge

MISTAKES = {
    # Saguaro: proposals drawn from the rescaled q' but verified with the plain q
    "verify with q, not q'": ("ssd-jit-saguaro", dict(draft_sample=_sampled_from_q_prime_verified_with_q)),
    # the draft samples at one temperature, the verifier divides by the q of another
    "wrong draft temperature": ("sd", dict(draft_sample=_sampled_at_other_temperature)),
    # a rejection resamples from p
    "rejection resamples p": ("sd", dict(residual=lambda p, q: p, verify=_resample_from_p)),
    # the cheap backup's deterministic proposal accepted outright (q(x) taken as 0, not one-hot)
    "fast backup accepted with ratio 1": ("ssd-fast", dict(deterministic_q=lambda s, v: torch.zeros(*s.shape, v))),
    # the fast engine's SSD round: a row that missed is verified with the q rows of the cache, not its backup's
    "cached q kept on a miss": ("ssd-jit-saguaro", dict(merge=_cached_q_kept_on_a_miss)),
}


def _apply(mistake, monkeypatch, backend):
    path, patches = MISTAKES[mistake]
    engine_kw = {}
    if "draft_sample" in patches:
        bad = patches["draft_sample"]
        monkeypatch.setattr(ssd, "draft_sample", bad)
        monkeypatch.setattr(ssd_fast.Engine, "_draft_sample",
                            lambda self, logits, t, req, f, gen: bad(logits, t, req, f, req.c, gen))
    if "residual" in patches:
        monkeypatch.setattr(ssd, "residual", patches["residual"])
    if "verify" in patches:
        monkeypatch.setattr(ssd_kernels, "verify_ref", patches["verify"])
    if "deterministic_q" in patches:
        monkeypatch.setattr(ssd, "deterministic_q", patches["deterministic_q"])
    if "merge" in patches:
        if backend == "reference":
            pytest.skip("a mistake of the fast engine's SSD round")
        monkeypatch.setattr(ssd_round.SSDRound, "merge", patches["merge"])
    return path, engine_kw


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistakes_are_caught(models, monkeypatch, backend, mistake):
    path, _ = _apply(mistake, monkeypatch, backend)
    prompts = batch_prompts(2 * ROWS)
    out = generate(backend, models, prompts, **PATHS[path])
    check(models, out, prompts, path, expect_pass=False)


# --- the streams: the draft must not share the verifier's random numbers ---------------------------

def first_tokens_one_row_at_a_time(backend, models, runs, device="cpu", **kw):
    """Batch 1 (where two lockstep streams meet within the row), many seeds, the first tokens of each."""
    target, draft = models
    prompts, generated = [], []
    engine = None if backend == "reference" else ssd_fast.Engine(target, draft, device=device, dtype=torch.float32,
                                                                  log=lambda *a: None)
    for seed in range(runs):
        prompt = PROMPTS[seed % len(PROMPTS)]
        args = dict(temperature=1.0, max_new_tokens=6, eos_token_id=[], seed=seed, **kw)
        out = ssd.generate(target, [prompt], draft=draft, **args) if engine is None else engine.generate([prompt], **args)
        prompts.append(prompt)
        generated.append(out.tokens[0])
    return prompts, generated


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), ("fast", "cpu"),
                                            pytest.param("fast", "cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("shared", [False, True])
def test_draft_and_verifier_streams_are_independent(models, monkeypatch, backend, device, shared):
    """Seeding every site alike (what torch.manual_seed does to two GPUs) couples the draft's sampling noise
    with the verifier's uniforms and biases the output; the derived per-site seeds do not."""
    if shared:
        monkeypatch.setattr(ssd, "derive_seed", lambda seed, site: seed)
    prompts, generated = first_tokens_one_row_at_a_time(backend, models, 400, device, mode="sd", k=2)
    p = transitions_p_value(prompts, generated, table(models[0]))
    assert (p < P_FAIL) if shared else (p > P_PASS), p


# --- the Triton verify and sampling kernels inside the engine (interpreted on a CPU) ----------------

def test_triton_verify_and_race_kernels_in_the_engine(models):
    if not ssd_kernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) on a CPU")
    prompts = batch_prompts(12)
    out = generate("fast", models, prompts, engine=dict(triton_ops=("verify", "sample_exponential_race")),
                   max_new_tokens=40, **PATHS["ssd-jit-saguaro"])
    check(models, out, prompts, "ssd-jit-saguaro")
