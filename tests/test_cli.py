"""The command line of the reference: flags, JSON output, and one clear line for each bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import embedded
import ssd
from conftest import ROOT, make_checkpoint

VOCAB = 49152  # the embedded tokenizer's, so the tiny models can use its files


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random target and draft with SmolLM2's tokenizer files, and a draft of another vocabulary."""
    root = tmp_path_factory.mktemp("cli")
    tok_src = embedded.ensure_target(progress=False)
    dirs = {}
    for name, kw in {"target": dict(seed=1, max_position_embeddings=64), "draft": dict(seed=2, num_hidden_layers=1),
                     "other": dict(seed=3, vocab_size=97)}.items():
        path, _ = make_checkpoint(root / name, logit_scale=10.0, **{"vocab_size": VOCAB, **kw})
        if name != "other":
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tok_src / f, path / f)
        dirs[name] = str(path)
    return dirs


def run_cli(capsys, *argv):
    rc = ssd.cli(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_output_schema_and_modes_agree(tiny_dirs, capsys):
    outputs = {}
    for mode in ("ar", "sd", "ssd"):
        rc, out, _ = run_cli(capsys, "--prompt", "Hello there", "--target", tiny_dirs["target"], "--draft",
                             tiny_dirs["draft"], "--mode", mode, "--k", "3", "--max-new-tokens", "12", "--json")
        assert rc == 0
        data = json.loads(out)
        assert set(data) >= {"prompts", "token_ids", "text", "finish_reasons", "stats", "rounds"}
        assert set(data["stats"]) >= {"mode", "k", "tokens_per_round", "acceptance_rate", "cache_hit_rate", "time_s"}
        assert len(data["token_ids"][0]) == 12 and isinstance(data["text"][0], str)
        outputs[mode] = data["token_ids"]
    assert outputs["ar"] == outputs["sd"] == outputs["ssd"]


def test_batch_of_prompts_and_sampling_flags(tiny_dirs, capsys):
    rc, out, _ = run_cli(capsys, "--prompt", "a", "--prompt", "a much longer prompt than the first", "--target",
                         tiny_dirs["target"], "--draft", tiny_dirs["draft"], "--temperature", "0.8",
                         "--top-p", "0.9", "--top-k", "50", "--fan-out", "2", "--saguaro-c", "0.5", "--seed", "7",
                         "--max-new-tokens", "6", "--json")
    data = json.loads(out)
    assert rc == 0 and len(data["token_ids"]) == 2 and all(len(t) == 6 for t in data["token_ids"])
    rc2, out2, _ = run_cli(capsys, "--prompt", "a", "--prompt", "a much longer prompt than the first", "--target",
                           tiny_dirs["target"], "--draft", tiny_dirs["draft"], "--temperature", "0.8",
                           "--top-p", "0.9", "--top-k", "50", "--fan-out", "2", "--saguaro-c", "0.5", "--seed", "7",
                           "--max-new-tokens", "6", "--json")
    assert json.loads(out2)["token_ids"] == data["token_ids"]     # the seed makes runs repeatable


@pytest.mark.parametrize("args,message", [
    (["--target", "/no/such/dir", "--mode", "ar"], "does not exist"),
    (["--target", str(ROOT), "--mode", "ar"], "not a model checkpoint"),
    (["--draft", "{other}"], "vocabulary"),
    (["--k", "0"], "--k must be >= 1"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in"), (["--top-p", "1.5"], "--top-p must be in"),
    (["--fan-out", "many"], "--fan-out must be"),
    (["--prompt", "word " * 80], "does not fit the context window"),
    (["--mode", "sd", "--draft", None], "needs a draft"),
])
def test_bad_input_is_one_clear_line(tiny_dirs, capsys, args, message):
    argv = {"--prompt": "hi", "--target": tiny_dirs["target"], "--draft": tiny_dirs["draft"], "--mode": "ssd"}
    for flag, value in zip(args[::2], args[1::2]):
        argv[flag] = value.format(**tiny_dirs) if value else None
    flat = [x for flag, value in argv.items() if value is not None for x in (flag, value)]
    rc, out, err = run_cli(capsys, *flat)
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "ssd.py"), "--prompt", "x", "--target", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_embedded_default_end_to_end():
    """The README's command: the embedded SmolLM2 pair, no flags but the prompt and mode."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "ssd.py"), "--prompt", "The capital of France is", "--mode",
                           "ssd", "--max-new-tokens", "8"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "tokens/round" in proc.stdout and "cache hit rate" in proc.stdout
    assert "draft:" in proc.stdout
