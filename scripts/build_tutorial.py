"""Write tutorial.ipynb from the cells below and execute it, storing the outputs.

    python scripts/build_tutorial.py              # write + execute (a few minutes on a 2-core CPU)
    python scripts/build_tutorial.py --no-execute # write the cells only (no outputs)

The notebook is generated, not edited by hand: change a cell here, rerun, and commit both files.
Every number the notebook states comes from a cell's output (prose with numbers is rendered by
code, with IPython's Markdown), so a rerun on another machine states that machine's numbers.
Cells tagged `claim-*` print the computed claims that tests/test_notebook.py checks.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tutorial.ipynb"
TIMEOUT_PER_CELL = 900


def md(text):
    return ("markdown", textwrap.dedent(text).strip("\n"), {})


def code(text, tags=(), hidden=False):
    meta = {}
    if tags:
        meta["tags"] = list(tags)
    if hidden:  # an exercise answer: collapsed in Jupyter until the reader opens it
        meta["jupyter"] = {"source_hidden": True, "outputs_hidden": True}
    return ("code", textwrap.dedent(text).strip("\n"), meta)


CELLS = [
# ------------------------------------------------------------------------------------------------ title
md(r"""
# Speculative Speculative Decoding, step by step

This notebook teaches **Speculative Speculative Decoding** (SSD; Kumar, Dao & May, arXiv 2603.03251) and its
optimized form **Saguaro**, on a CPU, with real models: the target is SmolLM2-135M-Instruct and the draft is the
small model distilled from it in `models/smollm2-draft`. Everything runs through `ssd.py`, the project's readable
reference implementation; the notebook only adds measurements and pictures. Read `ssd.py` next to it.

What you will be able to do at the end: write the exact verification rule and say why it is exact, explain what
the speculation cache is keyed by and how it is filled, and reason about when SSD is faster than SD.

1. Autoregressive (AR) decoding and why it is slow
2. Speculative decoding (SD): draft, verify, accept/reject, and why the output distribution is exactly the target's
3. SSD: speculate on the *outcome* of verification while it runs; the speculation cache; one round's tree, and
   the tree decode worked by hand (its KV slots, its attention mask, its positions)
4. Saguaro: geometric fan-out, Saguaro sampling, the backup choice by batch size, and where SSD's rounds go
5. A timeline of rounds and the expected-speed formula, predicting one run from measurements of others
6. The GPU story, from the project's own measurements: when SSD's overlap pays, and when it does not
7. Exercises (answers in collapsed cells, and checked in `tests/test_notebook.py`)
8. A reading guide: which functions of `ssd.py` and `ssd_fast.py` each section corresponds to

**Notation** (the paper's): target distribution $p$, draft distribution $q$, lookahead $K$ (draft tokens per round),
$n$ = number of draft tokens the target accepts in a round ($0 \le n \le K$), recovery token $r$ = the token the
target samples after verification (sampled, but not yet run through the target).

The notebook is generated and executed by `python scripts/build_tutorial.py`; all numbers below are outputs of
that run, on the machine that ran it (a small shared CPU: timings are noisy).
"""),
# ------------------------------------------------------------------------------------------------ setup
md(r"""
## 0. Setup

We load the pair with `ssd_fast.load_pair()` (the reference's models, on the CPU), which converts the target once into `~/.cache/ssd` and loads the default
draft. The CPU work uses one thread: small decoding steps are dominated by per-operation overhead, and on a shared
machine a single thread avoids stalls when another process takes a core.
"""),
code(r"""
import contextlib, math, os, sys, time
from pathlib import Path

ROOT = next(d for d in [Path.cwd(), *Path.cwd().parents] if (d / "ssd.py").is_file())
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

import ssd
import ssd_fast

torch.set_num_threads(1)
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                     "axes.spines.right": False})
NOTEBOOK_START = time.perf_counter()

target, draft, tok, target_dir = ssd_fast.load_pair()


def n_params(model):  # tied embedding and LM head counted once
    return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


for name, m in [("target", target), ("draft", draft)]:
    c = m.cfg
    print(f"{name}: {c.num_hidden_layers} layers, d={c.hidden_size}, {c.num_attention_heads} heads "
          f"({c.num_key_value_heads} KV), vocabulary {c.vocab_size}, {n_params(m) / 1e6:.1f}M parameters as loaded")
"""),
md(r"""
The draft's model card says fewer parameters than the line above: that count is what the checkpoint *stores*.
The draft has no embedding matrix of its own. It borrows the target's embedding $E$ (vocabulary $V$ by the
target's width) through a learned projection $P$ (the draft's width by the target's) stored in its checkpoint:
`ssd.load_model(..., shared_embedding=E)` builds `embed_tokens` $= E P^\top$ at load time, and the LM head is tied
to it. So the file holds the layers, the norms and $P$, while the model that runs holds a full $V \times d$
embedding. The cost of a draft pass follows the loaded count: the LM head multiplies by all of it.
"""),
code(r"""
import embedded
from safetensors import safe_open

draft_dir, _ = embedded.default_draft()
with safe_open(str(draft_dir / "model.safetensors"), "pt") as f:
    stored_shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
stored = sum(math.prod(shape) for shape in stored_shapes.values())
proj_name = ssd.read_config(draft_dir)["ssd_shared_embedding"]["projection"]
proj = math.prod(stored_shapes[proj_name])
V, d = draft.cfg.vocab_size, draft.cfg.hidden_size
print(f"stored in {draft_dir.name}/model.safetensors: {stored / 1e6:.1f}M = {(stored - proj) / 1e6:.2f}M in the layers "
      f"and norms + {proj / 1e6:.2f}M in P {list(stored_shapes[proj_name])}")
print(f"built at load: embed_tokens = E @ P^T, [{V} x {d}] = {V * d / 1e6:.2f}M (shared with the LM head)")
print("loaded = stored - P + V x d:", n_params(draft) == stored - proj + V * d)
""", tags=["claim-draft-params"]),
code(r"""
K = 4              # lookahead: draft tokens per round
N_NEW = 40         # tokens per generation in the timed runs
PROMPT = "Explain photosynthesis in two sentences."
prompt_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}])


def show(t):
    # one token as readable text: a leading space as '␣', a newline as '⏎'
    s = tok.decode([int(t)])
    return s.replace(" ", "␣").replace("\n", "⏎")


@contextlib.contextmanager
def patched(name, replacement):
    # temporarily replace a function inside ssd.py (to record what it does, or to break it on purpose)
    original = getattr(ssd, name)
    setattr(ssd, name, replacement)
    try:
        yield original
    finally:
        setattr(ssd, name, original)


print(f"prompt: {PROMPT!r} -> {len(prompt_ids)} tokens with the chat template")
"""),
# ------------------------------------------------------------------------------------------------ 1. AR
md(r"""
## 1. Autoregressive decoding, and why it is slow

An autoregressive decoder produces one token per forward pass of the target: the pass reads the context (through
the KV cache) and the newest token, and returns $p(\cdot \mid \text{context})$; we sample a token and feed it back.
The passes are strictly sequential, because each needs the token sampled by the one before.

In `ssd.py` this is `ar_round`: one call to `extend(target, cache, [[r]])` per token.
"""),
code(r"""
ar = ssd.generate(target, prompt_ids, mode="ar", max_new_tokens=N_NEW)   # greedy (temperature 0)
ar_stats = ar.summary()
ar_time = ar_stats["time_s"]["verify"]
print(tok.decode(ar.tokens[0]))
print(f"\n{ar_stats['generated_tokens']} tokens: 1 from the prefill pass + {ar_stats['rounds']} decode passes, "
      f"one target pass per token")
print(f"on this machine: {1e3 * ar_time / ar_stats['rounds']:.1f} ms per decode pass, "
      f"{ar_stats['rounds'] / ar_time:.1f} tokens/s")
"""),
md(r"""
Why is this slow? A decode pass over one token still has to read every weight of the model (and, on a GPU, launch
every kernel). Processing a few more tokens in the *same* pass re-uses the weights already read, so it costs little
extra, until the arithmetic itself becomes the bottleneck. We measure the cost of one pass of each model as a
function of how many new tokens it processes at once:
"""),
code(r"""
def pass_time(model, n_tokens, reps=5):
    # median time of one forward pass over n_tokens new tokens after the prompt (KV cache rolled back each time)
    cache = model.new_cache(1, len(prompt_ids) + 64)
    ssd.extend(model, cache, [prompt_ids])
    times = []
    for _ in range(reps):
        cache.lens = [len(prompt_ids)]
        t0 = time.perf_counter()
        ssd.extend(model, cache, [[prompt_ids[-1]] * n_tokens])
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


sizes = [1, 2, 4, K + 1, 8, 16, 20, 32]
t_target = {n: pass_time(target, n) for n in sizes}
t_draft = {n: pass_time(draft, n) for n in sizes}

fig, ax = plt.subplots(figsize=(7, 3.6))
ax.plot(sizes, [1e3 * t_target[n] for n in sizes], "o-", label="target: one pass over n tokens")
ax.plot(sizes, [1e3 * n * t_target[1] for n in sizes], "--", color="gray", label="target: n one-token passes (AR)")
ax.plot(sizes, [1e3 * t_draft[n] for n in sizes], "s-", label="draft: one pass over n tokens")
ax.set_xlabel("new tokens n in the pass"); ax.set_ylabel("ms (this machine)"); ax.set_ylim(0, None)
ax.set_xlim(0, 33); ax.legend(); ax.set_title("Cost of one forward pass")
plt.show()

verify_ratio = t_target[K + 1] / t_target[1]
draft_ratio = t_draft[1] / t_target[1]
display(Markdown(
    f"On this machine one target pass over K+1 = {K + 1} tokens costs **{verify_ratio:.2f}x** a one-token pass "
    f"({1e3 * t_target[K + 1]:.0f} ms against {1e3 * t_target[1]:.0f} ms), while {K + 1} AR passes would cost "
    f"{K + 1}x. A one-token draft pass costs **{draft_ratio:.2f}** of a one-token target pass. "
    f"On a GPU the first curve is flatter still (a pass is bound by reading the weights, not by arithmetic), "
    f"while on a CPU it rises sooner: we will see what that means for SSD in section 5."))
"""),
# ------------------------------------------------------------------------------------------------ 2. SD
md(r"""
## 2. Speculative decoding (SD)

SD (Leviathan et al. 2023; Chen et al. 2023) turns that cheap width into speed. Each round:

1. **Draft**: the draft proposes $s_1, \dots, s_K$, sampling $s_i \sim q_i = q(\cdot \mid \text{context}, r, s_1..s_{i-1})$
   ($K$ small sequential passes).
2. **Verify**: the target runs *one* pass over $[r, s_1, \dots, s_K]$ and gets $p_0, \dots, p_K$ ($p_i$ is its
   distribution for the token after $s_i$; $p_0$ after $r$).
3. **Accept/reject**, left to right: accept $s_i$ with probability $\min\!\left(1, \frac{p_{i-1}(s_i)}{q_i(s_i)}\right)$.
   At the first rejection, after $n$ accepted tokens, sample the new recovery token from the **residual**
   $\operatorname{norm}(\max(0, p_n - q_{n+1}))$. If all $K$ are accepted, sample the bonus token from $p_K$.

The round emits $s_1..s_n$ and the new $r$: $n + 1$ tokens for one target pass. In `ssd.py` this is `sd_round`,
and step 3 is `verify` (with `acceptance_prob` and `residual`). (`ssd.py` indexes the draft's rows from 0, so its
`q[:, i]` is the $q_{i+1}$ above.)

### 2.1 One round by hand

We run one round at temperature 1 with the library's pieces and print every quantity the rule uses.
To show the uniforms $u_i$ that `verify` draws, we copy the random generator's state just before calling it.
We try seeds in order and keep the first round that accepts some proposed tokens and then rejects one: the
rejection is the part of the rule worth seeing, and a round that accepts all $K$ never uses the residual. At the rejected position the cell then lists
the residual's largest entries: the target's $p_n$, the draft's $q_{n+1}$, the clipped difference
$\max(0, p_n - q_{n+1})$ and, normalized, the residual that the recovery token is drawn from.

What to look for: a token can only be rejected where the target rates it below the draft ($p < q$, so
$\min(1, p/q) < 1$), and there the residual is 0, so the recovery token is never the rejected one (exercise 2).
The residual keeps only the tokens the draft under-rated ($p > q$): the rejection hands back to them exactly the
probability that acceptance could not give them, which is why the emitted token follows $p$ (section 2.3).
"""),
code(r"""
T1 = torch.tensor([1.0])
t_cache, d_cache = target.new_cache(1, 256), draft.new_cache(1, 256)
logits = ssd.extend(target, t_cache, [prompt_ids])[:, -1]       # prefill the target...
ssd.extend(draft, d_cache, [prompt_ids])                         # ...and the draft
opts = ssd.Sampling(temperature=[1.0], draft_temperature=[1.0])

for seed in range(100):                                          # until a round accepts some, then rejects
    gen = torch.Generator().manual_seed(seed)
    t_cache.lens, d_cache.lens = [len(prompt_ids)], [len(prompt_ids)]   # back to just after the prefill
    r = int(ssd.sample(ssd.to_probs(logits, T1), gen))           # the first recovery token
    # 1. K draft passes: the proposal s_round [1, K] and the rows it was sampled from, q_round [1, K, V]
    s_round, q_round = ssd.draft_steps(draft, d_cache, [[r]], K, T1, opts, gen)
    # 2. ONE target pass over [r, s_1..s_K]: p_round [1, K+1, V]
    p_round = ssd.to_probs(ssd.extend(target, t_cache, [[r] + s_round[0].tolist()]), T1)
    # 3. accept / reject (u: the uniforms verify is about to draw, from a copy of the generator)
    u = torch.rand(1, K, generator=torch.Generator().set_state(gen.get_state()))
    n_round, r_new = ssd.verify(p_round, q_round, s_round, gen)
    n_round, r_new = int(n_round), int(r_new)
    if 0 < n_round < K:
        break

print(f"seed {seed}; context ends with r = {show(r)!r}\n")
print(f"{'i':>2} {'s_i':>14} {'q(s_i)':>8} {'p(s_i)':>8} {'min(1,p/q)':>10} {'u_i':>6}  outcome")
for i in range(K):
    tok_i = int(s_round[0, i])
    p_i, q_i = float(p_round[0, i, tok_i]), float(q_round[0, i, tok_i])
    a_i = float(ssd.acceptance_prob(torch.tensor(p_i), torch.tensor(q_i)))
    outcome = "accepted" if i < n_round else ("REJECTED" if i == n_round else "(never examined)")
    print(f"{i + 1:>2} {show(tok_i)!r:>14} {q_i:8.3f} {p_i:8.3f} {a_i:10.3f} {float(u[0, i]):6.3f}  {outcome}")
print(f"\nn = {n_round} accepted; new recovery token r = {show(r_new)!r}, sampled from "
      + ("p_K (all accepted: the bonus token)" if n_round == K else f"the residual max(0, p_{n_round} - q_{n_round + 1})"))
print(f"this round emits {n_round + 1} tokens for one target pass: {[show(t) for t in s_round[0, :n_round].tolist() + [r_new]]}")
print("the round rejects a proposed token (n < K):", n_round < K)

if n_round < K:   # the residual at the rejected position: p_n against q_{n+1} (q_round's row n)
    p_n, q_n1 = p_round[0, n_round], q_round[0, n_round]
    res = ssd.residual(p_n, q_n1)
    rejected = int(s_round[0, n_round])
    p_reject = 1 - float(torch.minimum(p_n, q_n1).sum())
    print(f"\nat position {n_round + 1}: P(reject) = 1 - sum min(p_{n_round}, q_{n_round + 1}) = {p_reject:.3f}; "
          f"the residual's largest entries, the rejected token and the recovery token:")
    print(f"{'token':>16} {f'p_{n_round}':>8} {f'q_{n_round + 1}':>8} {'max(0,p-q)':>10} {'residual':>9}")
    rows = [t for t in torch.topk(res, 6).indices.tolist() if float(res[t]) >= 5e-4]   # (shown to 3 decimals)
    rows += [t for t in (rejected, r_new) if t not in rows]
    for t in rows:
        mark = "  <- rejected s" if t == rejected else ("  <- recovery r (sampled)" if t == r_new else "")
        print(f"{show(t)!r:>16} {float(p_n[t]):8.3f} {float(q_n1[t]):8.3f} {float((p_n[t] - q_n1[t]).clamp_min(0)):10.3f} "
              f"{float(res[t]):9.3f}{mark}")
""", tags=["claim-round-rejects"]),
md(r"""
### 2.2 Greedy SD produces exactly the AR tokens

At temperature 0 both distributions are one-hot on their argmax, so the rule becomes "accept while the draft's
token equals the target's argmax; the recovery token is the target's argmax". The output must be the AR output,
token for token. We check it on the prompt of section 1:
"""),
code(r"""
sd = ssd.generate(target, prompt_ids, draft=draft, mode="sd", k=K, max_new_tokens=N_NEW)
sd_stats = sd.summary()
print("greedy SD == AR:", sd.tokens == ar.tokens)
print(f"SD: {sd_stats['rounds']} target passes instead of {ar_stats['rounds']}, "
      f"{sd_stats['tokens_per_round']:.2f} tokens per pass, {sd_stats['acceptance_rate']:.0%} of the proposed tokens accepted")
print(f"on this machine: draft {sd_stats['time_s']['draft']:.2f} s + verify {sd_stats['time_s']['verify']:.2f} s, "
      f"against {ar_time:.2f} s of AR decode passes")
""", tags=["claim-greedy-equal"]),
md(r"""
### 2.3 At temperature 1, the output distribution is exactly the target's

Why does the rule preserve $p$? Look at the first emitted token $x$ of a round (with $p = p_0$, $q = q_1$).
It is $s_1$ if $s_1$ is accepted, otherwise a residual sample:

$$P(x) = \underbrace{q(x)\min\!\left(1, \tfrac{p(x)}{q(x)}\right)}_{\text{proposed and accepted}}
+ \underbrace{\Big(1 - \sum_y \min(p(y), q(y))\Big)}_{P(\text{reject})}\cdot
\frac{\max(0, p(x) - q(x))}{\sum_y \max(0, p(y) - q(y))}
= \min(p(x), q(x)) + \max(0, p(x) - q(x)) = p(x),$$

because $\sum_y \max(0, p(y)-q(y)) = 1 - \sum_y \min(p(y), q(y))$. Given that $x$ was accepted, the same argument
applies to the next position, so the whole sequence follows $p$.

We check this on the real models at a real position: the next token after the raw text below, at temperature 1
with a small top-k (applied to both models, as `generate(top_k=...)` does), so that the outcomes can be enumerated.
First the formula, with `ssd.residual` and `ssd.acceptance_prob`, in float64:
"""),
code(r"""
fruit_ids = tok.encode("My favourite fruit is")
TOP_K = 8


def next_token_probs(model, ids, top_k=TOP_K):
    cache = model.new_cache(1, len(ids))
    return ssd.to_probs(ssd.extend(model, cache, [ids])[0, -1].double(), T1.double(), top_k)


p_full, q_full = next_token_probs(target, fruit_ids), next_token_probs(draft, fruit_ids)
support = torch.nonzero((p_full > 0) | (q_full > 0))[:, 0]    # every token either model can produce here
p_x, q_x = p_full[support], q_full[support]
accept = ssd.acceptance_prob(p_x, q_x)
exact = q_x * accept + (1 - (q_x * accept).sum()) * ssd.residual(p_x, q_x)
print(f"top-k {TOP_K}: {len(support)} tokens have p > 0 or q > 0 here: {[show(t) for t in support.tolist()]}")
print(f"acceptance probability sum min(p, q) = {float((q_x * accept).sum()):.3f}")
print("max |P(first token) - p| < 1e-9:", bool((exact - p_x).abs().max() < 1e-9))
""", tags=["claim-exact-formula"]),
md(r"""
Now the sampled version. We run the round's verification step, `ssd.verify`, on many independent rows at once
(a batch of identical rows: each row draws its own proposal and its own uniforms) and count the first emitted token.
Only $p_0$, $q_1$ and $s_1$ decide that token, so one proposal token ($K = 1$) is enough, and the rows can share the
real $p$ and $q$ computed above; the vocabulary is restricted to the tokens either model can produce (every other
token has probability 0 under both, so nothing changes).

Then we break the rule on purpose, by swapping a function inside `ssd.py` for the duration of a run:

* **always accept** (`acceptance_prob` returns 1): the output is then simply the draft's distribution;
* **resample from p** on a rejection instead of the residual (`residual` returns $p$), a tempting simplification.

A chi-square test compares each histogram with the exact probabilities.
"""),
code(r"""
N_SAMPLES = 200_000


def first_token_counts(n_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = p_x.float().expand(n_rows, 2, -1)                 # p_0 (and p_1, only used for a bonus token) per row
    Q = q_x.float().expand(n_rows, 1, -1)                 # q_1 per row
    s1 = ssd.sample(Q[:, 0], g)[:, None]                  # each row proposes its own s_1 ~ q
    n, r_new = ssd.verify(P, Q, s1, g)
    first = torch.where(n == 1, s1[:, 0], r_new)          # accepted: s_1; rejected: the recovery token
    return torch.bincount(first, minlength=len(support)).double()


def chi_square_pvalue(counts, probs):
    # Pearson's test; a token with probability 0 that occurs is an outright mismatch
    expected = probs * counts.sum()
    if bool(((expected == 0) & (counts > 0)).any()):
        return 0.0
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


runs = {"SD (exact rule)": first_token_counts(N_SAMPLES)}
with patched("acceptance_prob", lambda p_s, q_s: torch.ones_like(p_s)):
    runs["always accept"] = first_token_counts(N_SAMPLES)
with patched("residual", lambda p, q: p):
    runs["resample from p"] = first_token_counts(N_SAMPLES)

ALPHA = 1e-4
for name, counts in runs.items():
    pval = chi_square_pvalue(counts, p_x)
    tv = 0.5 * float((counts / counts.sum() - p_x).abs().sum())
    print(f"{name:>16} matches the target: {pval > ALPHA}  (chi-square p-value {pval:.3g}, total variation {tv:.4f})")

order = torch.argsort(p_x + 1e-3 * q_x, descending=True)
xs = torch.arange(len(support)).float()
fig, ax = plt.subplots(figsize=(10, 3.8))
width = 0.2
ax.bar(xs - 1.5 * width, p_x[order], width, color="black", label="exact target p")
for i, (name, counts) in enumerate(runs.items()):
    ax.bar(xs + (i - 0.5) * width, (counts / counts.sum())[order], width, label=f"{name} ({N_SAMPLES:,} samples)")
ax.plot(xs, q_x[order], "x", color="gray", label="draft q")
ax.set_xticks(xs, [show(t) for t in support[order].tolist()], rotation=45, ha="right")
ax.set_ylabel("probability of the first emitted token"); ax.legend(fontsize=8)
ax.set_title(f"Next token after {tok.decode(fruit_ids)!r} (T=1, top-k {TOP_K})")
plt.show()
""", tags=["claim-sd-distribution"]),
md(r"""
The exact rule's histogram sits on the black bars; "always accept" reproduces the draft's $q$ (gray crosses),
and "resample from p" emits $\min(p, q) + P(\text{reject})\,p$: it over-produces the tokens the draft over-rates
($q > p$), which get emitted both by acceptance *and* by resampling, and under-produces the others.
The real code path is also checked end to end, on the joint distribution of several generated tokens and for every
SSD proposal source, in `tests/test_exactness.py`.
"""),
# ------------------------------------------------------------------------------------------------ 3. SSD
md(r"""
## 3. Speculative speculative decoding (SSD)

In SD the two models take turns: while the target verifies, the draft has nothing to do, and while the draft
drafts, the target waits. SSD puts the draft on its own device and keeps it busy **during** verification: it
guesses what the verification will decide and prepares the next round's proposal for each likely decision.

**The verification outcome.** Everything the next round's draft needs to know is the pair $(n, r)$: how many
tokens were accepted ($n \in \{0..K\}$) and which recovery token the target sampled. The next proposal continues
the sequence $\text{context}, r_{\text{old}}, s_1..s_n, r$. How are the outcomes distributed? If each draft
token is accepted with probability $a$, independently, then $P(n = j) = a^j (1-a)$ for $j < K$ and
$P(n = K) = a^K$. Here is that model against the outcomes of the greedy SD run of section 2.2:
"""),
code(r"""
def outcome_probs(a, k):
    return [a ** j * (1 - a) for j in range(k)] + [a ** k]


def estimate_a(rounds, k):
    # per-token acceptance from geometric outcomes: accepted tokens / (accepted + rejections)
    ns = [n for rd in rounds for n, on in zip(rd.accepted, rd.active) if on]
    return sum(ns) / (sum(ns) + sum(n < k for n in ns)), ns


a_sd, ns = estimate_a(sd.rounds, K)
empirical = [ns.count(j) / len(ns) for j in range(K + 1)]
fig, ax = plt.subplots(figsize=(6, 3))
js = torch.arange(K + 1).float()
ax.bar(js - 0.2, empirical, 0.4, label=f"greedy SD run ({len(ns)} rounds)")
ax.bar(js + 0.2, outcome_probs(a_sd, K), 0.4, label=f"model, a = {a_sd:.2f}")
ax.set_xlabel("n = accepted draft tokens"); ax.set_ylabel("fraction of rounds"); ax.legend()
plt.show()
print(f"estimated per-token acceptance a = {a_sd:.3f}")
"""),
md(r"""
The model is rough (real text has easy stretches, where whole proposals are accepted, and hard ones where the first
token fails, and a short run gives a noisy histogram), but the point stands: every outcome $n$ has a fair chance,
so the draft must prepare for all of them.

**The speculation cache.** During round $t$'s verification, the draft builds a dictionary
$(n, r) \mapsto (K \text{ tokens}, \text{their } K \text{ distributions } q)$ for round $t+1$. When round $t$ ends,
the target sends its outcome $(n, r)$; on a **hit** the next proposal is ready at once (no drafting on the critical
path); on a **miss** a backup produces one (section 4.3). The draft's work per round (`build_speculation_cache`):

1. **Glue pass**: one draft pass over $[r, s_1..s_K]$. It writes the draft's KV cache for those positions (so
   whatever prefix gets accepted, the draft's cache is already right) and gives $K+1$ next-token distributions:
   row $j$ is the draft's guess at what follows $s_j$ (row 0: what follows $r$).
2. **Fork**: for each outcome $n = j$, take the top-$F_j$ tokens of glue row $j$ as candidate recovery tokens.
   For $j < K$, $s_{j+1}$ is excluded: if the target had picked it, it would have been accepted
   (exercise 2 shows the residual gives it probability 0). Candidates are chosen deterministically: they are
   *conditioning*, not proposals, so exactness is untouched.
3. **Tree decode**: every branch $(j, c)$ decodes $K$ tokens, all branches batched: $K$ draft passes over
   $\sum_j F_j$ tokens each. Branch $(j, c)$ sits at RoPE positions $P + j + 1 + d$ ($P$ = position of $r$) but writes
   its KV into its own scratch slots, and attends to the trunk, the glue tokens $r..s_j$, and its own chain.
4. **Populate**: `cache[(j, c)] = (chain tokens, chain q rows)`.

Then the next round verifies a cached proposal with the same exact rule, using the $q$ rows it was sampled from.
So SSD is exact too. We run greedy SSD on our prompt, recording every round's tree by wrapping
`ssd.build_speculation_cache`:
"""),
code(r"""
trees = []


def recording_build(state, draft_, proposal, fan, opts, ctx, stats):
    original_build(state, draft_, proposal, fan, opts, ctx, stats)
    trees.append(dict(context=list(state.tokens[0]), proposal=proposal[0].tolist(), fan=list(fan),
                      entries={key: chain[0].tolist() for key, chain in ctx.cache.entries[0].items()}))


with patched("build_speculation_cache", recording_build) as original_build:
    ssd_run = ssd.generate(target, prompt_ids, draft=draft, mode="ssd", k=K, max_new_tokens=N_NEW)
ssd_stats = ssd_run.summary()
print("greedy SSD == AR:", ssd_run.tokens == ar.tokens)
print(f"SSD: {ssd_stats['rounds']} rounds, {ssd_stats['tokens_per_round']:.2f} tokens per round, "
      f"cache hit rate {ssd_stats['cache_hit_rate']:.2f}, backups on a miss: {ssd_stats['backups']}")
print(f"fan-out per outcome (F_0..F_K) in the first round: {trees[0]['fan']}, {sum(trees[0]['fan'])} branches")
""", tags=["claim-greedy-ssd-equal"]),
md(r"""
Let us look inside one round. We pick a round whose speculation the next round actually used (a hit), preferring
one with several accepted tokens, and list what its cache holds:
"""),
code(r"""
hits_next = [i for i in range(len(trees) - 1) if ssd_run.rounds[i + 1].hit[0]] or list(range(len(trees) - 1))
pick = max(hits_next, key=lambda i: (0 < ssd_run.rounds[i].accepted[0] < K, ssd_run.rounds[i].accepted[0], -i))
tree = trees[pick]
n_out = ssd_run.rounds[pick].accepted[0]
r_out = trees[pick + 1]["context"][-1] if pick + 1 < len(trees) else None
key = (n_out, r_out)
r_tok, glue = tree["context"][-1], [tree["context"][-1]] + tree["proposal"]

print(f"round {pick}: text so far ends with ...{tok.decode(tree['context'][-8:-1])!r}, r = {show(r_tok)!r}")
print(f"proposal verified this round: {[show(t) for t in tree['proposal']]}")
print(f"outcome: n = {n_out}, new r = {show(r_out)!r}  ->  next round's key {key[0], show(key[1])}: "
      f"{'HIT' if key in tree['entries'] else 'miss'}\n")
for j in range(K + 1):
    cands = [(c, chain) for (jj, c), chain in tree["entries"].items() if jj == j]
    excluded = f" (s_{j + 1} = {show(tree['proposal'][j])!r} excluded)" if j < K else ""
    print(f"outcome n={j}: {len(cands)} candidate(s){excluded}")
    for c, chain in cands:
        mark = "   <== used by the next round" if (j, c) == key else ""
        print(f"    r = {show(c)!r:>14} -> {[show(t) for t in chain]}{mark}")
"""),
code(r"""
def draw_tree(tree, key, title):
    glue = [tree["context"][-1]] + tree["proposal"]
    branches = sorted(tree["entries"].items(), key=lambda kv: kv[0][0])     # grouped by outcome j
    rows = len(branches)
    fig, ax = plt.subplots(figsize=(13, 0.4 * (rows + 2) + 1))

    def token(x, y, t, color, used=False):
        ax.text(x, y, show(t), ha="center", va="center", fontsize=8, zorder=3,
                bbox=dict(boxstyle="round,pad=0.25", fc=color, ec="red" if used else "gray", lw=2 if used else 0.8))

    ax.plot([0, K], [0, 0], color="steelblue", lw=1, zorder=1)
    for j, t in enumerate(glue):                            # the glue row: r, s_1..s_K
        token(j, 0, t, "#c6dbef")
    for j in range(K + 1):                                  # the fork of outcome n = j hangs below glue token j
        ys = [-(i + 1) for i, ((jj, _), _) in enumerate(branches) if jj == j]
        if not ys:
            continue
        x = j + 0.5
        ax.plot([j, x, x], [-0.25, -0.25, min(ys)], color="darkorange", lw=1, zorder=1)
        ax.text(-0.9, (max(ys) + min(ys)) / 2, f"n = {j}", ha="right", va="center", fontsize=9, color="darkorange")
    for i, ((j, c), chain) in enumerate(branches):          # one row per branch (j, c): candidate, then K tokens
        y, used = -(i + 1), (j, c) == key
        ax.plot([j + 0.5, j + 1 + K], [y, y], color="darkorange" if used else "lightgray", lw=1, zorder=1)
        token(j + 1, y, c, "#fdd0a2", used)
        for d, t in enumerate(chain):
            token(j + 2 + d, y, t, "#c7e9c0", used)
    ax.set_xlim(-1.6, 2 * K + 1.7); ax.set_ylim(-rows - 0.8, 0.8)
    ax.set_xticks(range(2 * K + 2), ["r"] + [f"+{i}" for i in range(1, 2 * K + 2)])
    ax.set_xlabel("position after r (glue: +0..+K; the candidate of outcome n = j replaces s_(j+1) at +j+1)")
    ax.set_yticks([]); ax.grid(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=10)
    plt.show()


draw_tree(tree, key, f"Round {pick}: glue (blue), fork candidates (orange) per outcome n=j with F = {tree['fan']}, "
          f"chains of K={K} (green); red: the branch the next round used")
"""),
md(r"""
Each row is one entry of the speculation cache: the outcome it bets on ($n = j$ is where the orange candidate
forks off the blue glue row), the candidate recovery token $c$, and the $K$ tokens the draft decoded after it. In the
real system all of this is computed on the draft's device while the target verifies the blue row.
"""),
md(r"""
### 3.1 The tree decode, worked by hand

The tree decode is where SSD's draft does most of its work, and its layout in the KV cache is the part of `ssd.py`
that is easiest to get wrong. We take a tree small enough to draw: $K = 2$ and fan-out $F = [2, 1, 1]$ (two
candidates for the outcome $n = 0$, one each for $n = 1$ and $n = 2$), after a short raw-text prompt. We run one
greedy SSD round with `ssd.generate` and record every forward call `ssd.py` makes to the draft (a PyTorch forward
hook sees the tokens, the RoPE positions, the KV slots and the attention mask that `tree_decode` passes to the
model). Then we build the same tensors by hand from the rules below and check that they are equal.

The rules, for a row whose recovery token $r$ sits at position $P$ (the *trunk* is everything before it):

* **Glue pass**: $r, s_1, \dots, s_K$ at positions $P..P+K$, written to the main slots of the same numbers (in the
  main region of the cache, slot = position), each seeing the trunk and the glue tokens up to itself.
* **Branch $i$, of outcome $n = j$, at depth $d$**: its input token (the candidate at depth 0, then its own chain)
  sits at RoPE position $P + j + 1 + d$, exactly where it would sit if the outcome were $(j, c)$. But several
  branches share those positions, and the main slots from $P + j + 1$ on hold the glue tokens $s_{j+1}..s_K$ that
  this branch bets were rejected. So its key and value go to a **scratch slot** of its own, past the main region:
  slot $M + iK + d$, with $M$ the number of main slots. It may see the trunk and the glue tokens $r..s_j$ (main
  slots up to $P + j$) and its own chain so far (its scratch slots up to depth $d$), nothing else.

A key's position and its slot are decoupled: attention finds keys by slot (the mask), RoPE encodes the position, so
the model cannot tell a key in a scratch slot from one in its natural place.
"""),
code(r"""
K_TREE, FAN_TREE = 2, [2, 1, 1]
tiny_prompt = tok.encode("The capital of France is")
calls = []                                            # every draft forward of the round, as ssd.py made it


def record_call(module, args, output):
    tokens, positions, cache, slots, visible, *keys_at = args
    # ssd.py masks only the slots it reads (keys_at: the slots in use); spread the mask over every slot
    keys_at = keys_at[0] if keys_at else torch.arange(visible.shape[-1])
    every_slot = torch.zeros(*visible.shape[:2], int(keys_at.max()) + 1, dtype=torch.bool)
    every_slot[..., keys_at] = visible
    calls.append(dict(tokens=tokens.clone(), positions=positions.clone(), slots=slots.clone(),
                      visible=every_slot, main_slots=cache.main_slots, logits=output.clone()))


hook = draft.register_forward_hook(record_call)
try:      # backup="jit": the first round always misses (the cache is empty), so the draft proposes s_1..s_K
    tiny = ssd.generate(target, tiny_prompt, draft=draft, mode="ssd", k=K_TREE, fan_out=FAN_TREE, backup="jit",
                        max_new_tokens=2)
finally:
    hook.remove()

M = calls[-1]["main_slots"]                                            # main slots of the draft's cache
first_tree = next(i for i, c in enumerate(calls) if int(c["slots"].min()) >= M)   # the first call into scratch
glue_call, tree_calls = calls[first_tree - 1], calls[first_tree:]
P = len(tiny_prompt)                                                   # position of r: the trunk is the prompt
r_tree, s_tree = int(glue_call["tokens"][0, 0]), glue_call["tokens"][0, 1:].tolist()
N_TREE = sum(FAN_TREE)
branch_j = [j for j in range(K_TREE + 1) for _ in range(FAN_TREE[j])]      # the outcome n = j of each branch
print(f"trunk (the prompt, positions 0..{P - 1}): {[show(t) for t in tiny_prompt]}")
print(f"glue pass: r = {show(r_tree)!r} at position {P}, then the proposal s = {[show(t) for t in s_tree]}")
print(f"draft forwards in this round: {len(calls)} (the prefill, {first_tree - 2} of the jit backup, the glue pass, "
      f"{len(tree_calls)} tree depths); M = {M} main slots, then N*K = {N_TREE}*{K_TREE} scratch slots")
"""),
code(r"""
# The fork: for outcome n = j, the top-F_j tokens of glue row j, without s_(j+1)
cands = []
for j in range(K_TREE + 1):
    scores = glue_call["logits"][0, j].clone()
    if j < K_TREE:
        scores[s_tree[j]] = float("-inf")
    cands += scores.topk(FAN_TREE[j]).indices.tolist()

# Positions, slots and the attention mask of each tree depth, from the rules above
S_TREE = M + N_TREE * K_TREE
hand = []
for depth in range(K_TREE):
    visible = torch.zeros(1, N_TREE, S_TREE, dtype=torch.bool)
    for i, j in enumerate(branch_j):
        visible[0, i, :P + j + 1] = True                                      # trunk + glue r..s_j
        visible[0, i, M + i * K_TREE: M + i * K_TREE + depth + 1] = True      # its own chain, up to itself
    hand.append(dict(positions=torch.tensor([[P + j + 1 + depth for j in branch_j]]),
                     slots=torch.tensor([[M + i * K_TREE + depth for i in range(N_TREE)]]), visible=visible))


def same(name):
    return all(torch.equal(h[name], c[name]) for h, c in zip(hand, tree_calls))


inputs = [c["tokens"][0].tolist() for c in tree_calls]          # the token each branch feeds at each depth
print("fork candidates equal ssd.py's:", cands == inputs[0])
print("hand-built RoPE positions equal ssd.py's:", same("positions"))
print("hand-built KV slots equal ssd.py's:", same("slots"))
print("hand-built attention masks equal ssd.py's:", same("visible"))
for i, j in enumerate(branch_j):         # greedy: the last depth's token is the argmax of its logits
    chain = [inputs[d][i] for d in range(1, K_TREE)] + [int(tree_calls[-1]["logits"][0, i].argmax())]
    print(f"  branch {i}: outcome n = {j}, candidate {show(cands[i])!r} at position {P + j + 1}, chain "
          f"{[show(t) for t in chain]}, slots {M + i * K_TREE}..{M + (i + 1) * K_TREE - 1}")
""", tags=["claim-tree-tensors"]),
md(r"""
The picture: one row per query of the round's draft passes (the glue pass, then each branch at each depth), one
column per KV slot. Light cells are the keys the query may attend to; the dark cell is the slot the query writes
its own key and value to (it sees itself). The red line separates the main slots from the scratch slots. Below it,
the RoPE position of the key each slot holds: on the diagonal in the main region, off it in the scratch region.
"""),
code(r"""
import matplotlib.colors as mcolors

slot_token = {p: t for p, t in enumerate(tiny_prompt + [r_tree] + s_tree)}       # main slots: slot = position
slot_position = {p: p for p in slot_token}
for i, j in enumerate(branch_j):
    for depth in range(K_TREE):
        slot_token[M + i * K_TREE + depth] = inputs[depth][i]
        slot_position[M + i * K_TREE + depth] = P + j + 1 + depth

rows, labels = [], []
glue_names = ["r"] + [f"s_{x}" for x in range(1, K_TREE + 1)]
for qi in range(K_TREE + 1):                           # the glue pass is causal over the main slots
    row = torch.zeros(S_TREE, dtype=torch.long)
    width = glue_call["visible"].shape[-1]
    row[:width] = glue_call["visible"][0, qi].long()
    row[P + qi] = 2
    rows.append(row)
    labels.append(f"glue {glue_names[qi]} = {show(glue_call['tokens'][0, qi])!r}, pos {P + qi}")
for i, j in enumerate(branch_j):
    for depth in range(K_TREE):
        row = hand[depth]["visible"][0, i].long()
        row[M + i * K_TREE + depth] = 2
        rows.append(row)
        labels.append(f"branch {i} (n={j}) depth {depth}: {show(inputs[depth][i])!r}, pos {P + j + 1 + depth}")

fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
ax.imshow(torch.stack(rows), cmap=mcolors.ListedColormap(["white", "#9ecae1", "#08519c"]), vmin=0, vmax=2,
          aspect="auto", interpolation="nearest")
ax.set_yticks(range(len(rows)), labels, fontsize=8)
ax.set_xticks([x - 0.5 for x in range(S_TREE + 1)], minor=True)
ax.set_yticks([y - 0.5 for y in range(len(rows) + 1)], minor=True)
ax.grid(which="minor", color="lightgray", lw=0.5); ax.grid(which="major", visible=False)
ax.axhline(K_TREE + 0.5, color="black", lw=1)
ax.set_title(f"Who sees whom: K = {K_TREE}, fan-out {FAN_TREE}; light = visible, dark = the query's own slot",
             fontsize=10)
xs = sorted(slot_position)
ax2.scatter(xs, [slot_position[x] for x in xs], c=["#6baed6" if x < M else "#fd8d3c" for x in xs], zorder=3)
ax2.plot([0, M - 1], [0, M - 1], color="lightgray", ls="--", lw=1)
ax2.set_ylabel("RoPE position"); ax2.set_ylim(-1, max(slot_position.values()) + 2)
ax2.set_xticks(range(S_TREE), [f"{x}: {show(slot_token[x])!r}" if x in slot_token else f"{x}: (empty)"
                               for x in range(S_TREE)], rotation=90, fontsize=8)
ax2.set_xlabel("KV slot: the token whose key and value it holds")
for a in (ax, ax2):
    a.axvline(M - 0.5, color="red", lw=1)
    a.set_xlim(-0.5, S_TREE - 0.5)
plt.show()
"""),
md(r"""
Read a branch row: it sees the trunk and the glue tokens up to its outcome's $s_j$, skips the rest of the glue
(the tokens it bets were rejected), and sees its own scratch slots. The mask is the whole trick: with it, the
$N$ branches run as one batch of $N$ tokens per depth, and each computes what it would have computed alone. That
is the last check: we decode each branch as an ordinary sequence (trunk, glue up to $s_j$, candidate, chain) with a
fresh cache and plain causal attention, and compare its logits with the ones the tree decode produced.
"""),
code(r"""
worst = 0.0
for i, j in enumerate(branch_j):
    sequence = tiny_prompt + [r_tree] + s_tree[:j] + [inputs[d][i] for d in range(K_TREE)]
    plain = ssd.extend(draft, draft.new_cache(1, len(sequence)), [sequence])[0, P + j + 1:]   # its K positions
    tree_logits = torch.stack([c["logits"][0, i] for c in tree_calls])
    worst = max(worst, float((plain - tree_logits).abs().max()))
print(f"largest |logit difference| between the tree decode and plain decoding of each branch: {worst:.1e}")
print("the tree decode computes what plain decoding computes (|difference| < 1e-3):", worst < 1e-3)
""", tags=["claim-tree-plain"]),
# ------------------------------------------------------------------------------------------------ 4. Saguaro
md(r"""
## 4. Saguaro: three optimizations

### 4.1 Geometric fan-out

The draft has a budget of $B = \sum_j F_j$ branches per round (its tree passes process $B$ tokens each). How should
it be split across the outcomes $n = j$? Outcome $j$ occurs with probability $P_j$ (the model above). Suppose the
chance that $F$ candidates miss the recovery token falls like a power law, $P(\text{miss} \mid F) = F^{-r}$ (this
$r$ is an exponent, not the recovery token; the paper uses the letter for both). Minimizing
the expected miss rate $\sum_j P_j F_j^{-r}$ subject to $\sum_j F_j = B$ (a Lagrange multiplier) gives
$F_j \propto P_j^{1/(1+r)}$, that is

$$F_j \propto a^{j/(1+r)} \ (j < K), \qquad F_K \propto a^{K/(1+r)} (1-a)^{-1/(1+r)},$$

rounded to integers with the budget kept: `ssd.geometric_fan_out(K, B, a, r)`. With `fan_out="auto"`,
`generate` recomputes it every round from its running estimate of $a$.
"""),
code(r"""
BUDGET = 4 * (K + 1)            # generate's default budget
rates = [0.2, 0.4, 0.6, 0.8, 0.95]
fig, ax = plt.subplots(figsize=(7, 3.4))
w = 0.8 / len(rates)
for i, a in enumerate(rates):
    fan = ssd.geometric_fan_out(K, BUDGET, a, 1.0)
    ax.bar(js + (i - len(rates) / 2 + 0.5) * w, fan, w, label=f"a = {a}")
    print(f"a = {a:4}: F = {fan}  (P(n=j) = {[round(x, 2) for x in outcome_probs(a, K)]})")
ax.set_xlabel("outcome n = j"); ax.set_ylabel("candidates F_j"); ax.legend(fontsize=8)
ax.set_title(f"Geometric fan-out, K={K}, budget B={BUDGET}, r=1")
plt.show()
ok = all(sum(ssd.geometric_fan_out(K, BUDGET, a, 1.0)) == BUDGET for a in rates)
print("every allocation spends exactly the budget:", ok)
print(f"with this draft's a = {a_sd:.2f} (section 3): F = {ssd.geometric_fan_out(K, BUDGET, a_sd, 1.0)}")
""", tags=["claim-fan-out"]),
md(r"""
At low acceptance almost all rounds end at $n = 0$, so most candidates go there; at high acceptance the all-accepted
outcome $n = K$ dominates.

### 4.2 Saguaro sampling

A cache miss at a rejection happens when the recovery token, drawn from the residual $\max(0, p - q)$, is not
among the cached candidates, which are the draft's own top tokens. But the residual is largest exactly where the
draft put *less* mass than the target, i.e. mostly away from its top tokens. Saguaro sampling fixes that: when the
draft samples its tree tokens, it multiplies the probabilities of its top-$(F+1)$ tokens by a constant $C \le 1$ and
renormalizes (`ssd.saguaro_rescale`). The residual $\max(0, p - q')$ then has more mass on those top tokens, which
the cache holds: a higher hit rate for some acceptance. It stays exact only because the verifier uses the same $q'$
the tokens were sampled from (`ssd.py` stores $q'$ in the cache).

For one position with target $p$, draft $q$, rescaled $q'$ and candidates = top-$F$ of $q$ excluding the
proposed token $s$, everything can be computed exactly:
acceptance $= \sum_x \min(p(x), q'(x))$, and the probability that a rejection's recovery token is a cached candidate
(derived in the helper below). We average over the positions of the text generated in section 1, at temperature 1,
with $F = F_0$ of a geometric split of a smaller budget (the one the measured runs below use):
"""),
code(r"""
def saguaro_position_stats(p, q, F, C):
    # exact acceptance and P(hit and reject) at each position (rows of p, q), for Saguaro's q' = rescale(q, F, C)
    q2 = ssd.saguaro_rescale(q, F, C)
    accept = torch.minimum(p, q2).sum(-1)
    res = ssd.residual(p, q2)                               # where a rejection's recovery token comes from
    w = (q2 - p).clamp_min(0)                               # P(propose s and reject it), per s
    top = q.topk(F + 1, dim=-1).indices                     # the fork ranks candidates by the draft's own q
    res_top_f = res.gather(-1, top[:, :F]).sum(-1)          # s outside the top-F: candidates are the top-F
    res_next = res.gather(-1, top[:, F:F + 1])[:, 0]        # s inside: it is skipped, candidate F+1 comes in
    w_top_f = w.gather(-1, top[:, :F]).sum(-1)              # (a rejected s has res(s) = 0, see exercise 2)
    hit_and_reject = res_top_f * w.sum(-1) + res_next * w_top_f
    return accept, hit_and_reject, 1 - accept


text = prompt_ids + ar.tokens[0]
positions = range(len(prompt_ids) - 1, len(text) - 1)      # the generated positions
with torch.no_grad():
    p_text = ssd.to_probs(ssd.extend(target, target.new_cache(1, len(text)), [text])[0, positions].double(), T1.double())
    q_text = ssd.to_probs(ssd.extend(draft, draft.new_cache(1, len(text)), [text])[0, positions].double(), T1.double())

SWEEP_BUDGET, SWEEP_ROWS = 12, 8                      # also used by the measured runs below
FAN_SWEEP = ssd.geometric_fan_out(K, SWEEP_BUDGET, a_sd, 1.0)
F0 = FAN_SWEEP[0]
C_grid = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05]
exact_acc, exact_hit = [], []
for C in C_grid:
    acc, hit_rej, rej = saguaro_position_stats(p_text, q_text, F0, C)
    exact_acc.append(float(acc.mean()))
    exact_hit.append(float(hit_rej.sum() / rej.sum()))
    print(f"C = {C:4}: acceptance {exact_acc[-1]:.3f}, P(recovery token is cached | rejection) {exact_hit[-1]:.3f}")
falls = all(x >= y for x, y in zip(exact_acc, exact_acc[1:]))
rises = all(x <= y for x, y in zip(exact_hit, exact_hit[1:]))
print(f"(F = {F0}, {len(positions)} positions) acceptance falls as C decreases: {falls}; "
      f"hit rate at a rejection rises as C decreases: {rises}")
""", tags=["claim-saguaro-exact"]),
md(r"""
Now measured: SSD at temperature 1 on a batch of samples of our prompt, for a few values of $C$, with the fan-out
fixed (so that only $C$ changes) and the synchronous backup on a miss (so that every verified proposal was sampled
from the draft's $q'$). To compare with the exact numbers, we measure the same two quantities: the per-token
acceptance $a$, and the hit rate of the rounds that follow a rejection ($n < K$). The runs sample text at
temperature 1, which wanders further from the draft's habits than the greedy text above, so expect lower levels;
the direction is what to compare.
"""),
code(r"""
def hit_after_rejection(result, k):
    # hit rate of the rounds whose key comes from a rejection (previous round: n < K)
    hits = [rd.hit[b] for prev, rd in zip(result.rounds, result.rounds[1:])
            for b, on in enumerate(rd.active) if on and prev.accepted[b] < k]
    return sum(hits) / max(1, len(hits)), len(hits)


fan_fixed = FAN_SWEEP
measured = {}
for C in [1.0, 0.5, 0.1]:
    run = ssd.generate(target, [prompt_ids] * SWEEP_ROWS, draft=draft, mode="ssd", k=K, temperature=1.0, saguaro_c=C,
                       fan_out=fan_fixed, backup="jit", max_new_tokens=32, seed=1)
    a_run, _ = estimate_a(run.rounds, K)
    hit_rej, n_keys = hit_after_rejection(run, K)
    measured[C] = dict(run=run, a=a_run, hit=hit_rej, keys=n_keys)
    print(f"C = {C}: per-token acceptance {a_run:.3f}, hit rate after a rejection {hit_rej:.3f} "
          f"({n_keys} keys; all rounds: {run.summary()['cache_hit_rate']:.3f}), fan-out {fan_fixed}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
axes[0].plot(C_grid, exact_acc, "o-", label="acceptance")
axes[0].plot(C_grid, exact_hit, "s-", label="P(hit | rejection)")
axes[0].set_title(f"exact, along the greedy text (F_0 = {F0})", fontsize=10)
Cs = list(measured)
axes[1].plot(Cs, [measured[C]["a"] for C in Cs], "o-", label="acceptance a")
axes[1].plot(Cs, [measured[C]["hit"] for C in Cs], "s-", label="hit rate after a rejection")
axes[1].set_title(f"measured in SSD runs (T=1, {SWEEP_ROWS} rows, fan-out {fan_fixed})", fontsize=10)
for ax in axes:
    ax.set_xlabel("Saguaro constant C"); ax.set_ylim(0, 1); ax.invert_xaxis(); ax.legend(fontsize=8)
plt.show()
lo, hi = min(Cs), max(Cs)
display(Markdown(
    f"Measured, from C = {hi} to C = {lo}: acceptance {measured[hi]['a']:.2f} -> {measured[lo]['a']:.2f}, "
    f"hit rate after a rejection {measured[hi]['hit']:.2f} -> {measured[lo]['hit']:.2f} "
    f"(about {measured[lo]['keys']} keys per run: a standard error near "
    f"{math.sqrt(0.25 / measured[lo]['keys']):.2f})."))
"""),
md(r"""
### 4.3 The backup, chosen by batch size

On a miss, two backups can produce the proposal: **jit** runs the draft synchronously ($K$ draft passes before the
target can verify), and **fast** proposes tokens without sampling the draft (an n-gram lookup in the text so far;
a deterministic proposal, verified with $q$ = one-hot, see exercise 1), rarely accepted but free. At batch size $b$ the
whole batch waits for the jit if *any* row misses, which happens with probability $1 - h^b$ ($h$ = hit rate).
`ssd.choose_backup` compares the expected tokens per second of the two:

$$\text{jit: } \frac{E_a}{T_v + (1 - h^b)\,T_{\text{jit}}}, \qquad
\text{fast: } \frac{h\,E_a + (1-h)\,E_{\text{fast}}}{T_v}, \qquad E_a = \frac{1 - a^{K+1}}{1 - a}$$

($E_a$: expected tokens per round from draft proposals, $E_{\text{fast}}$: from the cheap ones). We plug in the
statistics measured in the $C = 1$ run above (a batched run; $E_{\text{fast}}$ from the fast-backup rounds of the greedy run
of section 3), and, for contrast, assumed statistics of a stronger draft, with times in units of $T_v$:
"""),
code(r"""
run = measured[1.0]["run"]
st = run.summary()
jit_times = [rd.times["backup"] for rd in run.rounds if rd.backup == "jit"]
fast_misses = [rd.accepted[0] + 1 for rd in ssd_run.rounds if not rd.hit[0] and rd.backup == "fast"]
scenarios = {
    "measured here": ssd.Estimates(
        k=K, accept_rate=estimate_a(run.rounds, K)[0], hit_rate=st["cache_hit_rate"],
        t_verify=st["time_s"]["verify"] / st["rounds"],
        t_jit=sum(jit_times) / len(jit_times) if jit_times else K * t_draft[1],   # (no miss: K one-token passes)
        tokens_cheap=sum(fast_misses) / len(fast_misses) if fast_misses else 1.2),
    "a stronger, cheaper draft (assumed)": ssd.Estimates(k=K, accept_rate=0.8, hit_rate=0.9, t_verify=1.0,
                                                        t_jit=0.2, tokens_cheap=1.2),
}


def backup_rates(batch, e):
    # the two expected throughputs that ssd.choose_backup compares
    e_a = (1 - e.accept_rate ** (e.k + 1)) / (1 - e.accept_rate)
    jit = e_a / (e.t_verify + (1 - e.hit_rate ** batch) * e.t_jit)
    fast = (e.hit_rate * e_a + (1 - e.hit_rate) * e.tokens_cheap) / e.t_verify
    return jit, fast


batches = list(range(1, 65))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
agree = True
for ax, (name, e) in zip(axes, scenarios.items()):
    curves = [backup_rates(b, e) for b in batches]
    choices = [ssd.choose_backup(b, e) for b in batches]
    agree &= all(c == ("jit" if j >= f else "fast") for c, (j, f) in zip(choices, curves))
    switch = next((b for b, c in zip(batches, choices) if c != choices[0]), None)
    verdict = (f"{choices[0]} below batch {switch}, {choices[switch - 1]} from batch {switch} on" if switch
               else f"{choices[0]} at every batch size")
    print(f"{name}: a = {e.accept_rate:.2f}, h = {e.hit_rate:.2f}, T_jit / T_verify = {e.t_jit / e.t_verify:.2f}, "
          f"E_fast = {e.tokens_cheap:.2f} -> choice: {verdict}")
    ax.plot(batches, [j for j, _ in curves], label="jit backup")
    ax.plot(batches, [f for _, f in curves], label="fast backup")
    if switch:
        ax.axvline(switch, color="gray", ls=":", label=f"switch at batch {switch}")
    ax.set_xscale("log", base=2); ax.set_xlabel("batch size b"); ax.set_title(name, fontsize=10)
    ax.set_ylabel("expected tokens per second per row" if e.t_verify != 1.0 else "tokens per verify time, per row")
    ax.legend(fontsize=8)
plt.show()
print("ssd.choose_backup agrees with the two curves at every batch size:", agree)
""", tags=["claim-backup"]),
md(r"""
The rule holds $T_v$ fixed across batch sizes, which is close to true on a GPU at small batch but not on this CPU
(the measured $T_v$ is the batched run's). The fewer misses and the cheaper the jit relative to the verify, the longer
jit stays worth it; as the batch grows, some row almost always misses, and the whole batch would wait for it.
`generate(backup="auto")` makes this choice every round from its running estimates; the greedy run of section 3
recorded its choices in `ssd_stats["backups"]`.
"""),
md(r"""
### 4.4 Where SSD's rounds go: why fewer tokens per round than SD

With the same draft and the same greedy text, section 3's SSD run emitted fewer tokens per round than section 2.2's
SD run, and its acceptance looked lower. Both runs are greedy and produce the AR text, so we can say exactly what
each round would have accepted. After a position $m$ of the text, a greedy draft proposal is accepted token by token
for as long as the draft's greedy choice equals the target's; one draft pass over the whole text gives the draft's
choice at every position, hence a *match string* (does the draft agree with the target after position $m$?) and,
from it, the number of tokens a draft proposal starting at $m$ would get accepted: the run of matches from $m$,
capped at $K$.

We line up every round of both runs on the text: where it started, hit or miss, which backup ran, and what it
accepted against what a draft proposal from the same position would have.
"""),
code(r"""
text = prompt_ids + ar.tokens[0]                     # the greedy text (SD and SSD produce it too)
with torch.no_grad():
    draft_choice = ssd.extend(draft, draft.new_cache(1, len(text)), [text])[0].argmax(-1).tolist()
match = [draft_choice[m] == text[m + 1] for m in range(len(text) - 1)]   # draft agrees with the target after m


def draft_would_accept(m, k):
    # greedy acceptance of a draft proposal whose first token follows position m: the run of matches from m
    n = 0
    while n < k and m + n < len(match) and match[m + n]:
        n += 1
    return n


def round_rows(result):
    rows, m = [], len(prompt_ids)                    # m: position of the round's r, the context's last token
    for rd in result.rounds:
        hit = rd.hit[0] if rd.hit else None
        rows.append(dict(start=m, n=rd.accepted[0], hit=hit, backup=rd.backup if hit is False else None,
                         draft_n=draft_would_accept(m, result.k)))
        m += rd.accepted[0] + 1
    return rows


sd_rows, ssd_rows = round_rows(sd), round_rows(ssd_run)
print(f"{'round':>5} {'r at':>5} {'':>5} {'backup':>7} {'accepted':>8} {'a draft proposal would':>23}")
for i, row in enumerate(ssd_rows):
    kind = "hit" if row["hit"] else "miss"
    print(f"{i:>5} {row['start']:>5} {kind:>5} {row['backup'] or '':>7} {row['n']:>8} {row['draft_n']:>23}")
    if row["hit"] is False and row["backup"] == "fast":
        proposal = ssd.ngram_proposal(text[:row["start"] + 1], K)
        print(f"{'':>19}n-gram proposal {[show(t) for t in proposal]}, the target's text "
              f"{[show(t) for t in text[row['start'] + 1:row['start'] + 1 + K]]}")
# (the last round of a run is left out of the checks: the text ends there)
sd_agrees = all(row["n"] == row["draft_n"] for row in sd_rows[:-1])
hits_agree = all(row["n"] == row["draft_n"] for row in ssd_rows[:-1] if row["hit"])
print("\nevery SD round accepted what the match string predicts:", sd_agrees)
print("every SSD hit round accepted what a draft proposal from its position would:", hits_agree)
""", tags=["claim-rounds-match"]),
code(r"""
fig, ax = plt.subplots(figsize=(13, 2.6))
first = len(prompt_ids)
xs = list(range(first, len(text) - 1))
ax.scatter([m + 1 for m in xs], [2] * len(xs), c=["#31a354" if match[m] else "#de2d26" for m in xs], marker="s", s=40)
lanes = [("SD", sd_rows, 1), ("SSD", ssd_rows, 0)]
for name, rows, y in lanes:
    for row in rows:
        color = "#3182bd" if row["hit"] in (None, True) else "#756bb1"
        ax.barh(y, row["n"] + 1, left=row["start"] + 0.5, height=0.6, color=color, edgecolor="white")
        ax.text(row["start"] + 0.5 + (row["n"] + 1) / 2, y, f"+{row['n'] + 1}", ha="center", va="center",
                fontsize=7, color="white")
ax.set_yticks([2, 1, 0], ["draft agrees\nwith target", "SD rounds", "SSD rounds"])
ax.set_xlabel("position in the text (a round's bar covers the tokens it emits, after its r)")
ax.set_title("Green: the draft's greedy token at this position is the target's; blue: hit (or SD) round; "
             "purple: SSD miss (backup)", fontsize=10)
ax.grid(axis="y", visible=False)
plt.show()
"""),
code(r"""
hits = [row for row in ssd_rows if row["hit"]]
misses = [row for row in ssd_rows if row["hit"] is False]
fast_misses = [row for row in misses if row["backup"] == "fast"]
a_hits, _ = estimate_a([rd for rd in ssd_run.rounds if rd.hit[0]], K)
# The control: the same SSD run with the jit backup (a miss runs the draft synchronously, as SD does)
jit_run = ssd.generate(target, prompt_ids, draft=draft, mode="ssd", k=K, backup="jit", max_new_tokens=N_NEW)
jit_stats = jit_run.summary()
same_rounds = [rd.accepted for rd in jit_run.rounds] == [rd.accepted for rd in sd.rounds]
print(f"SD:  {sd_stats['rounds']} rounds, {sd_stats['tokens_per_round']:.2f} tokens per round, a = {a_sd:.2f}")
print(f"SSD: {ssd_stats['rounds']} rounds, {ssd_stats['tokens_per_round']:.2f} tokens per round, "
      f"a = {estimate_a(ssd_run.rounds, K)[0]:.2f} over all rounds, {a_hits:.2f} over its hit rounds")
print(f"     {len(hits)} hits at {ssd_stats['tokens_per_round_hit']:.2f} tokens per round, {len(misses)} misses at "
      f"{ssd_stats['tokens_per_round_miss']:.2f}; backups: {ssd_stats['backups']}")
print(f"     a draft proposal at the misses' positions would have been accepted for "
      f"{sum(row['draft_n'] for row in misses)} tokens; the backups got {sum(row['n'] for row in misses)}")
print(f"SSD with backup='jit': {jit_stats['rounds']} rounds, {jit_stats['tokens_per_round']:.2f} tokens per round, "
      f"hit rate {jit_stats['cache_hit_rate']:.2f}, backups {jit_stats['backups']}")
print("hit rounds emit more tokens than miss rounds:",
      ssd_stats["tokens_per_round_hit"] > (ssd_stats["tokens_per_round_miss"] or 0))
print("with the jit backup, SSD's rounds are SD's rounds, one for one:", same_rounds)
jit_backup = [rd.times["backup"] for rd in jit_run.rounds if rd.backup == "jit"]
fast_backup = [rd.times["backup"] for rd in ssd_run.rounds if rd.backup == "fast"]
display(Markdown(
    f"**Where the rounds went.** Every hit round accepted exactly what a draft proposal from its position would "
    f"have: on a hit, SSD verifies the chain the draft decoded in the tree, which at temperature 0 is the chain SD's "
    f"draft would decode from the same context. The difference is the misses: {len(misses)} of "
    f"{ssd_stats['rounds']} rounds (the first round always misses: the speculation cache starts empty). "
    f"At batch 1, `generate`'s rule chose the fast backup for them ({len(fast_misses)} of {len(misses)}), whose "
    f"n-gram proposals got {sum(row['n'] for row in misses)} tokens accepted where the draft's would have got "
    f"{sum(row['draft_n'] for row in misses)}, so each miss emitted {ssd_stats['tokens_per_round_miss']:.2f} tokens "
    f"against {ssd_stats['tokens_per_round_hit']:.2f} per hit. SSD's lower per-token acceptance over all its rounds "
    f"is the same fact: it counts the n-gram proposals (over hit rounds only it is {a_hits:.2f}, against SD's "
    f"{a_sd:.2f}; those two differ only because the runs' rounds start at different positions of the text).\n\n"
    f"With `backup='jit'` a miss runs the draft synchronously, as SD does, and the run's rounds are SD's rounds one "
    f"for one ({jit_stats['tokens_per_round']:.2f} tokens per round). The price is time: a jit backup took "
    + (f"{1e3 * sum(jit_backup) / len(jit_backup):.0f} ms on this machine" if jit_backup else "its K draft passes")
    + (f", the fast one {1e3 * sum(fast_backup) / len(fast_backup):.1f} ms" if fast_backup else "")
    + ". Which is worth it is the batch-size trade of section 4.3: tokens per round against time per round."))
""", tags=["claim-rounds-jit"]),
# ------------------------------------------------------------------------------------------------ 5. timeline
md(r"""
## 5. A timeline of rounds, and the expected speed

`ssd.py` runs the draft and the target one after the other on one device, and times each part of every round.
The real system (two devices) overlaps the draft's glue and tree with the target's verify, so on a hit a round costs
$\max(T_{\text{verify}}, T_{\text{glue}} + T_{\text{tree}})$ plus the lookup, and a miss adds the backup before the
verify can start. Below: the first rounds of the three greedy runs of sections 1-3, as measured (sequential), and the
SSD rounds rescheduled as two devices would run them (the same measured durations, overlapped).
"""),
code(r"""
COLORS = {"verify": "#3182bd", "draft": "#e6550d", "glue": "#fd8d3c", "tree": "#31a354", "backup": "#756bb1",
          "lookup": "black"}


def lanes_sequential(rounds, parts):
    t, bars = 0.0, []
    for i, rd in enumerate(rounds):
        for part in parts:
            d = rd.times.get(part, 0.0)
            if d > 0:
                bars.append((part, t, d, i))
                t += d
    return bars, t


def lanes_overlapped(rounds):
    t, target_bars, draft_bars = 0.0, [], []
    for i, rd in enumerate(rounds):
        tm = rd.times
        t += tm.get("lookup", 0.0)
        if tm.get("backup", 0.0):
            target_bars.append(("backup", t, tm["backup"], i)); t += tm["backup"]
        target_bars.append(("verify", t, tm["verify"], i))
        draft_bars.append(("glue", t, tm["glue"], i))
        draft_bars.append(("tree", t + tm["glue"], tm["tree"], i))
        t += max(tm["verify"], tm["glue"] + tm["tree"])
    return target_bars, draft_bars, t


SHOW = 6
ar_bars, _ = lanes_sequential(ar.rounds[:SHOW * 2], ["verify"])
sd_bars, _ = lanes_sequential(sd.rounds[:SHOW], ["draft", "verify"])
ssd_bars, _ = lanes_sequential(ssd_run.rounds[:SHOW], ["lookup", "backup", "verify", "glue", "tree"])
tgt_bars, drf_bars, _ = lanes_overlapped(ssd_run.rounds[:SHOW])
lanes = [(f"AR ({SHOW * 2} rounds)", ar_bars), (f"SD ({SHOW} rounds)", sd_bars),
         ("SSD, one device (as run)", ssd_bars), ("SSD overlapped: target", tgt_bars),
         ("SSD overlapped: draft", drf_bars)]

fig, ax = plt.subplots(figsize=(13, 3.6))
seen = set()
for y, (name, bars) in enumerate(lanes):
    for part, start, dur, i in bars:
        ax.barh(-y, dur, left=start, color=COLORS[part], edgecolor="white", lw=0.5,
                label=part if part not in seen else None)
        seen.add(part)
        if part in ("verify",) and name != "SSD overlapped: target":
            emitted = 1 if name.startswith("AR") else (sd.rounds[i].accepted[0] + 1 if name.startswith("SD")
                                                       else ssd_run.rounds[i].accepted[0] + 1)
            ax.text(start + dur / 2, -y, f"+{emitted}", ha="center", va="center", fontsize=7, color="white")
ax.set_yticks([-y for y in range(len(lanes))], [name for name, _ in lanes])
ax.set_xlabel("seconds on this machine (labels: tokens emitted by each verify)")
ax.legend(ncol=6, fontsize=8, loc="upper right"); ax.grid(axis="y", visible=False)
plt.show()
"""),
md(r"""
Read the two bottom lanes together: each round the target lane verifies while the draft lane runs the glue pass and
the tree for the next round; the next round starts when both are done. When the draft's lane is longer than the
target's, the target waits: choose $K$ and the fan-out budget so that glue + tree fit inside the verify.

**The expected speed.** With per-token acceptance $a$, a round with a draft proposal emits
$E_a = \frac{1 - a^{K+1}}{1 - a}$ tokens on average (exercise 4), and the expected time of a round is

* AR: $T_v$ (one target pass over one token), and one token per round;
* SD: $T_d + T_v$ (the $K$ draft passes, then the target pass over $K+1$ tokens);
* SSD on two devices: $T_{\text{lookup}} + (1-h)\,T_{\text{backup}} + \max(T_v,\; T_{\text{glue}} + T_{\text{tree}})$,
  with $h$ the cache hit rate and $T_{\text{backup}}$ the cost of a backup on a miss; and, as section 4.4 showed, a
  hit round emits what an SD round would ($E_a$) while a miss emits what its backup gets accepted ($E_{\text{miss}}$),
  so SSD emits $h\,E_a + (1-h)\,E_{\text{miss}}$ tokens per round.

The predicted speed is tokens per round divided by the round time. A prediction is only worth something if its
inputs come from somewhere else than the run it predicts (fed a run's own averages, the formula mostly restates
them). So we **calibrate** on two other prompts, one from each of two domains of `data/prompts/` (the benchmark's
prompt files), running the same three decoders there, and **predict** the runs of sections 1-3 on our prompt:
$a$ from the calibration SD runs, $h$ and $E_{\text{miss}}$ from the calibration SSD runs, every $T$ as the mean
over the calibration rounds. Then we compare with what the runs on our prompt achieved (for SSD, its rounds
rescheduled as two devices would run them, as in the bottom lanes above).
"""),
code(r"""
import json


def e_tokens(a, k):
    return (1 - a ** (k + 1)) / (1 - a)


def mean_part(results, part, keep=lambda rd: True):
    # mean duration of one part over the rounds of one or several runs
    rounds = [rd for res in (results if isinstance(results, list) else [results]) for rd in res.rounds if keep(rd)]
    return sum(rd.times.get(part, 0.0) for rd in rounds) / max(1, len(rounds))


def speed_inputs(ar_runs, sd_runs, ssd_runs):
    # everything the formula needs, measured on the given runs
    ssd_rounds = [rd for res in ssd_runs for rd in res.rounds]
    miss_rounds = [rd for rd in ssd_rounds if not rd.hit[0]]
    return dict(
        a=estimate_a([rd for res in sd_runs for rd in res.rounds], K)[0],
        h=sum(rd.hit[0] for rd in ssd_rounds) / len(ssd_rounds),
        e_miss=sum(rd.accepted[0] + 1 for rd in miss_rounds) / max(1, len(miss_rounds)),
        T_v_ar=mean_part(ar_runs, "verify"), T_d=mean_part(sd_runs, "draft"), T_v_sd=mean_part(sd_runs, "verify"),
        **{f"T_{p}": mean_part(ssd_runs, p) for p in ("lookup", "verify", "glue", "tree")},
        T_backup=mean_part(ssd_runs, "backup", lambda rd: not rd.hit[0]))


def predict(x):
    # tokens per round and seconds per round of each decoder, from the formula above
    e_a = e_tokens(x["a"], K)
    return {"AR": (1.0, x["T_v_ar"]), "SD": (e_a, x["T_d"] + x["T_v_sd"]),
            "SSD (overlapped)": (x["h"] * e_a + (1 - x["h"]) * x["e_miss"],
                                 x["T_lookup"] + (1 - x["h"]) * x["T_backup"] + max(x["T_verify"], x["T_glue"] + x["T_tree"]))}


CAL_PROMPTS = [json.loads(line)["prompt"] for domain in ("chat", "stories")
               for line in (ROOT / "data" / "prompts" / f"{domain}.jsonl").read_text().splitlines()[:1]]
cal_ids = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in CAL_PROMPTS]
cal = {mode: [ssd.generate(target, ids, draft=None if mode == "ar" else draft, mode=mode, k=K, max_new_tokens=N_NEW)
              for ids in cal_ids] for mode in ("ar", "sd", "ssd")}
inputs_cal = speed_inputs(cal["ar"], cal["sd"], cal["ssd"])
inputs_own = speed_inputs([ar], [sd], [ssd_run])           # the same inputs measured on our prompt, for comparison
predicted = predict(inputs_cal)
print("calibration prompts:", CAL_PROMPTS, "\n")

print(f"{'':>17} {'tokens/round':>26} {'ms/round':>20} {'tokens/s (this machine)':>27}")
print(f"{'':>17} {'predicted':>10}{'measured':>10}{'error':>6} {'predicted':>10}{'measured':>10} "
      f"{'predicted':>10}{'measured':>10}{'error':>7}")
table, token_errors, rate_errors = {}, {}, {}
for mode, (result, overlapped) in {"AR": (ar, False), "SD": (sd, False), "SSD (overlapped)": (ssd_run, True)}.items():
    st_ = result.summary()
    seconds = st_["overlapped_time_s"] if overlapped else sum(st_["time_s"].values())
    emitted = st_["generated_tokens"] - 1                  # the first token comes from the prefill
    e_meas, t_meas = emitted / st_["rounds"], seconds / st_["rounds"]
    e_pred, t_pred = predicted[mode]
    token_errors[mode] = (e_pred - e_meas) / e_meas
    rate_errors[mode] = (e_pred / t_pred) / (e_meas / t_meas) - 1
    table[mode] = dict(rate_pred=e_pred / t_pred, rate_meas=e_meas / t_meas)
    print(f"{mode:>17} {e_pred:10.2f}{e_meas:10.2f}{token_errors[mode]:+6.0%} {1e3 * t_pred:10.0f}{1e3 * t_meas:10.0f} "
          f"{e_pred / t_pred:10.1f}{e_meas / t_meas:10.1f}{rate_errors[mode]:+7.0%}")

print(f"\n{'input':>10} {'calibration':>12} {'our prompt':>11}")
for name in ("a", "h", "e_miss", "T_v_ar", "T_d", "T_v_sd", "T_verify", "T_glue", "T_tree", "T_backup"):
    scale, unit = (1e3, " ms") if name.startswith("T_") else (1, "")
    print(f"{name:>10} {scale * inputs_cal[name]:12.2f} {scale * inputs_own[name]:11.2f}{unit}")
print("\ntokens per round: every prediction within 25% of the measurement:",
      all(abs(e) < 0.25 for e in token_errors.values()))
# what the rest of the notebook uses from our prompt's own runs
a_ssd, h = estimate_a(ssd_run.rounds, K)[0], inputs_own["h"]
parts = {p: inputs_own[f"T_{p}"] for p in ("lookup", "verify", "glue", "tree")}
""", tags=["claim-speedup-formula"]),
md(r"""
**What the formula leaves out.** The errors above come from what it treats as constants:

* **The text.** Acceptance is a property of the draft *and* the text: the prompts differ in how predictable their
  answers are, so $a$ measured on some prompts is off on another (compare the two columns of $a$). The formula also
  assumes every token is accepted independently with the same $a$ (the geometric model of section 3), while real
  text comes in easy and hard stretches.
* **The misses.** $h$ and $E_{\text{miss}}$ are averages over few rounds; the first round of every run misses (the
  cache starts empty), which weighs more in short runs; which backup ran depends on `generate`'s running estimates.
* **The machine.** Every $T$ is a mean over another run, on a shared CPU whose speed changes from minute to minute;
  passes also get slower as the context grows, and the prompts have different lengths.
* **The overlap.** The SSD time assumes two devices and a free handshake (the outcome key one way, the proposal
  back). On one device nothing overlaps; on real GPUs the handshake and the host's bookkeeping cost time (section 6).
"""),
md(r"""
Which is fastest on this machine, and what would change on GPUs? The next cell answers from the numbers above and
from the one-pass timings of section 1. For the GPU projection it prices every pass at its measured *one-token*
cost, as if a pass over a few dozen tokens cost the same as over one (true for memory-bound passes on a GPU,
not on this CPU), and ignores the handshake: a projection under stated assumptions, not a measurement.
"""),
code(r"""
fastest = max(table, key=lambda m: table[m]["rate_meas"])
B_ssd = sum(trees[0]["fan"])
tree_step = parts["tree"] / K
draft_lane = (parts["glue"] + parts["tree"]) / parts["verify"]
T1_, t1_ = t_target[1], t_draft[1]
proj = {"AR": 1 / T1_, "SD": e_tokens(a_sd, K) / (K * t1_ + T1_),
        "SSD": e_tokens(a_sd, K) / (max(T1_, (K + 1) * t1_) + (1 - h) * K * t1_)}   # jit misses: SD's tokens (4.4)
display(Markdown(
    f"**Measured here:** AR {table['AR']['rate_meas']:.1f}, SD {table['SD']['rate_meas']:.1f} and overlapped SSD "
    f"{table['SSD (overlapped)']['rate_meas']:.1f} tokens/s, so **{fastest}** is the fastest on this machine. "
    f"The draft's glue + tree take **{draft_lane:.1f}x** the target's verify here"
    + (": the target waits for the draft every round. " if draft_lane > 1 else ": drafting is off the critical path. ")
    + f"One tree step (a draft pass over {B_ssd} branch tokens, plus sampling {B_ssd} tokens from "
    f"{target.cfg.vocab_size:,}-way distributions) takes {1e3 * tree_step:.0f} ms, against "
    f"{1e3 * t_draft[1]:.0f} ms for a one-token draft pass and {1e3 * t_draft[20]:.0f} ms for a plain 20-token one.\n\n"
    f"**Projected for passes that cost the same at any small width** (one-token costs of section 1: "
    f"T_1 = {1e3 * T1_:.0f} ms, t_1 = {1e3 * t1_:.0f} ms; glue + tree = {K + 1} draft passes; a miss adds a jit of "
    f"{K} draft passes): AR {proj['AR']:.1f}, SD {proj['SD']:.1f}, SSD {proj['SSD']:.1f} tokens/s, i.e. SSD at "
    f"**{proj['SSD'] / proj['SD']:.2f}x** SD and **{proj['SSD'] / proj['AR']:.2f}x** AR with this draft's acceptance "
    f"(a = {a_sd:.2f}: with jit misses, SSD's rounds are SD's, section 4.4) and hit rate (h = {h:.2f})."))
"""),
# ------------------------------------------------------------------------------------------------ 6. GPU
md(r"""
## 6. The GPU story, from the project's measurements

Everything above ran on this CPU, where SSD loses. The project also measured its fast engine (`ssd_fast.py`: the
same algorithm with Triton kernels, CUDA graphs, and the draft on its own GPU) on NVIDIA H200s with
`scripts/bench.py`, which writes a `results.json` per run under `benchmarks/`. The cells below read the newest of
those files; nothing is typed in. Two pairs were measured with the same draft: this notebook's pair, and an
*expanded* target, SmolLM2 widened so that it computes the same next-token distribution at the cost of a model of
billions of parameters (`scripts/expand.py`; the next cell prints the sizes), which is the regime SSD is designed
for: a big target and a draft that is cheap beside it.
"""),
code(r"""
import json

BENCH = ROOT / "benchmarks"


def load_gpu_records(root=BENCH):
    # AR/SD/SSD records of every GPU results.json under benchmarks/ (bench.py's format), duplicates dropped
    records, seen = [], set()
    for path in sorted(root.glob("**/results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cfg = data.get("config") or {} if isinstance(data, dict) else {}
        if not isinstance(data, dict) or not isinstance(data.get("records"), list) \
                or not str(cfg.get("device", "")).startswith("cuda"):
            continue
        for rec in data["records"]:
            key = (rec.get("pair"), rec.get("system"), rec.get("temperature"), rec.get("batch"), rec.get("k"),
                   rec.get("c", 1.0), round(rec.get("decode_tok_s") or 0, 3))
            if rec.get("status") != "ok" or rec.get("system") not in ("ar", "sd", "ssd") or rec.get("sweep") \
                    or key in seen:        # (the draft-cost sweep's widened drafts: its own cell below)
                continue
            seen.add(key)
            records.append(dict(rec, file=path.relative_to(ROOT), started=cfg.get("started", ""),
                                gpu=(cfg.get("gpus") or ["?"])[0], pair_info=(data.get("pairs") or {}).get(rec["pair"], {})))
    return records


def newest_comparison(records, pair, temperature, batch=1):
    # AR, SD and SSD (Saguaro C = 1; SD and SSD at their best K) from the newest file that has all three
    by_file = {}
    for r in records:
        if (r["pair"], r["temperature"], r["batch"], r.get("c", 1.0)) == (pair, temperature, batch, 1.0):
            by_file.setdefault(r["file"], []).append(r)
    complete = [rs for rs in by_file.values() if {r["system"] for r in rs} >= {"ar", "sd", "ssd"}]
    if not complete:
        return None
    rs = max(complete, key=lambda rs: (rs[0]["started"], str(rs[0]["file"])))
    return {s: max((r for r in rs if r["system"] == s), key=lambda r: r["decode_tok_s"]) for s in ("ar", "sd", "ssd")}


gpu_records = load_gpu_records()
gpu_table = {(pair, T): c for pair in ("smollm2", "expanded") for T in (0.0, 1.0)
             if (c := newest_comparison(gpu_records, pair, T))}
if not gpu_table:
    print("No GPU results found under benchmarks/ (results.json files written by scripts/bench.py on a GPU): "
          "this section has nothing to show in this checkout.")
else:
    print(f"{'pair':>9} {'T':>2} {'AR':>6} {'SD (K)':>10} {'SSD (K)':>10} {'SSD/SD':>7} {'SSD/AR':>7} {'hit':>5} "
          f"{'verify':>7} {'glue+tree':>9}  file (started, GPU)")
    for (pair, T), c in gpu_table.items():
        pm = c["ssd"].get("parts_ms") or {}
        side = pm.get("glue", math.nan) + pm.get("tree", math.nan)
        ar_, sd_, ssd_ = (c[s]["decode_tok_s"] for s in ("ar", "sd", "ssd"))
        print(f"{pair:>9} {T:2.0f} {ar_:6.0f} {sd_:6.0f} ({c['sd']['k']}) {ssd_:6.0f} ({c['ssd']['k']}) {ssd_ / sd_:7.2f} "
              f"{ssd_ / ar_:7.2f} {c['ssd'].get('hit_rate') or math.nan:5.2f} {pm.get('verify', math.nan):5.2f}ms "
              f"{side:7.2f}ms  {c['ssd']['file']} ({c['ssd']['started']}, {c['ssd']['gpu']})")
    for pair in dict.fromkeys(p for p, _ in gpu_table):
        info = next(c["ssd"]["pair_info"] for (p, _), c in gpu_table.items() if p == pair)
        t_params, d_params = (info.get(m, {}).get("params") for m in ("target", "draft"))
        if t_params and d_params:
            print(f"{pair}: target {t_params / 1e9:.2f}B parameters, draft {d_params / 1e6:.1f}M "
                  f"({d_params / t_params:.2%} of the target)")

    fig, axes = plt.subplots(1, len(gpu_table), figsize=(3.2 * len(gpu_table), 3.2), sharey=False)
    for ax, ((pair, T), c) in zip(list(axes) if len(gpu_table) > 1 else [axes], gpu_table.items()):
        rates = [c[s]["decode_tok_s"] for s in ("ar", "sd", "ssd")]
        ax.bar(["AR", f"SD\nK={c['sd']['k']}", f"SSD\nK={c['ssd']['k']}"], rates, color=["gray", "#3182bd", "#31a354"])
        ax.set_title(f"{pair}, T = {T:g}", fontsize=10)
        ax.set_ylabel("decode tokens/s, batch 1")
    plt.tight_layout()
    plt.show()
""", tags=["claim-gpu-table"]),
md(r"""
These runs used the engine before its SSD round became one CUDA graph (`ssd_round.py`, below). In them, on the
expanded target SSD is at its best; on this notebook's own pair it is far slower than SD. The columns
*verify* and *glue+tree* say why (both measured by the benchmark's profiler, the parts one after the other): SSD
hides the draft's work under the verify, which only helps if the draft's side of a round (the glue pass and the
$K$ tree steps over all branches) fits under it. With a 135M target the verify is short and the draft's tree is
longer: the target waits for the draft every round, as on this CPU. Across every GPU configuration the project
measured (pairs, temperatures, batch sizes, $K$), SSD's speed relative to SD against that ratio:
"""),
code(r"""
points = []
for r in gpu_records:
    pm = r.get("parts_ms") or {}
    if r["system"] != "ssd" or r.get("c", 1.0) != 1.0 or not pm.get("verify") or "tree" not in pm:
        continue
    sd_same = [s for s in gpu_records if s["system"] == "sd" and s["file"] == r["file"] and
               (s["pair"], s["temperature"], s["batch"], s["k"]) == (r["pair"], r["temperature"], r["batch"], r["k"])]
    if sd_same:
        points.append(dict(pair=r["pair"], batch=r["batch"], k=r["k"], T=r["temperature"],
                           side=(pm.get("glue", 0.0) + pm["tree"]) / pm["verify"],
                           ratio=r["decode_tok_s"] / sd_same[0]["decode_tok_s"]))
if not points:
    print("No GPU configuration with both SD and a profiled SSD run under benchmarks/.")
else:
    fig, ax = plt.subplots(figsize=(8, 4))
    for (pair, batch), color, marker in zip(sorted({(p["pair"], p["batch"]) for p in points}),
                                            ["#31a354", "#74c476", "#a1d99b", "#3182bd", "#6baed6", "#9ecae1"],
                                            ["o", "s", "^", "D", "v", "P"]):
        sel = [p for p in points if (p["pair"], p["batch"]) == (pair, batch)]
        ax.scatter([p["side"] for p in sel], [p["ratio"] for p in sel], color=color, marker=marker,
                   label=f"{pair}, batch {batch}", edgecolor="black", lw=0.4, s=45)
    ax.axhline(1, color="gray", ls="--", lw=1); ax.axvline(1, color="red", ls=":", lw=1)
    ax.set_xlabel("SSD's draft side (glue + tree) / verify"); ax.set_ylabel("SSD tokens/s / SD tokens/s")
    ax.set_title("Where SSD's overlap pays: above the dashed line", fontsize=10); ax.legend(fontsize=8)
    plt.show()
    wins = [p for p in points if p["ratio"] > 1]
    print(f"{len(points)} GPU configurations with SD and SSD side by side; SSD faster than SD in {len(wins)}")
    print("every configuration where SSD beat SD had its draft side shorter than the verify:",
          all(p["side"] < 1 for p in wins))
    print("no configuration whose draft side is longer than the verify beat SD:",
          not any(p["ratio"] > 1 for p in points if p["side"] > 1))
    print("the draft side shorter than the verify did not suffice everywhere (some lost):",
          any(p["ratio"] <= 1 for p in points if p["side"] < 1))
    best = max(points, key=lambda p: p["ratio"])
    print(f"best SSD/SD: {best['ratio']:.2f} ({best['pair']}, T = {best['T']:g}, batch {best['batch']}, K = {best['k']}, "
          f"draft side {best['side']:.2f} of the verify)")
""", tags=["claim-gpu-pays"]),
md(r"""
Since then the fast engine runs SSD's round, when the draft shares the target's GPU, as one CUDA graph
(`ssd_round.py`): the lookup, the backup merged by selection, the target's verify and commit, and the draft's glue
pass, fork and tree on a second stream inside the same graph, so the draft's side hides under the verify and the
host only launches the graph and reads one small buffer. `scripts/profile_round.py` measured AR, SD and SSD side
by side in one process on both pairs (`benchmarks/ssd_round/`): the best of each, and SSD's round against the bare
verify of the same $K$ (*hit/verify*: 1 would be a round that costs nothing beyond the verify):
"""),
code(r"""
def load_round_profiles(root=BENCH / "ssd_round"):
    rows = []
    for path in sorted(root.glob("*.json")):
        if path.name.startswith("earlier_"):     # an earlier version of the round, kept for one comparison
            continue
        data = json.loads(path.read_text())
        rows += [dict(r, pair=data["meta"]["pair"]) for r in data["rows"] if r["batch"] == 1]
    return rows


round_rows = load_round_profiles()
if not round_rows:
    print("no benchmarks/ssd_round/*.json here (scripts/profile_round.py writes them)")
for (pair, T) in sorted({(r["pair"], r["temperature"]) for r in round_rows}):
    best = {}
    for r in round_rows:
        if (r["pair"], r["temperature"]) == (pair, T) and (r["system"] not in best or r["tok_s"] > best[r["system"]]["tok_s"]):
            best[r["system"]] = r
    line = ", ".join(f"{s.upper()} {b['tok_s']:.0f} tok/s" + (f" (K={b['k']})" if b["k"] else "") for s, b in best.items())
    ssd_best = best.get("ssd")
    extra = (f"; SSD/SD {ssd_best['tok_s'] / best['sd']['tok_s']:.2f}, hit rate {ssd_best['hit_rate']:.2f}, "
             f"hit/verify {ssd_best['hit_over_verify']:.2f}") if ssd_best and "sd" in best else ""
    print(f"{pair}, T = {T:g}: {line}{extra}")
""", tags=["claim-ssd-round"]),
md(r"""
Fitting under the verify is necessary, not sufficient. Even where the draft is hidden, a hit round costs more than
the bare verify (the handshake, the host's bookkeeping), a miss adds its backup, and the gain is bounded by what SD
spends drafting: a round of SD costs $T_d + T_v$ and a hit round of SSD at least $T_v$, so with the same tokens per
round SSD can beat SD by at most $(T_d + T_v) / T_v$. With a cheap draft and a long verify that bound is small;
SSD needs a draft that is expensive enough to be worth hiding, yet cheap enough that its whole tree fits under the
verify. Larger batches make the verify no longer and the tree wider, and make a miss somewhere in the batch likely.

**One GPU round, as the engine recorded it.** `ssd_fast.Engine.generate(..., profile=True)` records when each part
of each round ran, on which thread, and the benchmark wrote them as a Chrome trace (open it in `chrome://tracing` or
Perfetto). The project keeps one such trace, of the expanded pair at batch 1 where SSD beat SD, at
`benchmarks/tutorial/ssd_round_trace.json` (written by the run of
`benchmarks/h200_2026-11-28b/expanded_ssd/results.json`, in the table above). Profiling waits for each part to finish, so these rounds are somewhat
longer than the benchmark's unprofiled ones.
"""),
code(r"""
TRACE = BENCH / "tutorial" / "ssd_round_trace.json"
if not TRACE.is_file():
    print(f"No trace at {TRACE.relative_to(ROOT)}: write one with scripts/bench.py on a GPU (SSD, batch 1).")
else:
    events = json.loads(TRACE.read_text())["traceEvents"]
    title = next(e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name")
    threads = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X" and "round" in e.get("args", {})]
    by_round = {}
    for e in spans:
        by_round.setdefault(e["args"]["round"], []).append(e)

    def round_info(i, es):
        part = {e["name"]: e for e in es}
        verify_end = part["verify"]["ts"] + part["verify"]["dur"]
        draft_end = max(e["ts"] + e["dur"] for e in es if e["name"] in ("glue", "tree"))
        whole = part.get(f"round {i}")
        return dict(hit=part["verify"]["args"]["hit"][0], verify=part["verify"]["dur"] / 1e3,
                    side=sum(e["dur"] for e in es if e["name"] in ("glue", "tree")) / 1e3,
                    round=whole["dur"] / 1e3 if whole else math.nan, hidden=draft_end <= verify_end,
                    backup=part.get("backup", {}).get("dur", 0.0) / 1e3)

    info = [round_info(i, es) for i, es in sorted(by_round.items())]
    hits_t = [x for x in info if x["hit"]]
    misses_t = [x for x in info if not x["hit"]]

    def avg(xs, key):
        return sum(x[key] for x in xs) / max(1, len(xs))

    COLORS_GPU = {"lookup": "black", "backup": "#756bb1", "verify": "#3182bd", "wait_draft": "#bdbdbd",
                  "glue": "#fd8d3c", "tree": "#31a354"}
    shown = range(0, 8)
    t0_ = min(e["ts"] for e in spans if e["args"]["round"] == shown[0])
    lanes_gpu = {tid: y for y, tid in enumerate(sorted({e["tid"] for e in spans if e["name"] in COLORS_GPU}, reverse=True))}
    fig, ax = plt.subplots(figsize=(13, 2.8))
    seen = set()
    for e in spans:
        if e["args"]["round"] in shown and e["name"] in COLORS_GPU:
            ax.barh(lanes_gpu[e["tid"]], e["dur"] / 1e3, left=(e["ts"] - t0_) / 1e3, color=COLORS_GPU[e["name"]],
                    edgecolor="white", lw=0.5, label=e["name"] if e["name"] not in seen else None)
            seen.add(e["name"])
        if e["args"]["round"] in shown and e["name"] == f"round {e['args']['round']}":
            x = (e["ts"] - t0_) / 1e3
            ax.axvline(x, color="gray", ls=":", lw=0.8)
            a_ = e["args"]
            ax.text(x + 0.1, len(lanes_gpu) - 0.5, f"{'hit' if a_['hit'][0] else 'miss'} +{a_['accepted'][0] + 1}",
                    fontsize=7)
    ax.set_yticks(list(lanes_gpu.values()), [threads.get(t, str(t)) for t in lanes_gpu])
    ax.set_ylim(-0.5, len(lanes_gpu) - 0.2)
    ax.set_xlabel("ms (labels: hit or miss, tokens emitted)"); ax.set_title(title, fontsize=10, pad=8)
    ax.legend(ncol=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3)); ax.grid(axis="y", visible=False)
    plt.show()
    print(f"{len(info)} rounds in the trace: {len(hits_t)} hits, {len(misses_t)} misses")
    print(f"mean verify {avg(info, 'verify'):.2f} ms, mean draft side (glue + tree) {avg(info, 'side'):.2f} ms")
    print(f"mean round: {avg(hits_t, 'round'):.2f} ms on a hit ({avg(hits_t, 'round') / avg(hits_t, 'verify'):.2f}x its "
          f"verify), {avg(misses_t, 'round'):.2f} ms on a miss (backup {avg(misses_t, 'backup'):.2f} ms)")
    print(f"the draft side ended before the verify in {sum(x['hidden'] for x in info)} of {len(info)} rounds")
    print("on every hit round of the trace the draft's work was hidden under the verify:",
          all(x["hidden"] for x in hits_t))
""", tags=["claim-gpu-trace"]),
md(r"""
The target's lane is almost all verify, the draft's lane finishes its glue pass and tree before the verify ends,
and the cost that remains is between the verifies: the handshake and the host's bookkeeping of each round, and on a
miss the backup before the verify can start.

**The draft's cost, swept.** Where exactly SSD starts to pay depends on the draft's cost relative to the verify:
the project's benchmark plan sweeps it (the shipped draft, and the same draft widened to cost more at the same
acceptance) together with $K$, with SSD/SD measured and predicted by `scripts/speed_model.py`. The next cell shows
that sweep from `benchmarks/` if it has been run. The sweep stored there ran on this notebook's pair with the engine
before SSD's round was one CUDA graph (commit `5b7db49`: the draft's side on a second stream of the same GPU,
launched by the host every round), so its SSD figures are that engine's; the one-graph round's own measurements
are the ones printed above, and `BENCHMARKS.md` compares the two.
"""),
code(r"""
def sweep_results(root=BENCH):
    # results.json files of `scripts/bench.py --suite sweep` (records marked "sweep", one per draft width "dw")
    found = []
    for path in sorted(root.glob("**/results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        records = [r for r in data.get("records", []) if r.get("sweep") and r.get("status") == "ok"] \
            if isinstance(data, dict) else []
        if records:
            found.append(((data.get("config") or {}).get("started", ""), path, records))
    return max(found, key=lambda x: (x[0], str(x[1]))) if found else None


sweep = sweep_results()
if not sweep:
    display(Markdown("**Not measured yet:** no draft-cost sweep under `benchmarks/` (the `results.json` that "
                     "`scripts/bench.py --suite sweep` writes on a GPU)."))
else:
    _, sweep_path, sweep_records = sweep
    groups = {}
    for r in sweep_records:
        groups.setdefault((r["temperature"], r["k"], r.get("dw", 1)), {})[r["system"]] = r
    ar_by_t = {r["temperature"]: r for r in sweep_records if r["system"] == "ar"}
    rows_ = []
    for (T, k, dw), g in groups.items():
        sd_, ssd_, ar_ = g.get("sd"), g.get("ssd"), ar_by_t.get(T)
        pm = (sd_ or {}).get("parts_ms") or {}
        if not (sd_ and ssd_ and pm.get("draft") and pm.get("verify")):
            continue
        rows_.append(dict(T=T, k=k, dw=dw, cost=pm["draft"] / (sd_.get("k_used") or k) / pm["verify"],
                          meas=ssd_["decode_tok_s"] / sd_["decode_tok_s"],
                          pred=(ssd_.get("predicted_tok_s") or math.nan) / (sd_.get("predicted_tok_s") or math.nan),
                          vs_ar=ssd_["decode_tok_s"] / ar_["decode_tok_s"] if ar_ else math.nan))
    print(f"{sweep_path.relative_to(ROOT)}: {len(rows_)} configurations (batch 1)")
    print(f"{'T':>3} {'draft width':>11} {'K':>3} {'draft step/verify':>17} {'SSD/SD':>7} {'predicted':>9} {'SSD/AR':>7}")
    for r in sorted(rows_, key=lambda r: (r["T"], r["dw"], r["k"])):
        print(f"{r['T']:3g} {'x' + str(r['dw']):>11} {r['k']:3} {r['cost']:17.3f} {r['meas']:7.2f} {r['pred']:9.2f} "
              f"{r['vs_ar']:7.2f}")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for T, k in sorted({(r["T"], r["k"]) for r in rows_}):
        sel = sorted((r for r in rows_ if (r["T"], r["k"]) == (T, k)), key=lambda r: r["cost"])
        line, = ax.plot([r["cost"] for r in sel], [r["meas"] for r in sel], "o-", label=f"K = {k}, T = {T:g}, measured")
        ax.plot([r["cost"] for r in sel], [r["pred"] for r in sel], "x--", color=line.get_color(), label="predicted")
    ax.axhline(1, color="gray", ls=":")
    ax.set_xscale("log"); ax.set_xlabel("one draft step / the verify (the draft widened: further right)")
    ax.set_ylabel("SSD / SD tokens/s"); ax.legend(fontsize=7, ncol=2)
    plt.show()
"""),
md(r"""
**When SSD pays**, in one list: a target whose verify is long (large, memory-bound), a draft whose whole side of a
round (the glue pass and the tree over all branches) fits under that verify and whose drafting would otherwise be
a real share of an SD round, a high hit rate (so that few rounds pay a backup, or lose tokens to the fast one), a
small batch, and a handshake and host bookkeeping that are small beside the verify. Where any of these fails, SD
with the same draft is as fast or faster, and `ssd_fast.Engine` can be asked for either.
"""),
# ------------------------------------------------------------------------------------------------ 7. exercises
md(r"""
## 7. Exercises

Try each one before opening its answer (the collapsed cell below it; in Jupyter click the "..." or the cell's
left bar). The facts behind the answers are also checked in `tests/test_notebook.py`.

**Exercise 1: a deterministic proposal.** The fast backup proposes a token $x$ without sampling it. `ssd.verify` then
receives $q = \text{one-hot}(x)$. What are the acceptance probability and the rejection distribution? Show that the
emitted token still follows $p$. Check it numerically with `ssd.acceptance_prob` and `ssd.residual`.
"""),
code(r"""
# Answer 1. With q = one-hot(x): accept with min(1, p(x)/1) = p(x). On a rejection the residual is
# max(0, p - onehot(x)) = p everywhere except at x (where p(x) - 1 <= 0), renormalized: "p with x removed".
# P(emit y) = p(x) [y = x] + (1 - p(x)) * p(y) / (1 - p(x)) [y != x] = p(y).   (Exact, without sampling x.)
g = torch.Generator().manual_seed(0)
p_demo = torch.softmax(torch.randn(10, generator=g, dtype=torch.float64) * 2, -1)
for x in range(10):
    onehot = torch.nn.functional.one_hot(torch.tensor(x), 10).double()
    accept_x = ssd.acceptance_prob(p_demo[x], torch.tensor(1.0, dtype=torch.float64))
    emitted = accept_x * onehot + (1 - accept_x) * ssd.residual(p_demo, onehot)
    assert torch.allclose(emitted, p_demo) and torch.isclose(accept_x, p_demo[x])
print("deterministic proposal: P(emit) == p for every proposed x: True")
""", hidden=True),
md(r"""
**Exercise 2: the fork's exclusion.** In the fork, the candidates for outcome $n = j$ skip $s_{j+1}$. What breaks
if they do not? (Hint: what is the residual's probability at a token that was just rejected? Is exactness at risk?)
"""),
code(r"""
# Answer 2. Outcome n = j means s_{j+1} was rejected. A rejection is only possible where p(s) < q(s)
# (if p(s) >= q(s), min(1, p/q) = 1), and there the residual max(0, p - q) is 0: the recovery token can never be
# s_{j+1}. At T = 0, likewise, the recovery is argmax p, which differs from the rejected token.
# So without the exclusion, one of the F_j branches is always wasted (a lower hit rate for the same budget).
# Exactness is NOT at risk: candidates only decide what gets precomputed; every proposal is verified exactly.
g = torch.Generator().manual_seed(1)
pp = torch.softmax(torch.randn(1000, 50, generator=g, dtype=torch.float64), -1)
qq = torch.softmax(torch.randn(1000, 50, generator=g, dtype=torch.float64), -1)
can_reject = ssd.acceptance_prob(pp, qq) < 1
print("residual mass on tokens that can be rejected:", float(ssd.residual(pp, qq)[can_reject].abs().max()))
# on the real models: the tokens the draft proposed and the target rejected in section 2.1
if n_round < K:
    rejected = int(s_round[0, n_round])
    print(f"real round of 2.1: residual at the rejected {show(rejected)!r} =",
          float(ssd.residual(p_round[0, n_round], q_round[0, n_round])[rejected]))
else:
    print("the round of 2.1 accepted all K proposals: it has no rejected token to look at")
""", hidden=True),
md(r"""
**Exercise 3: predict Saguaro's effect.** Before running anything: as $C \to 0$, what does $q'$ look like, what
happens to the acceptance rate, and which tokens does a rejection's residual favor? Then compute
`saguaro_position_stats` for $C = 0.01$ and a larger fan-out, e.g. $F = 8$, and compare with section 4.2.
"""),
code(r"""
# Answer 3. As C -> 0, q' puts (almost) no mass on the draft's top-(F+1) tokens: proposals come from the draft's
# tail, the target rarely agrees, so the acceptance sum min(p, q') falls towards the target's mass outside those
# tokens. The residual max(0, p - q') then is almost p restricted to the top-(F+1) (plus p's excess elsewhere):
# a rejection's recovery token is nearly always a top-(F+1) token, i.e. cached. More candidates (larger F) raise
# the hit rate at any C and make the C-effect act on more tokens.
for F in (F0, 8):
    for C in (1.0, 0.01):
        acc, hit_rej, rej = saguaro_position_stats(p_text, q_text, F, C)
        print(f"F = {F}, C = {C:4}: acceptance {float(acc.mean()):.3f}, "
              f"P(hit | rejection) {float(hit_rej.sum() / rej.sum()):.3f}")
""", hidden=True),
md(r"""
**Exercise 4: tokens per round.** If each draft token is accepted independently with probability $a$, show that a
round emits $E_a = \frac{1 - a^{K+1}}{1-a}$ tokens on average. If a draft pass costs a fraction $c$ of a target pass
and the verify costs the same as one target pass, which $K$ maximizes SD's speedup $E_a / (Kc + 1)$ for
$a = 0.5, c = 0.2$? And for $a = 0.8, c = 0.05$?
"""),
code(r"""
# Answer 4. The round emits n + 1 tokens with P(n = j) = a^j (1 - a) for j < K and a^K for j = K, so
# E[n + 1] = sum_{i=0}^{K} P(n >= i) = sum_{i=0}^{K} a^i = (1 - a^(K+1)) / (1 - a).
for a in (0.3, 0.5, 0.9):
    direct = sum((j + 1) * pj for j, pj in enumerate(outcome_probs(a, K)))
    assert abs(direct - e_tokens(a, K)) < 1e-12
for a, c in [(0.5, 0.2), (0.8, 0.05)]:
    speedups = {k: e_tokens(a, k) / (k * c + 1) for k in range(1, 16)}
    best = max(speedups, key=speedups.get)
    print(f"a = {a}, c = {c}: best K = {best}, speedup {speedups[best]:.2f}x")
""", hidden=True),
md(r"""
**Exercise 5: the geometric fan-out.** Derive $F_j \propto P_j^{1/(1+r)}$ from minimizing $\sum_j P_j F_j^{-r}$ under
$\sum_j F_j = B$, and explain the extra factor $(1-a)^{-1/(1+r)}$ on $F_K$. Check that `ssd.geometric_fan_out` is
within rounding of $B\,P_j^{1/(1+r)} / \sum_i P_i^{1/(1+r)}$.
"""),
code(r"""
# Answer 5. Lagrangian: d/dF_j [P_j F_j^-r + lambda F_j] = -r P_j F_j^-(r+1) + lambda = 0  =>  F_j ∝ P_j^(1/(1+r)).
# With P_j = a^j (1-a) for j < K and P_K = a^K, the common factor (1-a)^(1/(1+r)) of the j < K outcomes cancels
# in the proportion, which leaves F_j ∝ a^(j/(1+r)) and F_K ∝ a^(K/(1+r)) (1-a)^(-1/(1+r)).
for a in (0.2, 0.5, 0.8, 0.95):
    for r_exp in (0.5, 1.0, 2.0):
        weights = [pj ** (1 / (1 + r_exp)) for pj in outcome_probs(a, K)]
        ideal = [BUDGET * wj / sum(weights) for wj in weights]
        fan = ssd.geometric_fan_out(K, BUDGET, a, r_exp)
        assert all(abs(f - x) < 1 for f, x in zip(fan, ideal)) and sum(fan) == BUDGET
print("geometric_fan_out is the rounded optimum for every (a, r) tried: True")
""", hidden=True),
# ------------------------------------------------------------------------------------------------ end
md(r"""
## 8. Reading guide

Which code each section corresponds to. `ssd.py` is the reference (read it top to bottom, it is short);
the fast engine (front door `ssd_fast.py`) is the same algorithm built for speed, a file per concept under
`ssd_engine/` (`rounds.py`, `ssd_round.py`, `engine.py`, ...: the names below are those modules'), with its GPU
kernels in `ssd_kernels.py`, each beside a plain PyTorch reference of the same name with `_ref` (read the reference
first).

| Section | `ssd.py` (reference) | `ssd_engine/`, `ssd_kernels.py` (fast engine) |
| --- | --- | --- |
| Section 0: loading | `ssd.load_model` (the draft's `shared_embedding`), `ssd.Transformer`, `ssd.KVCache` | `ssd_fast.load_pair`, `engine.Engine`, `fast_model.FastModel`, `fast_model.FastCache` |
| Section 1: AR | `ssd.extend`, `ssd.ar_round` | `rounds.ar_round`, `ssd_kernels.cache_attention` |
| Section 2: SD and exact verification | `ssd.draft_steps`, `ssd.target_verify`, `ssd.verify`, `ssd.acceptance_prob`, `ssd.residual`, `ssd.sample`, `ssd.sd_round`, `ssd.commit` | `rounds.draft_propose`, `rounds.verify`, `rounds.sd_round`, `batch.commit_device`, `ssd_kernels.verify_ref`, `ssd_kernels.sample_exponential_race` |
| Section 3: SSD, the speculation cache | `ssd.ssd_round`, `ssd.SpeculationCache`, `ssd.build_speculation_cache` (glue pass and fork) | `ssd_round.SSDRound.select`, `ssd_round.SSDRound.lookup`, `ssd_round.SSDRound.glue_and_fork`, `ssd_round.SSDRound.tree`, `ssd_round.SSDRound.target_side`, `ssd_round.SSDRound.round` (one device: the whole round one CUDA graph); the draft on its own GPU: `ssd_round.SSDRound.handshake`, `ssd_round.DraftWorker` |
| Section 3.1: the tree decode | `ssd.tree_decode` (scratch slots and an explicit mask), `ssd.Transformer.forward` (`slots`, `visible`, `positions`) | `fast_model.FastModel.forward` (its `tree` argument: each branch's keys in a buffer of their own), `ssd_kernels.tree_attention_ref` (the mask, implicit), `ssd_kernels.tree_attention` |
| Section 4: Saguaro | `ssd.geometric_fan_out`, `ssd.saguaro_rescale`, `ssd.choose_backup`, `ssd.Estimates`, `ssd.ngram_proposal` | `ssd_round.SSDRound.set_fan` (the fan-out as device data), `ssd_round.SSDRound.backup`, `sampling.saguaro_rescale_masked`, `rounds.ngram_proposal`, `policy.fit_budget`, `policy.choose_lookahead` |
| Section 5: timelines, the speed formula | `ssd.RoundStats`, `ssd.GenerationResult.summary`, `ssd.generate`, `ssd.Settings` | `engine.Engine.generate` (with `profile=True`), `report.chrome_trace`, `scripts/speed_model.py`, `scripts/profile_round.py` |
| Section 6: GPU measurements | | `scripts/bench.py` (writes `benchmarks/*/results.json` and the traces), `scripts/expand.py` |

## Where to go next

* `tests/test_exactness.py`: the analytic (every path of a round enumerated in float64) and statistical checks that
  the output distribution is the target's, for every proposal source SSD uses.
* `BENCHMARKS.md`: the GPU measurements of section 6, with the commands that made them.
* The paper: Kumar, Dao & May, *Speculative Speculative Decoding*, arXiv 2603.03251.
"""),
code(r"""
print(f"notebook executed in {time.perf_counter() - NOTEBOOK_START:.0f} s on this machine")
"""),
]


def build() -> "nbformat.NotebookNode":
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for i, (kind, source, meta) in enumerate(CELLS):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell.metadata.update(meta)
        cell.id = f"cell-{i:02d}"  # stable ids: a rebuild only changes what really changed
        nb.cells.append(cell)
    return nb


def execute(nb, timeout=TIMEOUT_PER_CELL):
    from nbclient import NotebookClient
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return nb


def main(argv=None):
    import nbformat
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    ap.add_argument("--out", default=str(NOTEBOOK), help="where to write the notebook (default: tutorial.ipynb)")
    args = ap.parse_args(argv)
    nb = build()
    if not args.no_execute:
        t0 = time.perf_counter()
        execute(nb)
        print(f"executed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    nbformat.write(nb, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
