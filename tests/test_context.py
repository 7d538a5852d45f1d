"""Rows of a batch that stop at the context limit while others go on, and the same seed giving the same output.

A row that stops rides along with the batch, frozen, until the batch ends; its steps must never write past
its cache slots (which, on a GPU, are another row's: the other row's output then silently changes). Greedy
output of every row must equal its own AR output, in the reference and the fast engine, pipelined or not.
"""
import subprocess
import sys

import pytest
import torch

import ssd
import ssd_fast
from conftest import ROOT, make_checkpoint

LIMIT = 40
PROMPTS = [list(range(1, 30)), [5, 6], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [3]]


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx")
    make_checkpoint(root / "t", seed=3, max_position_embeddings=LIMIT, logit_scale=4.0)
    make_checkpoint(root / "d", seed=4, num_hidden_layers=1, max_position_embeddings=LIMIT, logit_scale=4.0)
    return ssd.load_model(root / "t"), ssd.load_model(root / "d")


def own_ar(target, prompts, n):
    return [ssd.generate(target, [p], max_new_tokens=n, eos_token_id=[]).tokens[0] for p in prompts]


def check_rows(out, ar):
    assert "context" in out.finish_reasons
    for row, (got, want) in enumerate(zip(out.tokens, ar)):
        assert got == want[:len(got)] and len(got) >= 1, row
        if out.finish_reasons[row] == "length":
            assert got == want, row


@pytest.mark.parametrize("mode,k", [("sd", 3), ("sd", 4), ("ssd", 3), ("ssd", 6)])
def test_reference_rows_at_the_context_limit(short_context, mode, k):
    target, draft = short_context
    for d in (draft, target):            # draft = target: every token accepted, the rows run fastest to the end
        out = ssd.generate(target, PROMPTS, draft=d, mode=mode, k=k, max_new_tokens=30, eos_token_id=[])
        check_rows(out, own_ar(target, PROMPTS, 30))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("mode,k", [("ar", 1), ("sd", 3), ("sd", 6), ("ssd", 4)])
def test_fast_rows_at_the_context_limit(short_context, device, pipeline, mode, k):
    target, draft = short_context
    ar = own_ar(target, PROMPTS, 30)
    for d in (draft, target):
        engine = ssd_fast.Engine(target, d, device=device, dtype=torch.float32, pipeline=pipeline, log=lambda *a: None)
        out = engine.generate(PROMPTS, mode=mode, k=k, max_new_tokens=30, eos_token_id=[])
        check_rows(out, ar)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fast_context_limit_at_temperature_1_keeps_rows_apart(short_context, device):
    """At T = 1 the rows cut at the context limit end where they must; the others run their full length."""
    target, draft = short_context
    engine = ssd_fast.Engine(target, draft, device=device, dtype=torch.float32, log=lambda *a: None)
    out = engine.generate(PROMPTS * 4, mode="ssd", k=4, max_new_tokens=30, eos_token_id=[], temperature=1.0, seed=2)
    for prompt, tokens, reason in zip(PROMPTS * 4, out.tokens, out.finish_reasons):
        assert reason in ("context", "length")
        assert len(prompt) + len(tokens) <= LIMIT
        assert (len(tokens) == 30) == (reason == "length")


@pytest.mark.parametrize("flags", [[], ["--mode", "ssd"]])
def test_same_seed_same_output_from_the_command_line(flags):
    """Two runs of the CLI at T > 0 with default flags (everything as a new user gets it), and with SSD (whose
    backup on a miss, fan-out and budget once followed timings), print the same text."""
    cmd = [sys.executable, str(ROOT / "ssd_fast.py"), "--prompt", "Tell me a short story about a cat.",
           "--temperature", "0.8", "--seed", "1", "--max-new-tokens", "24", "--json", *flags]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    import json
    a, b = (json.loads(r.stdout) for r in runs)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"][0]) > 0
