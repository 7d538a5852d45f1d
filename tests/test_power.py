"""Statistical exactness with power: every sampling path, with enough checked transitions that small mistakes fail.

Models. Bigram models (conftest.bigram_pair): a tiny transformer whose attention output projection is zero, so the
logits at a position depend only on the token there. The target's exact next-token table P (V x V) is then known,
and EVERY generated token, from the first one on, is a transition prev -> next that must follow P, whatever the
round, the cache hit or miss, the backup or the row. The draft is the target's weights perturbed, close to it as a
distilled draft is: a rule that verifies with the wrong q then emits nearly the q it sampled from, far from P.

Harness (`check`). The counts C[x, y] of all transitions of a case are tested by V + 1 = 9 Pearson chi-square
tests: one per context x (the row C[x] against n_x P[x], cells of expected count < 5 pooled) and one of all
contexts together; the case's p-value is 9 x the smallest (Bonferroni). A bias confined to one context shows in its
own test, undiluted by the other seven; one spread over all (a wrong temperature) in the pooled one. A transition
that P forbids (outside top-k / top-p) gives p = 0.

Thresholds. A case passes at p > P_PASS = 1e-5 and a negative control must give p < P_FAIL = 1e-6. The file holds
fewer than 100 statistical tests (CPU and GPU), so the chance that a correct engine fails any of them is below
100 x 1e-5 = 1e-3 (Bonferroni over the tests).

Power (`power`). A bias of total variation d = 0.05 in one context x: the token after x follows P'[x], with
1/2 sum_y |P'[x, y] - P[x, y]| = d. Given n_x transitions from x, the statistic of x is approximately noncentral
chi-square with k_x = |support of P[x]| - 1 degrees of freedom and noncentrality
lambda = n_x sum_y (P'[x, y] - P[x, y])^2 / P[x, y]. Mass d moved from token i to token j gives
lambda = n_x d^2 (1 / P[x, i] + 1 / P[x, j]), least for x's two most likely tokens. The test of x flags below
P_PASS / 9, above the chi-square quantile 40.3 at k = 7 (27.4 at k = 2); detecting with probability 0.9 takes
lambda >= 51.6 at k = 7, down to 41.4 at k = 2. Over the cases' tables the least detectable pair has
d^2 (1 / P_1 + 1 / P_2) from 0.019 (T 1) down to 0.0145 (T 0.7, top-k 5, top-p 0.9; k = 3), which needs
n_x = 2,720 to 3,030; the table of least power (T 0.7 unfiltered: 0.0164 at k = 7) needs 3,150. A context that
carries its share (1/8) of a ragged case's ROWS x NEW = 512 x 50 = 25,600 transitions has n_x = 3,200: the
least detectable TV 0.05 shift is caught with probability 0.91 to 0.97, by table. A batch-1 case checks
24 x 1,050 = 25,200 transitions (24 one-row calls; n_x = 3,150), the same power. `test_the_cases_have_the_power`
asserts these from each case's table and count; `test_a_planted_bias_is_caught`
plants the least detectable shift in the context of least power, measures how often counts drawn from it are flagged
(against what `power` says), and checks that real generated counts fail against the table with a planted shift.
What this does not promise: the least detectable of all biases of TV d moves mass in proportion to P between two
halves of the support (lambda = 4 d^2 n_x = 0.01 n_x); power 0.9 against it takes n_x = 5,200 (about 42,000
transitions per case; at 25,600 it is 0.43); and a context visited less than its share (the stationary share goes
down to 0.05 under T 0.7 with top-k 5) gets proportionally less.

Cases: every sampling path, with the settings the command line passes (automatic fan-out and backup, C < 1 with
--saguaro-c; one batch-1 case has exactly the settings of --temperature 1 --saguaro-c 0.5). The SSD cases are a
pairwise covering of implementation (the reference; the fast engine's one-device SSD round, pipelined or not; the
engine's worker path, the draft side on its own thread as with the draft on its own GPU or a tensor-parallel target)
x filter (none, top-p 0.9, top-k 5, both) x backup (jit, fast, auto) x fan-out (automatic, fixed) x Saguaro's C
(0.5, 1) x T (0.7, 1) x draft temperature (T or not) x batch (512 ragged rows, or batch 1): every value of each
factor meets every value of every other factor in some case (`test_the_cases_cover_every_pair`). SD covers
implementation x filter, with T and the draft's temperature pairwise; AR its four filters; batch-1 SD is the streams
test. The batch-aware backup rule picks the fast backup for these equal-sized models at any batch size, so the
automatic cases run a rule that switches between the two backups every few rounds, as the real rule does on real
pairs: a run takes both. The automatic fan-out of the other cases splits a budget of 2(K + 1), not the default 4(K +
1) (SMALL_BUDGET says why). On a GPU the same cases run through the one-graph round (concurrent or not, pipelined or
not) and the worker path (marked gpu).

Negative controls: mistakes that have been made in real SD/SSD code, each of which must fail the test that the
real code passes (p < P_FAIL). scripts/negative_controls.py applies each one as a patch to the source in a scratch
copy and runs its test there, to re-run the whole set after a restructuring in one command.
"""
import itertools
import math

import pytest
import torch

import ssd
from harness import chi2_sf, pearson
import ssd_fast
from ssd_engine import sampling
import ssd_kernels
from ssd_engine import ssd_round

V = 8
PROMPTS = [[1, 4, 2], [5], [0, 3, 6, 7, 2, 2], [7, 1]]          # ragged
P_PASS, P_FAIL = 1e-5, 1e-6
TV, POWER = 0.05, 0.9            # the bias every case must catch, and how often
MIN_TRANSITIONS = 10_000
ROWS, NEW = 512, 50              # a ragged case: 25,600 transitions
CALLS, CALL_NEW = 24, 1050       # a batch-1 case: 24 generations of one row, 25,200 transitions
TOP_P, TOP_K = 0.9, 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run fastest on one CPU thread (on a busy 2-core machine two threads ran them 5-15x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(bigram_pair):
    return bigram_pair


def table(model, temperature=1.0, top_k=0, top_p=1.0):
    """P[x, y] = probability of y after x, in float64."""
    cache = model.new_cache(V, 2)
    logits = ssd.extend(model, cache, [[x] for x in range(V)])[:, -1].double()
    return ssd.to_probs(logits, torch.tensor(temperature, dtype=torch.float64), top_k, top_p)


# --- the harness --------------------------------------------------------------------------------------

def transition_counts(prompts, generated):
    """C[x, y]: how often y followed x, over every generated token (the first one after the prompt's last)."""
    counts = torch.zeros(V, V, dtype=torch.float64)
    for prompt, gen in zip(prompts, generated):
        seq = list(prompt[-1:]) + list(gen)
        for a, b in zip(seq[:-1], seq[1:]):
            counts[a, b] += 1
    return counts


def p_value(counts, P):
    """The case's p-value: 9 x the least of the per-context tests and the pooled one (Bonferroni)."""
    if (counts * (P == 0)).sum() > 0:
        return 0.0
    ps, stat, dof = [], 0.0, 0
    for x in range(V):
        n = counts[x].sum()
        if n == 0:
            continue
        s, d = pearson(counts[x], n * P[x])
        if d > 0:
            ps.append(chi2_sf(s, d))
            stat, dof = stat + s, dof + d
    ps.append(chi2_sf(stat, dof))
    return min(1.0, (V + 1) * min(ps))


def _chi2_isf(alpha, dof):
    lo, hi = 0.0, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, dof) > alpha else (lo, mid)
    return hi


def _ncx2_sf(x, dof, lam):
    """P(noncentral chi-square(dof, lam) > x), as a Poisson(lam / 2) mixture of central ones."""
    total, j = 0.0, 0
    while True:
        w = math.exp(-lam / 2 + j * math.log(lam / 2) - math.lgamma(j + 1)) if lam > 0 else float(j == 0)
        total += w * chi2_sf(x, dof + 2 * j)
        if j > lam / 2 and w < 1e-12:
            return total
        j += 1


def least_detectable_shift(P, x, tv=TV):
    """P with mass `tv` moved from context x's most likely token to its second (the least detectable such shift)."""
    top = P[x].topk(2).indices
    biased = P.clone()
    biased[x, top[0]] -= tv
    biased[x, top[1]] += tv
    return biased


def power(n, P, tv=TV, alpha=P_PASS):
    """The least, over contexts x, of the chance that the harness flags (p < alpha) a TV `tv` shift between x's two
    most likely tokens, with n transitions from x (noncentral chi-square)."""
    worst = 1.0
    for x in range(V):
        support = int((P[x] > 0).sum())
        lam = n * float(((least_detectable_shift(P, x, tv) - P)[x] ** 2 / P[x].clamp_min(1e-300)).sum())
        worst = min(worst, _ncx2_sf(_chi2_isf(alpha / (V + 1), support - 1), support - 1, lam))
    return worst


def check(models, case, prompts, generated, expect_pass=True):
    """At least MIN_TRANSITIONS transitions and p > P_PASS against the case's table (a negative control: p < P_FAIL)."""
    P = table(models[0], case.T, case.top_k, case.top_p)
    counts = transition_counts(prompts, generated)
    assert counts.sum() >= MIN_TRANSITIONS, f"{case.name}: only {int(counts.sum())} transitions"
    p = p_value(counts, P)
    if expect_pass:
        assert p > P_PASS, f"{case.name}: p = {p:.2e}"
    else:
        assert p < P_FAIL, f"{case.name}: a mistake went unseen (p = {p:.2e})"


# --- the cases ----------------------------------------------------------------------------------------

REF, ENG, SYNC, WORKER = "reference", "engine", "engine-unpipelined", "worker"     # the implementations
RAGGED, BATCH1 = "ragged", "batch1"
# The automatic fan-out's budget: the default 4(K + 1) splits into F ~ 4-6 per outcome, so Saguaro's rescale of the
# top F + 1 of these 8 tokens (all 5 under top-k 5) would change little or nothing; 2(K + 1) leaves F + 1 ~ 3 of 8,
# the regime of a real vocabulary. The command line's own default runs in one case (budget None).
SMALL_BUDGET = lambda k: 2 * (k + 1)   # noqa: E731


class Case:
    """One sampling path: the settings of a generate call, its implementation and its batch."""

    def __init__(self, mode, impl, filt="", backup="jit", fan="auto", c=1.0, T=1.0, T_draft=None, batch=RAGGED,
                 k=3, budget=SMALL_BUDGET):
        self.mode, self.impl, self.filt, self.backup, self.fan, self.c = mode, impl, filt, backup, fan, c
        self.T, self.T_draft, self.batch, self.k = T, T_draft, batch, k
        self.top_k = TOP_K if "k" in filt else 0
        self.top_p = TOP_P if "p" in filt else 1.0
        self.budget = budget(k) if budget is not None and mode == "ssd" and fan == "auto" else None
        parts = [mode, impl, f"T{T}"] + ([f"Td{T_draft}"] if T_draft is not None else [])
        parts += [f"topk{TOP_K}"] * bool(self.top_k) + [f"topp{TOP_P}"] * (self.top_p < 1)
        if mode == "ssd":
            parts += [f"K{k}", backup, f"F{fan}"] + [f"N{self.budget}"] * (self.budget is not None) + [f"C{c}"]
        elif mode == "sd":
            parts += [f"K{k}"]
        self.name = "-".join(parts + ([batch] if mode != "ar" or batch != RAGGED else []))

    def settings(self):
        kw = dict(mode=self.mode, temperature=self.T, top_k=self.top_k, top_p=self.top_p)
        if self.mode != "ar":
            kw.update(k=self.k, draft_temperature=self.T_draft)
        if self.mode == "ssd":
            kw.update(backup=self.backup, fan_out=self.fan, saguaro_c=self.c, fan_out_budget=self.budget)
        return kw

    def factors(self):
        return dict(impl=self.impl, filter=self.filt or "none", backup=self.backup, fan=self.fan, c=self.c, T=self.T,
                    draft_T="T" if self.T_draft is None else "other", batch=self.batch)


# A pairwise covering (test_the_cases_cover_every_pair). Each implementation takes each filter once, batch 1 once.
SSD_CASES = [
    Case("ssd", REF, "", "auto", "auto", 0.5, 1.0, 0.7, k=3),
    Case("ssd", REF, "p", "auto", "auto", 0.5, 0.7, 1.0, k=2),
    Case("ssd", REF, "k", "fast", 2, 1.0, 0.7, batch=BATCH1, k=3),
    Case("ssd", REF, "kp", "jit", "auto", 0.5, 1.0, 0.7, k=4),
    Case("ssd", ENG, "", "auto", "auto", 0.5, 1.0, batch=BATCH1, k=3, budget=None),   # the command line's (C 0.5)
    Case("ssd", ENG, "p", "jit", 2, 1.0, 0.7, 1.0, k=2),
    Case("ssd", ENG, "k", "jit", "auto", 0.5, 1.0, k=3),
    Case("ssd", ENG, "kp", "fast", "auto", 1.0, 1.0, 0.7, k=4),
    Case("ssd", SYNC, "", "fast", "auto", 0.5, 0.7, 1.0, k=4),
    Case("ssd", SYNC, "p", "jit", "auto", 1.0, 1.0, k=3),
    Case("ssd", SYNC, "k", "auto", "auto", 0.5, 1.0, 0.7, k=2),
    Case("ssd", SYNC, "kp", "jit", 2, 0.5, 1.0, batch=BATCH1, k=3),
    Case("ssd", WORKER, "", "jit", 2, 1.0, 0.7, 1.0, k=3),
    Case("ssd", WORKER, "p", "fast", 2, 0.5, 0.7, 1.0, batch=BATCH1, k=3),
    Case("ssd", WORKER, "k", "jit", "auto", 0.5, 1.0, k=4),
    Case("ssd", WORKER, "kp", "auto", 2, 1.0, 0.7, k=2),
]
# SD: implementation x filter, with T and the draft's temperature pairwise; AR: its filters
SD_CASES = [
    Case("sd", REF, "", T=1.0, k=2),
    Case("sd", REF, "p", T=0.7, T_draft=1.0, k=3),
    Case("sd", REF, "k", T=1.0, T_draft=0.7, k=4),
    Case("sd", REF, "kp", T=0.7, k=3),
    Case("sd", ENG, "", T=0.7, T_draft=1.0, k=3),
    Case("sd", ENG, "p", T=1.0, k=3),
    Case("sd", ENG, "k", T=0.7, k=2),
    Case("sd", ENG, "kp", T=1.0, T_draft=0.7, k=4),
    Case("sd", SYNC, "", T=1.0, T_draft=0.7, k=4),
    Case("sd", SYNC, "p", T=0.7, k=2),
    Case("sd", SYNC, "k", T=1.0, k=3),
    Case("sd", SYNC, "kp", T=0.7, T_draft=1.0, k=2),
]
AR_CASES = [Case("ar", REF, "k", T=0.7), Case("ar", ENG, "p", T=1.0), Case("ar", SYNC, "kp", T=0.7),
            Case("ar", ENG, "", T=1.0)]
CASES = {c.name: c for c in SSD_CASES + SD_CASES + AR_CASES}
# On a GPU: the one-graph round with its draft side on a second stream or in line, pipelined or not, and the worker
GPU_IMPL = {REF: "graph", ENG: "graph-serial", SYNC: "graph-unpipelined", WORKER: "graph-worker"}


def switching_backup():
    """The automatic backup of these cases: both backups within one run, in a fixed pattern (a stand-in for the
    batch-aware rule, which picks the fast backup for these equal-sized models at every batch size)."""
    pattern = itertools.cycle("jjffjfff")
    return lambda batch, est: "jit" if next(pattern) == "j" else "fast"


def make_engine(models, impl, device="cpu", max_seq=128, **kw):
    target, draft = models
    # WORKER: SSD's worker layout, the draft side on a thread as with the draft on its own device
    return ssd_fast.Engine(target, draft, device=device, dtype=torch.float32, log=lambda *a: None,
                           max_seq=max_seq, pipeline=impl not in (SYNC, "graph-unpipelined"),
                           concurrent=False if impl == "graph-serial" else None,
                           draft_worker=impl in (WORKER, "graph-worker"), **kw)


def generate(models, case, device="cpu", seed=3, rows=ROWS, eos=(), engine_kw=None):
    """Run a case: one call of `rows` ragged rows, or CALLS calls of one row. Returns (prompts, tokens, results)."""
    impl = GPU_IMPL[case.impl] if device != "cpu" else case.impl
    if case.batch == RAGGED:
        calls, new = [[PROMPTS[i % len(PROMPTS)] for i in range(rows)]], NEW
    else:
        calls, new = [[PROMPTS[i % len(PROMPTS)]] for i in range(CALLS)], CALL_NEW
    engine = None if impl == REF else make_engine(models, impl, device, max_seq=new + 32, **(engine_kw or {}))
    prompts, tokens, results = [], [], []
    for i, batch in enumerate(calls):
        kw = dict(case.settings(), max_new_tokens=new, eos_token_id=list(eos), seed=seed + i)
        out = ssd.generate(models[0], batch, draft=models[1], **kw) if engine is None else engine.generate(batch, **kw)
        prompts += batch
        tokens += out.tokens
        results.append(out)
    return prompts, tokens, results


def run_case(models, monkeypatch, case, device="cpu", **kw):
    if case.backup == "auto" and case.mode == "ssd":
        monkeypatch.setattr(ssd, "choose_backup", switching_backup())
    prompts, tokens, results = generate(models, case, device, **kw)
    if case.mode == "ssd":      # the hits happen, so they are tested; an automatic backup takes both
        rows = [(r, b) for out in results for r in out.rounds for b, on in enumerate(r.active) if on and r.hit]
        assert sum(r.hit[b] for r, b in rows) > 0.2 * len(rows)
        if case.backup == "auto":
            assert {r.backup for out in results for r in out.rounds} >= {"jit", "fast"}
    return prompts, tokens


@pytest.mark.parametrize("name", list(CASES))
def test_transitions_follow_the_target(models, monkeypatch, name):
    case = CASES[name]
    check(models, case, *run_case(models, monkeypatch, case))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_transitions_follow_the_target(models, monkeypatch, name):
    """The same cases through the one-graph round (float32: the target's table is float32's)."""
    case = CASES[name]
    check(models, case, *run_case(models, monkeypatch, case, device="cuda"))


def test_eos_rows_stop_and_stay_exact(models):
    """Rows end at EOS at different rounds (token 0: about 11 tokens a row); the transitions before it still follow
    P (SSD, the engine's round)."""
    case = CASES[ENG_SAGUARO]
    prompts, tokens, results = generate(models, case, rows=1024, eos=[0])
    out = results[0]
    assert "eos" in out.finish_reasons and all(t[-1] == 0 for t, r in zip(out.tokens, out.finish_reasons) if r == "eos")
    check(models, case, prompts, tokens)


# --- the design and the power of the harness ------------------------------------------------------------

def test_the_cases_cover_every_pair():
    """Every value of each SSD factor meets every value of every other factor in some SSD case."""
    rows = [c.factors() for c in SSD_CASES]
    names = list(rows[0])
    for a, b in itertools.combinations(names, 2):
        have = {(r[a], r[b]) for r in rows}
        want = set(itertools.product({r[a] for r in rows}, {r[b] for r in rows}))
        assert have == want, f"{a} x {b}: missing {sorted(want - have, key=str)}"
    assert {r["batch"] for r in rows} == {BATCH1, RAGGED} and {r["impl"] for r in rows} == {REF, ENG, SYNC, WORKER}


def _transitions(case):
    return ROWS * NEW if case.batch == RAGGED else CALLS * CALL_NEW


def test_the_cases_have_the_power(models):
    """Every case, ragged or batch 1, catches a TV 0.05 shift between the two most likely tokens of a context that
    carries its share (1/8) of the transitions with probability >= 0.9."""
    for case in CASES.values():
        P = table(models[0], case.T, case.top_k, case.top_p)
        assert _transitions(case) >= MIN_TRANSITIONS
        assert power(_transitions(case) / V, P) >= POWER, case.name


def _context_power(n, P, x):
    return power(n, P[x].expand(V, V))


def test_a_planted_bias_is_caught(models):
    """The least detectable TV 0.05 shift, planted in the context of least power of the cases' table of least power:
    counts drawn from the biased table (N / 8 transitions from every context of a ragged case) are flagged as often
    as `power` says, >= 0.9; and real generated counts, which follow P, pass against P and fail against the table
    with the shift planted in their most visited context."""
    n = ROWS * NEW // V
    settings = min({(c.T, c.top_k, c.top_p) for c in CASES.values()}, key=lambda s: power(n, table(models[0], *s)))
    P = table(models[0], *settings)
    x = min(range(V), key=lambda x: _context_power(n, P, x))
    biased = least_detectable_shift(P, x)
    g = torch.Generator().manual_seed(0)
    draws = 300
    caught = sum(p_value(torch.stack([torch.multinomial(biased[y], n, True, generator=g).bincount(minlength=V)
                                      for y in range(V)]).double(), P) < P_PASS for _ in range(draws)) / draws
    expected = _context_power(n, P, x)
    assert caught >= POWER and abs(caught - expected) < 0.05, (settings, x, caught, expected)
    T, top_k, top_p = settings
    case = Case("ar", ENG, "k" * bool(top_k) + "p" * (top_p < 1), T=T)
    prompts, tokens, _ = generate(models, case)
    counts = transition_counts(prompts, tokens)
    assert p_value(counts, P) > P_PASS
    busiest = int(counts.sum(1).argmax())
    assert p_value(counts, least_detectable_shift(P, busiest)) < P_PASS


# --- negative controls: realistic mistakes, each must fail ----------------------------------------------

_draft_sample, _engine_draft_sample = ssd.draft_sample, sampling.draft_sample   # the right ones
_verify_ref, _merge = ssd_kernels.verify_ref, ssd_round.SSDRound.merge


def _verified_with_q(logits, t, opts, fan_out, c, gen):
    """Saguaro: the proposal drawn from the rescaled q' but verified with the plain q."""
    return _draft_sample(logits, t, opts, fan_out, c, gen)[0], ssd.to_probs(logits, t, opts.top_k, opts.top_p)


def _engine_verified_with_q(ops, logits, t, req, fan_out, gen, f_cap=None):
    return _engine_draft_sample(ops, logits, t, req, fan_out, gen, f_cap)[0], sampling.probs(logits, t, req)


def _sampled_at_other_temperature(logits, t, opts, fan_out, c, gen):
    return _draft_sample(logits, t * 0.7, opts, fan_out, c, gen)[0], _draft_sample(logits, t, opts, fan_out, c, gen)[1]


def _engine_sampled_at_other_temperature(ops, logits, t, req, fan_out, gen, f_cap=None):
    return (_engine_draft_sample(ops, logits, t * 0.7, req, fan_out, gen, f_cap)[0],
            _engine_draft_sample(ops, logits, t, req, fan_out, gen, f_cap)[1])


def _resample_from_p(p, q, proposal, u, noise):
    """verify, but a rejection samples the target's p instead of the residual max(0, p - q)."""
    n, _ = _verify_ref(p, q, proposal, u, noise)
    p_n = p[torch.arange(p.shape[0]), n]
    return n, ssd_kernels.sample_exponential_race_ref(p_n, noise)


def _cached_q_kept_on_a_miss(self, hit, cached, cached_q, s, qs):
    """The SSD round's merge, but a row that missed keeps the cache's q rows next to the backup's tokens."""
    _merge(self, hit, cached, cached_q, s, cached_q)


def _q_prime_not_renormalized(q, fan_out, c):
    """ssd.saguaro_rescale without its division: q' = q with the top-(F+1) scaled by C, summing to less than 1."""
    if c >= 1.0 or fan_out <= 0:
        return q
    top = q.topk(min(fan_out + 1, q.shape[-1]), dim=-1).indices
    return q * torch.ones_like(q).scatter(-1, top, c)


def _masked_q_prime_not_renormalized(q, fan_out, c, f_cap):
    """sampling.saguaro_rescale_masked (the engine's, for an automatic fan-out) without its division."""
    if c >= 1.0:
        return q
    top = q.topk(min(f_cap + 1, q.shape[-1]), dim=-1).indices
    rank = torch.arange(top.shape[-1], device=q.device)
    scale_top = torch.where((rank <= fan_out) & (fan_out > 0), c, 1.0).to(q.dtype).expand(top.shape)
    return q * torch.ones_like(q).scatter(-1, top, scale_top)


def _top_p_not_renormalized(logits, t, top_k, top_p):
    """to_probs with the tokens outside top-p dropped but the rest not divided by their mass."""
    return ssd.to_probs(logits, t, top_k).masked_fill(ssd.to_probs(logits, t, top_k, top_p) == 0, 0.0)


def _draft_top_p_not_renormalized(logits, t, opts, fan_out, c, gen):
    q = ssd.saguaro_rescale(_top_p_not_renormalized(logits, t, opts.top_k, opts.top_p), fan_out, c)
    return ssd.sample(q, gen), q


def _engine_draft_top_p_not_renormalized(ops, logits, t, req, fan_out, gen, f_cap=None):
    q = _top_p_not_renormalized(logits, t, req.top_k, req.top_p)
    if isinstance(fan_out, torch.Tensor):
        q = sampling.saguaro_rescale_masked(q, fan_out, req.c, f_cap)
    else:
        q = ssd.saguaro_rescale(q, fan_out, req.c)
    return sampling.sample(ops, q, gen), q


# the cases the controls run: Saguaro on with an automatic fan-out, in the reference and in the engine's SSD round
REF_SAGUARO = "ssd-reference-T1.0-Td0.7-K3-auto-Fauto-N8-C0.5-ragged"
ENG_SAGUARO = "ssd-engine-T1.0-topk5-K3-jit-Fauto-N8-C0.5-ragged"
_zero_q = lambda s, v: torch.zeros(*s.shape, v, device=s.device)   # noqa: E731
# mistake: {backend: (the case whose test must fail, [(object, attribute, the mistaken version)])}
MISTAKES = {
    # Saguaro: proposals drawn from the rescaled q' but verified with the plain q
    "verify with q, not q'": {REF: (REF_SAGUARO, [(ssd, "draft_sample", _verified_with_q)]),
                              ENG: (ENG_SAGUARO, [(sampling, "draft_sample", _engine_verified_with_q)])},
    # the draft samples at one temperature, the verifier divides by the q of another
    "wrong draft temperature": {
        REF: ("sd-reference-T1.0-K2-ragged", [(ssd, "draft_sample", _sampled_at_other_temperature)]),
        ENG: ("sd-engine-T0.7-Td1.0-K3-ragged",
              [(sampling, "draft_sample", _engine_sampled_at_other_temperature)])},
    # a rejection resamples from p
    "rejection resamples p": {REF: ("sd-reference-T1.0-K2-ragged", [(ssd, "residual", lambda p, q: p)]),
                              ENG: ("sd-engine-T0.7-Td1.0-K3-ragged", [(ssd_kernels, "verify_ref", _resample_from_p)])},
    # the cheap backup's deterministic proposal accepted outright (q(x) taken as 0, not one-hot)
    "fast backup accepted with ratio 1": {
        REF: (REF_SAGUARO, [(ssd, "deterministic_q", _zero_q)]),
        ENG: ("ssd-engine-T1.0-Td0.7-topk5-topp0.9-K4-fast-Fauto-N10-C1.0-ragged",
              [(ssd, "deterministic_q", _zero_q)])},
    # the engine's SSD round: a row that missed is verified with the q rows of the cache, not its backup's
    "cached q kept on a miss": {ENG: (ENG_SAGUARO, [(ssd_round.SSDRound, "merge", _cached_q_kept_on_a_miss)])},
    # Saguaro's rescaled q' not divided by its sum (the engine's masked rescale: an automatic fan-out)
    "Saguaro q' not renormalized": {
        REF: (REF_SAGUARO, [(ssd, "saguaro_rescale", _q_prime_not_renormalized)]),
        ENG: (ENG_SAGUARO, [(sampling, "saguaro_rescale_masked", _masked_q_prime_not_renormalized)])},
    # the draft's top-p distribution not divided by its mass (SD, or SSD at C = 1, where no rescale divides it)
    "draft top-p not renormalized": {
        REF: ("sd-reference-T0.7-Td1.0-topp0.9-K3-ragged", [(ssd, "draft_sample", _draft_top_p_not_renormalized)]),
        ENG: ("sd-engine-T1.0-topp0.9-K3-ragged",
              [(sampling, "draft_sample", _engine_draft_top_p_not_renormalized)])},
}


@pytest.mark.parametrize("mistake,backend", [(m, b) for m, by in MISTAKES.items() for b in by])
def test_mistakes_are_caught(models, monkeypatch, mistake, backend):
    name, patches = MISTAKES[mistake][backend]
    for obj, attr, bad in patches:
        monkeypatch.setattr(obj, attr, bad)
    case = CASES[name]
    check(models, case, *run_case(models, monkeypatch, case), expect_pass=False)


# --- the streams: the draft must not share the verifier's random numbers -----------------------------

STREAM_RUNS, STREAM_NEW = 4200, 6      # 25,200 transitions of batch-1 SD (the power of every case)
STREAM_CONTROL_RUNS = 1700             # the shared-seed control fails far beyond P_FAIL at 10,200


def first_tokens_one_row_at_a_time(backend, models, runs, device="cpu", **kw):
    """Batch 1 (where two lockstep streams meet within the row), many seeds, the first tokens of each."""
    target, draft = models
    prompts, generated = [], []
    engine = None if backend == "reference" else make_engine(models, ENG, device)
    for seed in range(runs):
        prompt = PROMPTS[seed % len(PROMPTS)]
        args = dict(temperature=1.0, max_new_tokens=STREAM_NEW, eos_token_id=[], seed=seed, **kw)
        out = engine.generate([prompt], **args) if engine else ssd.generate(target, [prompt], draft=draft, **args)
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
    runs = STREAM_CONTROL_RUNS if shared else STREAM_RUNS
    prompts, generated = first_tokens_one_row_at_a_time(backend, models, runs, device, mode="sd", k=2)
    case = Case("sd", REF, T=1.0, k=2, batch=BATCH1)
    case.name = f"sd-streams-{backend}"
    check(models, case, prompts, generated, expect_pass=not shared)


# --- the Triton verify and sampling kernels inside the engine (interpreted on a CPU) ----------------

def test_triton_verify_and_race_kernels_in_the_engine(models):
    """The engine with the Triton verify and race kernels gives the tokens it gives with their references (the
    kernels pick the same ids: test_kernels.py), so the statistical cases above, run with the references, hold for
    it. Interpreted on a CPU: a few rows only."""
    if not ssd_kernels.INTERPRET:
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1); on a GPU the cases above run the kernels")
    case = CASES[ENG_SAGUARO]
    kw = dict(case.settings(), max_new_tokens=24, eos_token_id=[], seed=3)
    prompts = PROMPTS
    with_kernels = make_engine(models, ENG, triton_ops=("verify", "sample_exponential_race")).generate(prompts, **kw)
    assert with_kernels.tokens == make_engine(models, ENG).generate(prompts, **kw).tokens


# --- the negative controls as source patches (scripts/negative_controls.py) ------------------------------

def test_every_negative_control_still_applies():
    """Each control of scripts/negative_controls.py finds the code it patches, exactly once, and names tests that
    exist: after a refactor the script says which control no longer applies instead of testing nothing."""
    import importlib.util
    import sys
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("negative_controls", ROOT / "scripts" / "negative_controls.py")
    controls = sys.modules["negative_controls"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(controls)
    assert len(controls.CONTROLS) >= sum(len(by) for by in MISTAKES.values())
    for c in controls.CONTROLS:
        assert not controls.problems(c), (c.name, controls.problems(c))
        for node in c.tests:
            path, test = node.split("::")
            func, param = test.rstrip("]").split("[")
            assert path == "tests/test_power.py" and func in globals(), node
            if func == "test_transitions_follow_the_target":
                assert param in CASES, node
