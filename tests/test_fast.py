"""ssd_fast.py computes what ssd.py computes: greedy tokens, the output distribution, on CPU (the
PyTorch fallback) and, marked `gpu`, in bf16 with Triton kernels and CUDA graphs on and off."""
from types import SimpleNamespace

import pytest
import torch

import ssd
import ssd_fast
from ssd_engine import fast_model, rounds
from ssd_engine import ssd_round
import test_exactness as te
from conftest import make_checkpoint

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [1, 2], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 12], [33]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    make_checkpoint(root / "t", seed=1, logit_scale=5.0)
    make_checkpoint(root / "d", seed=2, num_hidden_layers=1, logit_scale=5.0)
    return ssd.load_model(root / "t"), ssd.load_model(root / "d")


@pytest.fixture(scope="module")
def cpu_engine(pair):
    return ssd_fast.Engine(*pair, device="cpu", log=lambda *a: None)


@pytest.mark.parametrize("mode,kw", [("ar", {}), ("sd", dict(k=1)), ("sd", dict(k=4)), ("ssd", dict(k=3, backup="jit")),
                                     ("ssd", dict(k=2, backup="fast", fan_out=3)), ("ssd", dict(k=4, saguaro_c=0.5))])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_greedy_equals_reference(pair, cpu_engine, mode, kw, batch):
    ref = ssd.generate(pair[0], PROMPTS[:batch], max_new_tokens=20, eos_token_id=[])
    out = cpu_engine.generate(PROMPTS[:batch], mode=mode, max_new_tokens=20, eos_token_id=[], **kw)
    assert out.tokens == ref.tokens
    assert all(len(t) == 20 for t in out.tokens)


def test_fast_draft_equal_to_target(pair):
    engine = ssd_fast.Engine(pair[0], pair[0], device="cpu", log=lambda *a: None)
    out = engine.generate(PROMPTS[:2], mode="ssd", k=3, max_new_tokens=1 + 5 * 4, eos_token_id=[], backup="jit")
    s = out.summary()
    assert s["acceptance_rate"] == 1.0 and s["tokens_per_round"] == 4
    assert all(all(r.hit) for r in out.rounds[1:])


def test_fast_eos_and_reasons(pair, cpu_engine):
    ar = ssd.generate(pair[0], PROMPTS[:1], max_new_tokens=30, eos_token_id=[]).tokens[0]
    eos = ar[6]
    out = cpu_engine.generate(PROMPTS[:3], mode="ssd", k=4, max_new_tokens=9, eos_token_id=eos)
    assert out.tokens[0] == ar[:ar.index(eos) + 1] and out.finish_reasons[0] == "eos"
    assert all(len(t) <= 9 for t in out.tokens)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-small")
    make_checkpoint(root / "t", seed=11, **te.SMALL_VOCAB)
    make_checkpoint(root / "d", seed=12, num_hidden_layers=1, **te.SMALL_VOCAB)
    return ssd.load_model(root / "t"), ssd.load_model(root / "d")


@pytest.mark.parametrize("path", ["sd", "ssd-jit", "ssd-fast-saguaro"])
def test_fast_distribution(small, path):
    """The statistical exactness test of the reference, on the fast engine's code path."""
    target, draft = small
    engine = ssd_fast.Engine(target, draft, device="cpu", log=lambda *a: None)
    prompt = [1, 4, 2, 5, 0]
    out = engine.generate([prompt] * te.N_SAMPLES, temperature=1.0, max_new_tokens=te.N_TOKENS, eos_token_id=[],
                          seed=7, **te.PATHS[path])
    samples = [tuple(t[te.WINDOW]) for t in out.tokens]
    assert te.chi_square_p_value(samples, te.exact_joint(target, prompt, te.N_TOKENS, te.WINDOW)) > 1e-3


def test_device_ngram_equals_reference():
    hist = [4, 9, 4, 7, 1, 4]
    st = SimpleNamespace(hist=torch.tensor([hist + [0] * 4]))
    assert rounds.ngram_proposal(st, torch.tensor([len(hist) - 1]), 3)[0].tolist() == ssd.ngram_proposal(hist, 3)


def test_fast_skinny_linear_equals_torch(pair):
    """The projections through ssd_kernels.skinny_linear (Triton, interpreted on a CPU) give F.linear's logits for
    a one-row decode step, and F.linear still serves the steps with more rows (batches, verify, prefill)."""
    import ssd_kernels
    if not ssd_kernels.INTERPRET:
        pytest.skip("needs the Triton interpreter on the CPU")
    target = pair[0]
    torch_model = fast_model.FastModel(target, "cpu", torch.float32, fast_model.Ops(use_triton=True), linear="torch")
    skinny = fast_model.FastModel(target, "cpu", torch.float32, fast_model.Ops(use_triton=True), linear="triton")
    assert torch_model.linear == {} and set(skinny.linear) == set(fast_model.FastModel.PROJECTIONS)
    g = torch.Generator().manual_seed(0)
    for B, T in ((1, 1), (2, 1), (3, 5), (1, 20)):
        tokens = torch.randint(0, target.cfg.vocab_size, (B, T), generator=g)
        positions = torch.arange(T)[None].repeat(B, 1)
        a = torch_model.forward(tokens, positions, torch_model.new_cache(B, 32))
        b = skinny.forward(tokens, positions, skinny.new_cache(B, 32))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="linear must be"):
        fast_model.FastModel(target, "cpu", torch.float32, fast_model.Ops(use_triton=False), linear="cublas")


# --- on a GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_gpu_greedy_modes_agree(pair, graphs):
    engine = ssd_fast.Engine(*pair, device="cuda", cuda_graphs=graphs)
    ar = engine.generate(PROMPTS, mode="ar", max_new_tokens=24, eos_token_id=[]).tokens
    for mode, kw in [("sd", dict(k=4)), ("ssd", dict(k=3, backup="jit")), ("ssd", dict(k=4, backup="fast"))]:
        assert engine.generate(PROMPTS, mode=mode, max_new_tokens=24, eos_token_id=[], **kw).tokens == ar, (mode, kw)


@pytest.mark.gpu
def test_gpu_float32_equals_reference(pair):
    """In float32 (no TF32) the kernels on the GPU give the reference's greedy tokens; bf16 rounds
    differently, so there only the modes are compared with each other (above)."""
    engine = ssd_fast.Engine(*pair, device="cuda", dtype=torch.float32)
    cpu = ssd.generate(pair[0], PROMPTS, max_new_tokens=24, eos_token_id=[]).tokens
    for mode in ("ar", "ssd"):
        assert engine.generate(PROMPTS, mode=mode, k=3, max_new_tokens=24, eos_token_id=[]).tokens == cpu


@pytest.mark.gpu
def test_gpu_skinny_linear_equals_torch(pair):
    """float32: the engine with every decode/verify projection in the skinny Triton kernel gives the tokens
    of the engine with cuBLAS; "auto" picks per projection and records the times it chose by."""
    skinny = ssd_fast.Engine(*pair, device="cuda", dtype=torch.float32, linear="triton")
    cublas = ssd_fast.Engine(*pair, device="cuda", dtype=torch.float32, linear="torch")
    for prompts in (PROMPTS[:1], PROMPTS):                     # one row: the skinny kernel's case
        for kw in (dict(mode="ar"), dict(mode="sd", k=4), dict(mode="ssd", k=3)):
            assert skinny.generate(prompts, max_new_tokens=20, eos_token_id=[], **kw).tokens == \
                cublas.generate(prompts, max_new_tokens=20, eos_token_id=[], **kw).tokens, (len(prompts), kw)
    auto = ssd_fast.Engine(*pair, device="cuda", linear="auto")
    assert set(auto.target.linear_times) == set(fast_model.FastModel.PROJECTIONS)


@pytest.mark.gpu
def test_gpu_graphs_on_and_off_agree(pair):
    """float32: under stream capture cuBLAS may pick other bf16 kernels, whose rounding can flip a
    near-tie of a random tiny model; in float32 the graphs must change nothing."""
    on = ssd_fast.Engine(*pair, device="cuda", dtype=torch.float32, cuda_graphs=True)
    off = ssd_fast.Engine(*pair, device="cuda", dtype=torch.float32, cuda_graphs=False)
    for kw in (dict(mode="ssd", k=3), dict(mode="sd", k=4)):   # (T > 0: graphs draw other random numbers)
        assert on.generate(PROMPTS, max_new_tokens=20, eos_token_id=[], **kw).tokens == \
            off.generate(PROMPTS, max_new_tokens=20, eos_token_id=[], **kw).tokens


@pytest.mark.gpu
@pytest.mark.parametrize("concurrent", [True, False])
@pytest.mark.parametrize("kw", [dict(k=3, backup="jit"), dict(k=2, backup="fast"),
                                dict(k=3, backup="auto", saguaro_c=0.5, draft_temperature=0.8)])
def test_gpu_ssd_round_graph_equals_its_parts(pair, concurrent, kw):
    """float32, T = 1: the SSD round as one CUDA graph (the draft side on a second stream or not, the fan-out as
    device data) draws the same numbers and gives the same tokens and hits as its parts run eagerly: the capture's
    warm-ups are undone, every stream it draws from is registered, and the state lives in the graph's buffers."""
    on = ssd_fast.Engine(*pair, device="cuda", dtype=torch.float32, concurrent=concurrent)
    off = ssd_fast.Engine(*pair, device="cuda", dtype=torch.float32, cuda_graphs=False)
    args = dict(mode="ssd", temperature=1.0, max_new_tokens=24, eos_token_id=[], seed=3, **kw)
    a, b = on.generate(PROMPTS, **args), off.generate(PROMPTS, **args)
    assert on.ssd_round.graphs and a.tokens == b.tokens and [r.hit for r in a.rounds] == [r.hit for r in b.rounds]
    assert on.generate(PROMPTS, **args).tokens == a.tokens          # replayed graphs: the same again


def _second_gpu():
    return "cuda:1" if torch.cuda.device_count() > 1 else None


@pytest.mark.gpu
@pytest.mark.parametrize("mode,concurrent", [("ar", False), ("sd", False), ("ssd", False), ("ssd", True)])
def test_gpu_round_has_no_host_sync(pair, mode, concurrent):
    """One host synchronization per round, also with the draft side on its own stream / second GPU."""
    engine = ssd_fast.Engine(*pair, device="cuda", concurrent=concurrent, draft_device=_second_gpu() if concurrent else None)
    engine.generate(PROMPTS, mode=mode, k=3, max_new_tokens=8, eos_token_id=[])    # capture graphs first
    engine.check_sync = True
    engine.generate(PROMPTS, mode=mode, k=3, max_new_tokens=16, eos_token_id=[], backup="jit")


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sd", "ssd-jit"])
def test_gpu_distribution(small, path):
    target, draft = small
    engine = ssd_fast.Engine(target, draft, device="cuda", dtype=torch.float32)
    prompt = [1, 4, 2, 5, 0]
    out = engine.generate([prompt] * 64, temperature=1.0, max_new_tokens=te.N_TOKENS, eos_token_id=[], seed=5,
                          **te.PATHS[path])
    samples = []
    for seed in range(te.N_SAMPLES // 64):
        out = engine.generate([prompt] * 64, temperature=1.0, max_new_tokens=te.N_TOKENS, eos_token_id=[],
                              seed=seed, **te.PATHS[path])
        samples += [tuple(t[te.WINDOW]) for t in out.tokens]
    assert te.chi_square_p_value(samples, te.exact_joint(target, prompt, te.N_TOKENS, te.WINDOW)) > 1e-3


# --- concurrent=True: on a GPU the draft side is a second stream inside the SSD round's graph; on a CPU
# the round's parts run in order (the worker thread of a draft on its own device is tested in test_tp.py) ---

@pytest.fixture(scope="module")
def concurrent_engine(pair):
    return ssd_fast.Engine(*pair, device="cpu", concurrent=True, log=lambda *a: None)


@pytest.mark.parametrize("kw", [dict(k=3, backup="jit"), dict(k=2, backup="fast", fan_out=3), dict(k=4)])
@pytest.mark.parametrize("batch", [1, 4])
def test_concurrent_greedy_equals_ar(pair, concurrent_engine, kw, batch):
    ref = ssd.generate(pair[0], PROMPTS[:batch], max_new_tokens=20, eos_token_id=[]).tokens
    out = concurrent_engine.generate(PROMPTS[:batch], mode="ssd", max_new_tokens=20, eos_token_id=[], **kw)
    assert out.tokens == ref
    assert {"lookup", "backup", "glue", "tree", "verify"} <= set(out.rounds[-1].times)


def test_concurrent_draft_equal_to_target_hits(pair):
    engine = ssd_fast.Engine(pair[0], pair[0], device="cpu", concurrent=True, log=lambda *a: None)
    out = engine.generate(PROMPTS[:2], mode="ssd", k=3, max_new_tokens=1 + 5 * 4, eos_token_id=[], backup="jit")
    assert out.summary()["tokens_per_round"] == 4 and all(all(r.hit) for r in out.rounds[1:])


def test_concurrent_is_reproducible_at_temperature_1(concurrent_engine):
    kw = dict(mode="ssd", k=3, temperature=1.0, max_new_tokens=16, eos_token_id=[], seed=11)
    assert concurrent_engine.generate(PROMPTS, **kw).tokens == concurrent_engine.generate(PROMPTS, **kw).tokens


def test_concurrent_distribution(small):
    target, draft = small
    engine = ssd_fast.Engine(target, draft, device="cpu", concurrent=True, log=lambda *a: None)
    prompt = [1, 4, 2, 5, 0]
    out = engine.generate([prompt] * te.N_SAMPLES, temperature=1.0, max_new_tokens=te.N_TOKENS, eos_token_id=[],
                          seed=9, **te.PATHS["ssd-jit"])
    samples = [tuple(t[te.WINDOW]) for t in out.tokens]
    assert te.chi_square_p_value(samples, te.exact_joint(target, prompt, te.N_TOKENS, te.WINDOW)) > 1e-3


@pytest.mark.parametrize("concurrent", [False, True])
@pytest.mark.parametrize("where", ["tree", "jit"])
def test_draft_failure_finishes_with_the_target(pair, monkeypatch, concurrent, where):
    """The draft side raises in round 3: the run finishes as AR, says so, keeps every token."""
    messages = []
    engine = ssd_fast.Engine(*pair, device="cpu", concurrent=concurrent, log=messages.append)
    calls = {"n": 0}
    name = "tree" if where == "tree" else "jit_into_buffers"
    original = getattr(ssd_round.SSDRound, name)

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("draft device lost")
        return original(*args, **kw)
    monkeypatch.setattr(ssd_round.SSDRound, name, flaky)
    ref = ssd.generate(pair[0], PROMPTS[:2], max_new_tokens=24, eos_token_id=[]).tokens
    backup = "jit" if where == "jit" else "auto"
    out = engine.generate(PROMPTS[:2], mode="ssd", k=3, max_new_tokens=24, eos_token_id=[], backup=backup,
                          fan_out=1 if where == "jit" else "auto")
    assert out.tokens == ref and set(out.finish_reasons) == {"length"}
    assert engine.draft_failed and any("finishing with the target alone" in m for m in messages)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_gpu_concurrent_stream_matches_sequential(pair, temperature):
    """The draft side on its own CUDA stream (one GPU) or its own GPU (two): greedy equals AR, and the
    distribution path runs; with two GPUs the draft sits on cuda:1."""
    draft_device = "cuda:1" if torch.cuda.device_count() > 1 else None
    engine = ssd_fast.Engine(*pair, device="cuda", dtype=torch.float32, concurrent=True, draft_device=draft_device)
    kw = dict(mode="ssd", k=3, max_new_tokens=20, eos_token_id=[], temperature=temperature, seed=1)
    out = engine.generate(PROMPTS, **kw)
    if temperature == 0:
        assert out.tokens == ssd.generate(pair[0], PROMPTS, max_new_tokens=20, eos_token_id=[]).tokens
    assert all(len(t) == 20 for t in out.tokens) and not engine.draft_failed


def test_fast_rows_cut_short_mid_round(cpu_engine):
    for mode, k in (("ssd", 4), ("sd", 6)):
        out = cpu_engine.generate([PROMPTS[2]] * 8, mode=mode, k=k, temperature=1.0, draft_temperature=1.3,
                                  max_new_tokens=32, seed=1, eos_token_id=[], backup="jit")
        assert all(len(t) == 32 for t in out.tokens)


def test_fast_k_auto(pair, cpu_engine):
    out = cpu_engine.generate(PROMPTS[:2], mode="ssd", k="auto", max_new_tokens=12, eos_token_id=[])
    assert out.tokens == ssd.generate(pair[0], PROMPTS[:2], max_new_tokens=12, eos_token_id=[]).tokens
    assert 1 <= out.k <= 8


@pytest.mark.parametrize("mode,engine_name", [("ar", "cpu_engine"), ("sd", "cpu_engine"), ("ssd", "cpu_engine"),
                                               ("ssd", "concurrent_engine")])
def test_continuous_batching_admits_without_disturbing(pair, request, mode, engine_name):
    """Rows finish at different times; new prompts take their rows (and the bucket's padding rows)
    between rounds; every sequence still equals its own greedy AR output."""
    run = request.getfixturevalue(engine_name).start([PROMPTS[0], PROMPTS[1], PROMPTS[3]], mode=mode, k=3, max_new_tokens=12, eos_token_id=[])
    admitted, queue = {}, [PROMPTS[2], [7, 8, 9, 10], [44]]

    def admit_while_rows_are_free():
        while queue:
            try:
                admitted[run.admit(queue[0])] = queue[0]
            except ValueError:        # every row of the bucket is busy: wait for one to finish
                return
            queue.pop(0)
    for i, _ in enumerate(run.rounds_iter()):
        if i >= 1:
            admit_while_rows_are_free()
    while queue or not all(run.st.done):
        admit_while_rows_are_free()
        for _ in run.rounds_iter():
            admit_while_rows_are_free()
    out = run.result()
    expected = {0: PROMPTS[0], 1: PROMPTS[1], 2: PROMPTS[3]}
    expected.update(admitted)
    assert len(admitted) == 3 and len(out.tokens) >= 4
    for row, prompt in expected.items():
        ref = ssd.generate(pair[0], prompt, max_new_tokens=12, eos_token_id=[]).tokens[0]
        assert out.tokens[row] == ref, (row, prompt)


@pytest.mark.gpu
def test_gpu_two_gpus_bf16_graphs_greedy_agree(pair):
    """The draft on its own GPU (when there are two), bf16, CUDA graphs, concurrent: SSD's greedy tokens
    equal the same engine's AR tokens, for ragged batches of 1 and 4. linear="torch": with "auto", AR at
    batch 1 may run its projections in the one-row skinny kernel while SSD's verify (K+1 rows) runs cuBLAS,
    and two kernels' bf16 rounding can flip a near-tie of this random model (float32: equal, tested above)."""
    engine = ssd_fast.Engine(*pair, device="cuda", concurrent=True, draft_device=_second_gpu(), linear="torch")
    for batch in (1, 4):
        ar = engine.generate(PROMPTS[:batch], mode="ar", max_new_tokens=24, eos_token_id=[]).tokens
        for kw in (dict(k=3, backup="jit"), dict(k=4, backup="fast"), dict(k="auto")):
            assert engine.generate(PROMPTS[:batch], mode="ssd", max_new_tokens=24, eos_token_id=[], **kw).tokens == ar


@pytest.mark.gpu
def test_gpu_two_gpus_concurrent_distribution(small):
    """The distribution test with the draft side concurrent on its own GPU (or stream), float32."""
    target, draft = small
    engine = ssd_fast.Engine(target, draft, device="cuda", dtype=torch.float32, concurrent=True,
                             draft_device=_second_gpu())
    prompt = [1, 4, 2, 5, 0]
    samples, first = [], []
    for seed in range(te.N_SAMPLES // 500):
        out = engine.generate([prompt] * 500, temperature=1.0, max_new_tokens=te.N_TOKENS, eos_token_id=[],
                              seed=seed, **te.PATHS["ssd-jit"])
        samples += [tuple(t[te.WINDOW]) for t in out.tokens]
        first += [tuple(t[:3]) for t in out.tokens]      # the first tokens too: the prefill's and the first rounds'
    assert te.chi_square_p_value(samples, te.exact_joint(target, prompt, te.N_TOKENS, te.WINDOW)) > 1e-3
    assert te.chi_square_p_value(first, te.exact_joint(target, prompt, te.N_TOKENS, slice(0, 3))) > 1e-3


def test_fit_budget_measures_the_draft_side(pair):
    """fit_budget times the real draft side against the verify and returns one of the candidate
    budgets; SSD with the budget it picked stays exact (greedy = AR)."""
    messages = []
    engine = ssd_fast.Engine(*pair, device="cpu", concurrent=True, log=messages.append)
    budget = engine.fit_budget(2, 3, budgets=(2, 4, 8, 16))
    assert budget in (2, 4, 8, 16) and any("speculation budget" in m for m in messages)
    assert engine.fit_budget(2, 3, budgets=(2, 4, 8, 16)) == budget            # cached
    ref = ssd.generate(pair[0], PROMPTS[:2], max_new_tokens=16, eos_token_id=[]).tokens
    out = engine.generate(PROMPTS[:2], mode="ssd", k=3, fan_out_budget=budget, max_new_tokens=16, eos_token_id=[])
    assert out.tokens == ref


@pytest.mark.parametrize("mode,kw", [("ar", {}), ("sd", dict(k=3)), ("sd", dict(k=2, temperature=1.0, seed=4)),
                                     ("ssd", dict(k=3)), ("ssd", dict(k=2, temperature=1.0, seed=4)),
                                     ("ssd", dict(k=3, temperature=1.0, seed=5, saguaro_c=0.5, backup="auto"))])
def test_pipelined_rounds_equal_one_at_a_time(pair, mode, kw):
    """AR/SD/SSD launch the next round before reading one back: same tokens, finish reasons and round
    statistics as reading every round back first, with rows finishing at different times (EOS), and
    the one extra round at the end leaves no trace."""
    on = ssd_fast.Engine(*pair, device="cpu", log=lambda *a: None)
    off = ssd_fast.Engine(*pair, device="cpu", log=lambda *a: None, pipeline=False)
    ref = off.generate(PROMPTS, mode=mode, max_new_tokens=14, eos_token_id=[], **kw).tokens
    eos = [ref[0][3], ref[2][6]]          # tokens that end rows 0 and 2 early, the others run to the limit
    a = on.generate(PROMPTS, mode=mode, max_new_tokens=14, eos_token_id=eos, **kw)
    b = off.generate(PROMPTS, mode=mode, max_new_tokens=14, eos_token_id=eos, **kw)
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons and "eos" in a.finish_reasons
    assert len(a.rounds) == len(b.rounds) and [r.accepted for r in a.rounds] == [r.accepted for r in b.rounds]
    assert [r.active for r in a.rounds] == [r.active for r in b.rounds]
    sa, sb = a.summary(), b.summary()
    assert sa["tokens_per_round"] == sb["tokens_per_round"] and sa["generated_tokens"] == sb["generated_tokens"]


@pytest.mark.parametrize("mode,kw", [("ar", {}), ("sd", dict(k=3)), ("ssd", dict(k=3, backup="jit"))])
def test_cpu_attention_reads_only_the_slots_in_use(pair, mode, kw, monkeypatch):
    """On a CPU the attention's cost follows the tokens in use: with the largest cache every attention call reads
    at most the batch's longest live sequence rounded up to a power of two (>= 32), and the tokens are those of a
    cache sized to the request."""
    reads = []
    big = ssd_fast.Engine(*pair, device="cpu", max_seq=4096, log=lambda *a: None)
    for name in ("cache_attention", "tree_attention"):
        real = getattr(big.target.ops, name)
        def spy(q, k_cache, *rest, real=real):
            reads.append(k_cache.shape[1])
            return real(q, k_cache, *rest)
        for model in {id(big.target): big.target, id(big.draft): big.draft}.values():
            monkeypatch.setattr(model.ops, name, spy)
    out = big.generate(PROMPTS[:3], mode=mode, max_new_tokens=20, eos_token_id=[], **kw)
    longest = max(map(len, PROMPTS[:3])) + 20 + 4 + 1      # prompt + new tokens + the lookahead's room
    assert reads and max(reads) <= max(32, 1 << (longest - 1).bit_length()) < big.max_seq
    small = ssd_fast.Engine(*pair, device="cpu", max_seq=64, log=lambda *a: None)
    assert out.tokens == small.generate(PROMPTS[:3], mode=mode, max_new_tokens=20, eos_token_id=[], **kw).tokens
