"""A reused Engine is reproducible: a call gives the tokens a fresh Engine gives with the same seed, whatever calls
with other settings ran on it before. Every setting that reaches a round's device state (the SSD round's slot
tables and Saguaro's F per outcome, its q buffers, the persistent temperatures, the graphs keyed by C, top-k,
top-p, K, backup) changes between the calls, in several orders; exactness alone would not see a stale state (a
Saguaro left off is still exact), so the tokens are compared."""
import pytest
import torch

import ssd_fast

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
RAGGED = [[1, 4, 2], [5], [0, 3, 6, 7, 2, 2]]

# (prompts, new tokens, settings). Consecutive calls share a first fan-out where only C, the backup or the filters
# change; a short call ends before its estimates move the automatic fan-out, so the next call starts on the same one.
CALLS = [
    ([[1, 4, 2]], 3, dict(mode="ssd", k=3, temperature=1.0, backup="jit", saguaro_c=1.0)),
    ([[1, 4, 2]], 24, dict(mode="ssd", k=3, temperature=1.0, backup="jit", saguaro_c=0.5)),
    (RAGGED, 3, dict(mode="ssd", k=3, temperature=1.0, backup="fast", saguaro_c=1.0)),
    (RAGGED, 24, dict(mode="ssd", k=3, temperature=1.0, backup="fast", saguaro_c=0.5, fan_out=2)),
    (RAGGED, 24, dict(mode="ssd", k=3, temperature=0.7, draft_temperature=1.0, backup="auto", saguaro_c=0.7,
                      top_k=5)),
    ([[1, 4, 2]], 3, dict(mode="ssd", k=3, temperature=1.0, backup="jit", saguaro_c=0.5, top_p=0.9)),
    ([[5]], 24, dict(mode="ssd", k=2, temperature=1.0, backup="auto", saguaro_c=0.5, fan_out=[1, 3, 2])),
    (RAGGED, 24, dict(mode="ssd", k=3, temperature=0.0, backup="jit", saguaro_c=0.5)),      # greedy: no q rows
    (RAGGED, 24, dict(mode="ssd", k=3, temperature=[1.0, 0.0, 0.7], backup="jit")),          # q rows again
    (RAGGED, 24, dict(mode="sd", k=3, temperature=1.0, top_k=5, top_p=0.9)),
    ([[1, 4, 2]], 3, dict(mode="ar", temperature=0.7, top_p=0.9)),
    ([[1, 4, 2]], 24, dict(mode="ssd", k=3, temperature=1.0, backup="fast", saguaro_c=0.5)),
]
ORDERS = {"forward": list(range(len(CALLS))), "backward": list(range(len(CALLS)))[::-1],
          "shuffled": [4, 0, 7, 1, 10, 2, 11, 8, 5, 3, 9, 6, 1, 0, 11]}


def engine(models, device, worker=False):
    """worker: SSD's worker layout (the draft side on a thread, as for a draft on its own GPU or a tensor-parallel
    target)."""
    return ssd_fast.Engine(*models, device=device, dtype=torch.float32, log=lambda *a: None, draft_worker=worker)


def call(eng, i, seed=5):
    prompts, new, kw = CALLS[i]
    return eng.generate(prompts, max_new_tokens=new, eos_token_id=[], seed=seed, **kw).tokens


@pytest.fixture(scope="module")
def fresh(bigram_pair):
    """Each call's tokens from an Engine that ran nothing before, per device."""
    memo = {}

    def get(device, worker, i):
        if (device, worker, i) not in memo:
            memo[(device, worker, i)] = call(engine(bigram_pair, device, worker), i)
        return memo[(device, worker, i)]
    return get


@pytest.mark.parametrize("device", DEVICES)
def test_saguaro_after_c_1_with_the_same_fan_out(bigram_pair, device):
    """A C = 1 call, then a C < 1 call whose first (automatic) fan-out is the last one's: Saguaro must be on."""
    kw = dict(mode="ssd", k=3, temperature=1, seed=5, backup="jit")
    reused = engine(bigram_pair, device)
    reused.generate([[1, 4, 2]], saguaro_c=1, max_new_tokens=3, **kw)
    again = reused.generate([[1, 4, 2]], saguaro_c=0.5, max_new_tokens=30, **kw).tokens
    assert again == engine(bigram_pair, device).generate([[1, 4, 2]], saguaro_c=0.5, max_new_tokens=30, **kw).tokens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("worker", [False, True], ids=["round", "worker"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_a_reused_engine_gives_a_fresh_engines_tokens(bigram_pair, fresh, device, worker, order):
    reused = engine(bigram_pair, device, worker)
    for n, i in enumerate(ORDERS[order]):
        assert call(reused, i) == fresh(device, worker, i), f"call {i} after calls {ORDERS[order][:n]}"
