"""tutorial.ipynb: it is what scripts/build_tutorial.py writes, it executes top to bottom without errors, and the
claims it makes are computed by its cells (tagged `claim-*`), not only asserted in prose. The facts behind the
exercise answers are checked here too, directly against ssd.py."""
import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch

import ssd

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tutorial.ipynb"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_tutorial", ROOT / "scripts" / "build_tutorial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell_text(cell) -> str:
    """Everything a code cell printed or displayed as text/markdown."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("display_data", "execute_result"):
            parts.append(out["data"].get("text/markdown", "") or out["data"].get("text/plain", ""))
    return "".join(parts)


def tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag}, found {len(cells)}"
    return cell_text(cells[0])


# Each claim the notebook's prose relies on, as a line its tagged cell must print.
CLAIMS = {
    "claim-round-rejects": [r"the round rejects a proposed token \(n < K\): True"],   # section 2.1 shows a rejection
    "claim-greedy-equal": [r"greedy SD == AR: True"],
    "claim-greedy-ssd-equal": [r"greedy SSD == AR: True"],
    "claim-exact-formula": [r"max \|P\(first token\) - p\| < 1e-9: True"],
    "claim-sd-distribution": [r"SD \(exact rule\) matches the target: True",
                              r"always accept matches the target: False",
                              r"resample from p matches the target: False"],
    "claim-fan-out": [r"every allocation spends exactly the budget: True"],
    "claim-saguaro-exact": [r"acceptance falls as C decreases: True",
                            r"hit rate at a rejection rises as C decreases: True"],
    "claim-backup": [r"ssd\.choose_backup agrees with the two curves at every batch size: True"],
    "claim-speedup-formula": [r"tokens per round: every prediction within 25% of the measurement: True"],
    "claim-draft-params": [r"loaded = stored - P \+ V x d: True"],
    "claim-tree-tensors": [r"fork candidates equal ssd\.py's: True",
                           r"hand-built RoPE positions equal ssd\.py's: True",
                           r"hand-built KV slots equal ssd\.py's: True",
                           r"hand-built attention masks equal ssd\.py's: True"],
    "claim-tree-plain": [r"the tree decode computes what plain decoding computes \(\|difference\| < 1e-3\): True"],
    "claim-rounds-match": [r"every SD round accepted what the match string predicts: True",
                           r"every SSD hit round accepted what a draft proposal from its position would: True"],
    "claim-rounds-jit": [r"hit rounds emit more tokens than miss rounds: True",
                         r"with the jit backup, SSD's rounds are SD's rounds, one for one: True"],
    "claim-gpu-pays": [r"every configuration where SSD beat SD had its draft side shorter than the verify: True",
                       r"no configuration whose draft side is longer than the verify beat SD: True",
                       r"the draft side shorter than the verify did not suffice everywhere \(some lost\): True"],
    "claim-gpu-trace": [r"on every hit round of the trace the draft's work was hidden under the verify: True"],
}


def close(x, y, tol):
    return abs(float(x) - float(y)) <= tol


def check_numbers(nb):
    """The numbers the new sections state are consistent with each other (so they were computed, not typed)."""
    # the draft's parameter counts: stored = layers + P; loaded = stored - P + V x d
    text = tagged(nb, "claim-draft-params")
    stored, layers, proj = map(float, re.search(r": ([\d.]+)M = ([\d.]+)M in the layers and norms \+ ([\d.]+)M", text).groups())
    assert close(stored, layers + proj, 0.06), text
    V, d, vd = re.search(r"\[(\d+) x (\d+)\] = ([\d.]+)M", text).groups()
    assert close(int(V) * int(d) / 1e6, vd, 0.006), text
    # the worked tree: N*K scratch slots, branch i's slots start at M + i*K
    text = tagged(nb, "claim-tree-tensors")
    for i, first, last in re.findall(r"branch (\d+): .*slots (\d+)\.\.(\d+)", text):
        assert int(last) - int(first) + 1 == 2, text                       # K = 2 in the worked example
    starts = [int(x) for x in re.findall(r"slots (\d+)\.\.", text)]
    assert len(starts) == 4 and all(b - a == 2 for a, b in zip(starts, starts[1:])), text   # fan-out [2, 1, 1]
    # where the rounds go: hits and misses add up to the run
    text = tagged(nb, "claim-rounds-jit")
    rounds, per_round = re.search(r"SSD: (\d+) rounds, ([\d.]+) tokens per round", text).groups()
    hits, per_hit, misses, per_miss = re.search(
        r"(\d+) hits at ([\d.]+) tokens per round, (\d+) misses at ([\d.]+)", text).groups()
    assert int(hits) + int(misses) == int(rounds), text
    assert close((int(hits) * float(per_hit) + int(misses) * float(per_miss)) / int(rounds), per_round, 0.01), text
    sd_rounds, sd_per = re.search(r"SD: +(\d+) rounds, ([\d.]+) tokens per round", text).groups()
    jit_rounds, jit_per = re.search(r"backup='jit': (\d+) rounds, ([\d.]+) tokens per round", text).groups()
    assert (jit_rounds, jit_per) == (sd_rounds, sd_per), text
    # section 5: each error is (predicted - measured) / measured, tokens/s = tokens per round / time per round
    text = tagged(nb, "claim-speedup-formula")
    rows = re.findall(r"^ *(AR|SD|SSD \(overlapped\)) +([\d.]+) +([\d.]+) *([+-]\d+)% +(\d+) +(\d+) +([\d.]+) +([\d.]+) *([+-]\d+)%",
                      text, flags=re.M)
    assert [r[0] for r in rows] == ["AR", "SD", "SSD (overlapped)"], text
    for _, e_pred, e_meas, e_err, t_pred, _t_meas, r_pred, r_meas, r_err in rows:
        assert close(100 * (float(e_pred) - float(e_meas)) / float(e_meas), e_err, 1.5)
        assert close(1e3 * float(e_pred) / float(t_pred), r_pred, 0.05 * float(r_pred) + 0.1)
        rounding = 100 * 0.05 / float(r_meas) * (1 + float(r_pred) / float(r_meas))     # speeds printed to 0.1
        assert close(100 * (float(r_pred) / float(r_meas) - 1), r_err, 1 + rounding)
    # the GPU table: the ratios are the ratios of the printed speeds
    text = tagged(nb, "claim-gpu-table")
    rows = re.findall(r"^ *(\w+) +([01]) +(\d+) +(\d+) \(\w+\) +(\d+) \(\w+\) +([\d.]+) +([\d.]+)", text, flags=re.M)
    assert rows, "the GPU table is missing: " + text
    for _, _, ar, sd, ssd_, vs_sd, vs_ar in rows:
        assert close(float(ssd_) / float(sd), vs_sd, 0.01) and close(float(ssd_) / float(ar), vs_ar, 0.01), text
    # the trace: hits and misses add up, and the hidden count is out of all rounds
    text = tagged(nb, "claim-gpu-trace")
    n, hits, misses = map(int, re.search(r"(\d+) rounds in the trace: (\d+) hits, (\d+) misses", text).groups())
    hidden, total = map(int, re.search(r"ended before the verify in (\d+) of (\d+) rounds", text).groups())
    assert hits + misses == n == total and hidden <= total, text
    text = tagged(nb, "claim-gpu-pays")
    configs, wins = map(int, re.search(r"(\d+) GPU configurations .* in (\d+)", text).groups())
    assert 0 < wins <= configs, text


def check_claims(nb):
    for tag, patterns in CLAIMS.items():
        text = tagged(nb, tag)
        for pattern in patterns:
            assert re.search(pattern, text), f"cell {tag} does not print {pattern!r}; it printed:\n{text}"
    check_numbers(nb)


# --------------------------------------------------------------------------------------------- the committed file

def test_committed_notebook_is_the_build_scripts_output():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    built = load_builder().build()
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in built.cells], \
        "tutorial.ipynb differs from scripts/build_tutorial.py: run `python scripts/build_tutorial.py`"
    for cell, fresh in zip(nb.cells, built.cells):
        assert cell.metadata.get("tags") == fresh.metadata.get("tags")


def test_committed_notebook_has_its_outputs_and_no_errors():
    """So that it reads well on a code host: every code cell ran, in order, and the claims are in the outputs."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 8  # the pictures
    check_claims(nb)
    answers = [c for c in code if c.metadata.get("jupyter", {}).get("source_hidden")]
    assert len(answers) >= 3, "exercise answers live in collapsed cells"


def test_prose_states_no_typed_results():
    """Markdown cells explain; numbers that are results are printed by code. Allowed in prose: formulas, indices,
    section numbers, and the paper's arXiv id."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`", "", cell.source, flags=re.S)   # formulas, code
        text = re.sub(r"arXiv \d+\.\d+|[Ss]ections? \d(\.\d)?(-\d)?|[Ee]xercises? \d|[Ss]teps? \d|^#+ \d(\.\d)?|"
                      r"\b(19|20)\d\d\b|^\d\. ", "", text, flags=re.M)   # references, years, list items
        numbers = re.findall(r"(?<![\w.\-])\d+(?:\.\d+)?%?(?![\w\-])", text)   # not part of a name (SmolLM2-135M)
        numbers = [x for x in numbers if x not in ("0", "1")]         # temperature 0/1, n = 0: settings, not results
        assert not numbers, f"markdown states numbers {numbers} (print them from a cell):\n{cell.source[:300]}"


# --------------------------------------------------------------------------------------------- execution

@pytest.mark.slow
def test_notebook_executes_and_computes_its_claims(tmp_path):
    """Run the committed notebook with Jupyter's own machinery (nbclient, python3 kernel, cwd = repository root)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    t0 = time.perf_counter()
    client.execute()                      # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - t0
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    check_claims(nb)
    nbformat.write(nb, tmp_path / "executed.ipynb")
    print(f"notebook executed in {elapsed:.0f} s")


# --------------------------------------------------------------------------------------------- exercise answers

def random_dists(rows, vocab, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale, -1)
    q = torch.softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale, -1)
    return p, q


def test_exercise_1_deterministic_proposal_is_exact():
    """q = one-hot(x): accept with p(x), else sample p with x removed; the emitted token follows p."""
    p, _ = random_dists(20, 12, seed=0)
    for row in p:
        for x in range(12):
            onehot = torch.nn.functional.one_hot(torch.tensor(x), 12).double()
            accept = ssd.acceptance_prob(row[x], torch.tensor(1.0, dtype=torch.float64))
            assert torch.isclose(accept, row[x])
            rejection = ssd.residual(row, onehot)
            expected = row.clone()
            expected[x] = 0
            assert torch.allclose(rejection, expected / expected.sum())
            assert torch.allclose(accept * onehot + (1 - accept) * rejection, row)


def test_exercise_1_verify_with_a_deterministic_proposal_samples_p():
    """The same through ssd.verify, sampled: the first emitted token after a fixed proposal follows p."""
    p, _ = random_dists(1, 6, seed=1, scale=1.0)
    rows, x = 200_000, 2
    P = p.float().expand(rows, 2, -1)
    Q = torch.nn.functional.one_hot(torch.full((rows, 1), x), 6).float()
    n, r = ssd.verify(P, Q, torch.full((rows, 1), x), torch.Generator().manual_seed(0))
    first = torch.where(n == 1, torch.full_like(r, x), r)
    freq = torch.bincount(first, minlength=6).double() / rows
    assert (freq - p[0]).abs().max() < 0.005                          # ~4 standard errors at 200k samples


def test_exercise_2_rejected_token_has_no_residual_mass():
    """The fork excludes s_(j+1) because a rejected token can never be the recovery token."""
    p, q = random_dists(2000, 50, seed=2)
    can_reject = ssd.acceptance_prob(p, q) < 1
    assert can_reject.any() and (~can_reject).any()
    assert ssd.residual(p, q)[can_reject].abs().max() == 0
    # greedy: the recovery is argmax p, which differs from any rejected (non-argmax) proposal
    pg = ssd.to_probs(torch.randn(50, 30, generator=torch.Generator().manual_seed(3)), torch.zeros(50))
    proposal = torch.randint(0, 30, (50,), generator=torch.Generator().manual_seed(4))
    rejected = pg.gather(-1, proposal[:, None])[:, 0] < 1
    assert (ssd.residual(pg, torch.nn.functional.one_hot(proposal, 30).float()).argmax(-1)[rejected]
            != proposal[rejected]).all()


def saguaro_stats(p, q, F, C):
    """Exact acceptance and P(recovery is a cached candidate | rejection), by enumerating proposals s."""
    q2 = ssd.saguaro_rescale(q, F, C)
    acc = torch.minimum(p, q2).sum(-1)
    res = ssd.residual(p, q2)
    order = q.argsort(-1, descending=True)
    hit = torch.zeros(p.shape[0], dtype=p.dtype)
    for s in range(p.shape[-1]):                                       # propose s, reject it, then sample res
        reject_s = (q2[:, s] - p[:, s]).clamp_min(0)
        cands = torch.stack([row[row != s][:F] for row in order])     # the fork: top-F of q without s
        hit += reject_s * res.gather(-1, cands).sum(-1)
    return acc, hit / (1 - acc)


def test_exercise_3_saguaro_trades_acceptance_for_hits():
    """Smaller C: lower acceptance, higher hit rate at a rejection (for a draft close to the target)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(200, 40, generator=g, dtype=torch.float64) * 2.5
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits + 0.7 * torch.randn(200, 40, generator=g, dtype=torch.float64), -1)
    F = 3
    stats = [saguaro_stats(p, q, F, C) for C in (1.0, 0.5, 0.1, 0.01)]
    accs = [float(a.mean()) for a, _ in stats]
    hits = [float((h * (1 - a)).sum() / (1 - a).sum()) for a, h in stats]
    assert all(x > y for x, y in zip(accs, accs[1:])), accs
    assert all(x < y for x, y in zip(hits, hits[1:])), hits


def test_exercise_3_notebook_helper_matches_enumeration():
    """The closed form in the notebook's saguaro_position_stats equals brute-force enumeration."""
    source = "\n".join(src for kind, src, _ in load_builder().CELLS if "def saguaro_position_stats" in src)
    namespace = {"ssd": ssd, "torch": torch}
    exec(source.split("\n\n\ntext = ")[0], namespace)                  # just the helper's definition
    p, q = random_dists(64, 25, seed=6)
    for F in (1, 3, 7):
        for C in (1.0, 0.3, 0.05):
            acc, hit_and_reject, reject = namespace["saguaro_position_stats"](p, q, F, C)
            acc_ref, hit_ref = saguaro_stats(p, q, F, C)
            assert torch.allclose(acc, acc_ref) and torch.allclose(reject, 1 - acc_ref)
            assert torch.allclose(hit_and_reject, hit_ref * (1 - acc_ref), atol=1e-12)


def e_tokens(a, k):
    return (1 - a ** (k + 1)) / (1 - a)


def test_exercise_4_tokens_per_round_and_best_k():
    for a in (0.1, 0.5, 0.9):
        for k in (1, 4, 8):
            outcome = [a ** j * (1 - a) for j in range(k)] + [a ** k]
            assert abs(sum(outcome) - 1) < 1e-12
            assert abs(sum((j + 1) * pj for j, pj in enumerate(outcome)) - e_tokens(a, k)) < 1e-12
    # Monte Carlo of the round itself
    g = torch.Generator().manual_seed(7)
    a, k = 0.7, 4
    accepted = (torch.rand(400_000, k, generator=g) < a).long().cumprod(-1).sum(-1)
    assert abs(float((accepted + 1).double().mean()) - e_tokens(a, k)) < 0.01

    def best_k(a, c):
        return max(range(1, 16), key=lambda k: e_tokens(a, k) / (k * c + 1))
    assert best_k(0.5, 0.2) == 1
    assert best_k(0.8, 0.05) == 8


def test_exercise_5_geometric_fan_out_is_the_rounded_optimum():
    K, B = 4, 20
    for a in (0.2, 0.5, 0.8, 0.95):
        for r in (0.5, 1.0, 2.0):
            probs = [a ** j * (1 - a) for j in range(K)] + [a ** K]
            w = [pj ** (1 / (1 + r)) for pj in probs]
            ideal = [B * x / sum(w) for x in w]
            fan = ssd.geometric_fan_out(K, B, a, r)
            assert sum(fan) == B and all(abs(f - x) < 1 for f, x in zip(fan, ideal))
            # its expected miss rate sum_j P_j F_j^-r is close to the continuous optimum's (a lower bound)
            def miss(f):
                return sum(pj * min(1.0, fj ** -r) if fj > 0 else pj for pj, fj in zip(probs, f))
            assert miss(ideal) <= miss(fan) <= 1.1 * miss(ideal), (a, r, fan, ideal)


# --------------------------------------------------------------------------------------------- new sections' code

def builder_cell(start):
    """The source of the one code cell that starts with `start`."""
    cells = [src for kind, src, _ in load_builder().CELLS if kind == "code" and src.startswith(start)]
    assert len(cells) == 1, start
    return cells[0]


def test_reading_guide_names_exist():
    """Every function the reading guide names exists (a renamed function fails here, not in a reader's hands)."""
    import importlib
    import ssd_kernels
    import ssd_fast
    engine = ("batch", "engine", "fast_model", "policy", "report", "rounds", "sampling", "ssd_round")
    modules = {"ssd": ssd, "ssd_fast": ssd_fast, "ssd_kernels": ssd_kernels,
               **{m: importlib.import_module(f"ssd_engine.{m}") for m in engine}}
    guide = next(src for kind, src, _ in load_builder().CELLS if kind == "markdown" and "Reading guide" in src)
    names = [(m, a) for m, a in re.findall(r"`(" + "|".join(modules) + r")\.([\w.]+)`", guide) if a != "py"]
    assert len(names) > 30
    for module, attr in names:
        obj = modules[module]
        for part in attr.split("."):
            assert hasattr(obj, part), f"the reading guide names {module}.{attr}, which does not exist"
            obj = getattr(obj, part)
    for script in re.findall(r"`(scripts/\w+\.py)`", guide):
        assert (ROOT / script).is_file(), script


def run_gpu_cell(start, bench, capsys):
    import math
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import json
    namespace = {"ROOT": bench.parent, "BENCH": bench, "json": json, "math": math, "plt": plt, "display": print,
                 "Markdown": str}
    source = builder_cell(start)
    exec(source.replace('BENCH = ROOT / "benchmarks"', "BENCH = ROOT / " + repr(bench.name)), namespace)
    plt.close("all")
    return capsys.readouterr().out


def bench_record(system, tok_s, k=4, parts=None, predicted=None, **extra):
    return dict({"system": system, "mode": system, "pair": "expanded", "temperature": 0.0, "batch": 1, "k": k,
                 "c": 1.0, "status": "ok", "decode_tok_s": tok_s, "parts_ms": parts or {}, "predicted_tok_s": predicted},
                **extra)


def write_results(path, started, records):
    import json
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(
        {"config": {"device": "cuda", "gpus": ["NVIDIA H200"], "started": started}, "records": records}))


def test_gpu_cells_say_so_when_benchmarks_are_absent(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    out = run_gpu_cell("import json\n\nBENCH", tmp_path / "bench", capsys)
    assert "No GPU results found under benchmarks/" in out
    out = run_gpu_cell("def sweep_results", tmp_path / "bench", capsys)
    assert "Not measured yet" in out


def test_gpu_cells_read_bench_results(tmp_path, capsys):
    """The GPU table reads bench.py's format (and leaves the sweep's widened drafts out); the draft-cost sweep
    cell shows a sweep (bench.py --suite sweep) once one exists."""
    bench = tmp_path / "bench"
    write_results(bench / "grid", "2026-01-01 00:00:00 UTC", [
        bench_record("ar", 200.0), bench_record("sd", 300.0, parts={"draft": 1.0, "verify": 4.0}, predicted=310),
        bench_record("ssd", 330.0, parts={"glue": 0.3, "tree": 2.0, "verify": 4.2}, predicted=340)])
    sweep = [bench_record("ar", 1000.0, k=0, sweep=True, dw=1)]
    for dw, (sd, ssd_) in {1: (1100.0, 550.0), 4: (700.0, 770.0)}.items():
        sweep += [bench_record("sd", sd, k=2, sweep=True, dw=dw, k_used=2, predicted=sd,
                               parts={"draft": 0.5 * dw, "verify": 1.0}),
                  bench_record("ssd", ssd_, k=2, sweep=True, dw=dw, predicted=ssd_ * 1.1,
                               parts={"glue": 0.3, "tree": 1.0 * dw, "verify": 1.0})]
    write_results(bench / "sweep", "2026-01-02 00:00:00 UTC", sweep)
    out = run_gpu_cell("import json\n\nBENCH", bench, capsys)
    assert re.search(r"expanded +0 +200 +300 \(4\) +330 \(4\) +1\.10 +1\.65", out), out
    out = run_gpu_cell("def sweep_results", bench, capsys)
    assert "sweep/results.json: 2 configurations" in out, out
    assert re.search(r"0 +x1 +2 +0\.250 +0\.50 +0\.55 +0\.55", out), out
    assert re.search(r"0 +x4 +2 +1\.000 +1\.10 +1\.21 +0\.77", out), out
