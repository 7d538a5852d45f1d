"""The command line of ssd_fast.py (ssd_engine/cli.py, bootstrap.py, report.py) and ssd.py's own small one, on tiny
random checkpoints with SmolLM2's tokenizer.

Most checks call `cli.run(argv)` or `ssd.main(argv)` in-process (capsys holds stdout and stderr); a few run the real
programs as subprocesses: streaming, the interactive loop through a pipe, a bad path, and the README's command with
the embedded models."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssd_engine import bootstrap, cli, policy, report, rounds
from ssd_engine.engine import Engine
import embedded
import ssd
from conftest import ROOT, make_checkpoint

VOCAB = 49152  # the embedded tokenizer's, so the tiny models can use its files
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def _link_checkpoint(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            os.symlink(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random target and draft with SmolLM2's tokenizer files, a draft of another vocabulary, a config of
    an unsupported architecture, and the target without a chat template (a base model)."""
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
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                           "vocab_size": VOCAB}))
    dirs["gpt2"] = str(root / "gpt2")
    base = _link_checkpoint(root / "target", root / "base", skip=("tokenizer_config.json",))
    tok_cfg = json.loads((tok_src / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    dirs["base"] = str(base)
    return dirs


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    return embedded.load_tokenizer(tiny_dirs["target"])


def run_cli(capsys, *argv, main=cli.run):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv, main=cli.run):
    rc, out, err = run_cli(capsys, *argv, "--json", main=main)
    assert rc == 0, err
    return json.loads(out)


def pair(d, draft="target"):
    """--target and --draft flags. By default the draft is the target itself: every token is accepted at
    temperature 0, K+1 tokens a round, so there are few rounds and the tests stay quick on a CPU."""
    return ["--target", d["target"], "--draft", d[draft]]


# ---------------------------------------------------------------------------------------------
# Output: JSON schema, streaming, batches, the summary line
# ---------------------------------------------------------------------------------------------

def test_json_schema_and_every_mode_agree(tiny_dirs, capsys):
    outputs = {}
    for mode in ("ar", "sd", "ssd"):
        data = run_json(capsys, "--prompt", "Hello there", *pair(tiny_dirs), "--mode", mode, "--k", "3",
                        "--max-new-tokens", "7", "--no-chat")
        assert set(data) >= {"prompts", "prompt_ids", "token_ids", "text", "finish_reasons", "stats", "rounds",
                             "devices", "models", "backend", "chat", "settings"}
        assert set(data["stats"]) >= {"mode", "k", "generated_tokens", "tokens_per_round", "acceptance_rate",
                                      "cache_hit_rate", "time_s", "prefill_s", "decode_s", "tokens_per_s"}
        assert data["prompts"] == ["Hello there"] and data["backend"] == "fast" and data["chat"] is False
        assert len(data["token_ids"][0]) == 7 and isinstance(data["text"][0], str)
        assert data["finish_reasons"] == ["length"] and data["stats"]["mode"] == mode
        assert data["devices"] == {"target": "cpu", "draft": None if mode == "ar" else "cpu"}
        assert data["models"]["target"] == tiny_dirs["target"]
        assert data["models"]["draft"] == (None if mode == "ar" else tiny_dirs["target"])
        assert data["rounds"] and set(data["rounds"][0]) >= {"accepted", "hit", "backup", "fan_out", "times", "active"}
        assert (data["stats"]["cache_hit_rate"] is None) == (mode != "ssd")
        outputs[mode] = data["token_ids"]
    assert len({json.dumps(t) for t in outputs.values()}) == 1     # greedy: every mode, the same tokens


def test_max_new_tokens_is_exact_in_every_mode(tiny_dirs, capsys):
    for mode in ("ar", "sd", "ssd"):   # K=3 with draft = target: rounds of 4 tokens, and 6 is not a multiple of 4
        data = run_json(capsys, "--prompt", "Hi", *pair(tiny_dirs, "target"), "--mode", mode, "--k", "3",
                        "--max-new-tokens", "6", "--no-chat")
        assert [len(t) for t in data["token_ids"]] == [6] and data["finish_reasons"] == ["length"], mode
        if mode != "ar":
            assert data["stats"]["tokens_per_round"] > 1


def test_streaming_prints_text_as_rounds_are_accepted(tiny_dirs, capsys, monkeypatch):
    """stdout grows round by round, and ends as prompt + the final text + one summary line."""
    args = ["--prompt", "Hello there", *pair(tiny_dirs, "target"), "--mode", "sd", "--k", "2", "--max-new-tokens",
            "9", "--no-chat"]
    expected = run_json(capsys, *args)["text"][0]
    seen, generate = [], Engine.generate

    def spy(self, *a, on_round=None, **kw):
        def record(tokens, stats):
            stop = on_round(tokens, stats)
            seen.append(sys.stdout.getvalue())
            return stop
        return generate(self, *a, on_round=record, **kw)
    monkeypatch.setattr(Engine, "generate", spy)
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert len(seen) >= 2 and all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))   # appended, never rewritten
    assert len(set(seen)) > 1 and seen[0].startswith("Hello there") and len(seen[0]) > len("Hello there")
    text, summary = out.rsplit("\n", 2)[:2]
    assert text == "Hello there" + expected
    assert summary.startswith("[") and "tokens/round" in summary and "target on cpu, draft on cpu" in summary


def test_streaming_subprocess_matches_json(tiny_dirs, capsys):
    """The real program: streamed stdout is the prompt and the text --json reports, then one summary line."""
    args = ["--prompt", "Hello there", *pair(tiny_dirs, "target"), "--mode", "ssd", "--k", "3", "--max-new-tokens", "10",
            "--no-chat"]
    expected = run_json(capsys, *args)["text"][0]
    proc = subprocess.run([sys.executable, str(ROOT / "ssd_fast.py"), *args], capture_output=True, cwd=ROOT, env=ENV,
                          timeout=300)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert out.startswith("Hello there" + expected + "\n")
    summary = out[len("Hello there" + expected + "\n"):]
    assert summary.count("\n") == 1 and summary.startswith("[") and summary.endswith("]\n")
    for part in ("tok/s", "tokens/round", "acceptance", "cache hit rate", "target on cpu, draft on cpu"):
        assert part in summary
    assert "Traceback" not in err and "ready in" in err


def test_prompt_file_and_several_prompts_run_a_batch(tiny_dirs, capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n   \nsecond prompt\n", encoding="utf-8")
    common = ["--prompt", "zero", "--prompt-file", path, "--target", tiny_dirs["target"], "--mode", "ar",
              "--max-new-tokens", "3", "--no-chat"]
    data = run_json(capsys, *common)
    assert data["prompts"] == ["zero", "first prompt", "second prompt"]
    assert [len(t) for t in data["token_ids"]] == [3, 3, 3]
    rc, out, _ = run_cli(capsys, *common)
    heads = ["--- [1/3] zero ---\n", "--- [2/3] first prompt ---\n", "--- [3/3] second prompt ---\n"]
    assert rc == 0 and out.startswith(heads[0]) and out.index(heads[1]) < out.index(heads[2])
    second = out.split(heads[1])[1].split(heads[2])[0]
    assert second == "first prompt" + data["text"][1] + "\n"          # without chat, the prompt is echoed
    assert out.endswith("\n") and out.rsplit("\n", 2)[1].startswith("[9 tokens")


def test_prompt_file_dash_reads_stdin(tiny_dirs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\n\ntwo\n"))
    data = run_json(capsys, "--prompt-file", "-", "--target", tiny_dirs["target"], "--mode", "ar",
                    "--max-new-tokens", "1")
    assert data["prompts"] == ["one", "two"] and len(data["token_ids"]) == 2


def test_streamer_holds_back_a_possible_stop_string_and_incomplete_characters():
    """Decoding is re-done every round; what is printed is only ever appended to."""
    pieces = {1: "Hel", 2: "lo ", 3: "wo", 4: "rld", 5: "\ufffd", 6: "\u00e9", 9: "<eos>"}
    tok = SimpleNamespace(decode=lambda ids: "".join(pieces[i] for i in ids))
    written = []
    s = report.Streamer(tok, eos={9}, stops=["world!"], write=written.append)
    assert s.update([1, 2]) is False and written == ["Hello "]
    s.update([1, 2, 3, 4])                 # "world" may be the start of "world!": held back
    assert "".join(written) == "Hello "
    s.update([1, 2, 3, 4, 5])              # no longer a stop's start, but an incomplete character: held back
    assert "".join(written) == "Hello world"
    s.finish("Hello world\u00e9")
    assert "".join(written) == "Hello world\u00e9"
    s = report.Streamer(tok, eos={9}, stops=["wor"], write=written.clear() or written.append)
    assert s.update([1, 2, 3, 4, 9]) is True and "".join(written) == "Hello "          # cut before the stop
    assert report.visible(tok, [1, 2, 3, 4, 9], {9}, ["wor"]) == ("Hello ", [1, 2, 3, 4], True)
    assert report.visible(tok, [1, 2, 9], {9}, []) == ("Hello ", [1, 2, 9], False)         # EOS never shows


def test_chat_template_is_the_default_for_instruct_models(tiny_dirs, capsys, tok):
    """ssd_fast.py (the front door) wraps prompts in an instruct model's template by default (ssd.py, the
    reference, continues raw text unless given --chat: test_reference_main_agrees_with_the_engine)."""
    common = ["--prompt", "Hi there", "--target", tiny_dirs["target"], "--mode", "ar", "--max-new-tokens", "1"]
    templated = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    default, chat, raw = (run_json(capsys, *common, *extra) for extra in ([], ["--chat"], ["--no-chat"]))
    assert default["prompt_ids"] == chat["prompt_ids"] == [templated] and default["chat"] is True
    assert raw["prompt_ids"] == [tok.encode("Hi there")] and raw["chat"] is False
    base = run_json(capsys, "--prompt", "Hi there", "--target", tiny_dirs["base"], "--mode", "ar",
                    "--max-new-tokens", "1")     # no chat template: raw text by default
    assert base["prompt_ids"] == raw["prompt_ids"] and base["chat"] is False
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0 and "--no-chat" in out and "default when the target's tokenizer has one" in " ".join(out.split())


def test_help_lists_every_flag(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0 and out.startswith("usage: ssd_fast.py")
    for flag in ("--prompt", "--prompt-file", "--interactive", "--chat", "--no-chat", "--json", "--mode", "--k",
                 "--fan-out", "--saguaro-c", "--backup", "--temperature", "--draft-temperature", "--top-p",
                 "--top-k", "--max-new-tokens", "--stop", "--seed", "--target", "--draft", "--device", "--gpus",
                 "--dtype", "--profile", "--no-cuda-graphs"):
        assert flag in out
    # the server's flags are its own: ssd_fast.py --help says where they are
    assert ("ssd_fast.py --serve runs the OpenAI-compatible HTTP server" in out and
            "ssd_fast.py --serve --help lists its own flags" in out), out


def test_serve_help_lists_the_servers_flags():
    proc = subprocess.run([sys.executable, str(ROOT / "ssd_fast.py"), "--serve", "--help"], capture_output=True,
                          cwd=ROOT, env=ENV, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0 and out.startswith("usage: ssd_fast.py --serve"), proc.stderr.decode()
    for flag in ("--host", "--port", "--max-batch", "--served-model-name", "--mode", "--target"):
        assert flag in out


def test_stdout_carries_the_text_and_the_summary_only(tiny_dirs, capsys):
    """What --help's "output:" says: with the chat template, one prompt's stdout is its text and the summary line
    (no prompt: the text answers it); with --json, one JSON object and nothing else."""
    args = ["--prompt", "Hello there", *pair(tiny_dirs, "target"), "--mode", "sd", "--k", "2", "--max-new-tokens",
            "5", "--chat"]
    expected = run_json(capsys, *args)["text"][0]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert out.startswith(expected + "\n[") and out.count("\n") == 2 and out.endswith("]\n")
    assert "Hello there" not in out and "mode" not in out.split("\n")[0]
    rc, out, _ = run_cli(capsys, *args, "--json")
    assert rc == 0 and out.count("\n") == 1 and json.loads(out)["text"] == [expected]


# ---------------------------------------------------------------------------------------------
# Sampling flags
# ---------------------------------------------------------------------------------------------

def test_seed_temperature_top_k_top_p(tiny_dirs, capsys):
    def ids(*extra):
        return run_json(capsys, "--prompt", "Hello there", "--target", tiny_dirs["target"], "--mode", "ar",
                        "--max-new-tokens", "6", "--no-chat", *extra)["token_ids"]
    greedy = ids()
    sampled = ids("--temperature", "1", "--seed", "1")
    assert sampled == ids("--temperature", "1", "--seed", "1")     # the seed makes runs repeatable
    assert sampled != greedy                                        # temperature changes the output
    assert sampled != ids("--temperature", "1", "--seed", "2")
    assert ids("--temperature", "1", "--seed", "1", "--top-k", "1") == greedy      # top-1 is greedy
    assert ids("--temperature", "1", "--seed", "1", "--top-p", "1e-6") == greedy   # so is a tiny nucleus


def test_ssd_flags_batch_and_repeatability(tiny_dirs, capsys):
    args = ["--prompt", "a", "--prompt", "a much longer prompt than the first", *pair(tiny_dirs), "--mode", "ssd", "--temperature",
            "0.8", "--draft-temperature", "0.5", "--top-p", "0.9", "--top-k", "50", "--k", "2", "--fan-out", "2",
            "--saguaro-c", "0.5", "--backup", "jit", "--seed", "7", "--max-new-tokens", "5", "--no-chat",
            "--device", "cpu", "--dtype", "float32", "--no-cuda-graphs"]
    data = run_json(capsys, *args)
    assert len(data["token_ids"]) == 2 and all(len(t) == 5 for t in data["token_ids"])
    assert data["stats"]["k"] == 2 and data["settings"]["saguaro_c"] == 0.5
    assert all(r["fan_out"] == [2, 2, 2] for r in data["rounds"])                # --fan-out F: F per outcome
    assert {r["backup"] for r in data["rounds"]} <= {None, "jit"} and data["stats"]["backups"]["fast"] == 0
    assert run_json(capsys, *args)["token_ids"] == data["token_ids"]


# ---------------------------------------------------------------------------------------------
# Stop conditions: stop strings, EOS, max tokens, Ctrl-C
# ---------------------------------------------------------------------------------------------

def test_stop_string_cuts_text_and_stops_the_row(tiny_dirs, capsys, tok):
    common = ["--prompt", "Hello there", *pair(tiny_dirs, "target"), "--mode", "sd", "--k", "2", "--no-chat"]
    full = run_json(capsys, *common, "--max-new-tokens", "12")
    ids, text = full["token_ids"][0], full["text"][0]
    start = len(tok.decode(ids[:4]))
    stop = text[start:start + 3]
    cut = text[:text.find(stop)]
    data = run_json(capsys, *common, "--max-new-tokens", "12", f"--stop={stop}", "--stop", "never appears")
    assert data["text"] == [cut] and data["finish_reasons"] == ["stop"]
    assert len(data["token_ids"][0]) < 12 and stop in tok.decode(data["token_ids"][0])     # ids up to the stop
    assert data["token_ids"][0] == ids[:len(data["token_ids"][0])]
    rc, out, _ = run_cli(capsys, *common, "--max-new-tokens", "12", f"--stop={stop}")
    assert rc == 0 and out.startswith("Hello there" + cut + "\n[") and stop not in out.split("\n[")[0][11:]


def test_eos_ends_the_row_and_is_never_printed(tiny_dirs, capsys, tok, tmp_path):
    common = ["--prompt", "Hello there", "--mode", "ar", "--max-new-tokens", "8", "--no-chat"]
    ids = run_json(capsys, *common, "--target", tiny_dirs["target"])["token_ids"][0]
    assert ids[2] not in ids[:2]
    model = _link_checkpoint(Path(tiny_dirs["target"]), tmp_path / "eos", skip=("generation_config.json",))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[2]]}))
    data = run_json(capsys, *common, "--target", model)
    assert data["token_ids"] == [ids[:3]] and data["finish_reasons"] == ["eos"]
    assert data["text"] == [tok.decode(ids[:2])]
    rc, out, _ = run_cli(capsys, *common, "--target", model)
    assert rc == 0 and out.startswith("Hello there" + tok.decode(ids[:2]) + "\n[3 tokens")


def test_ctrl_c_keeps_what_was_generated(tiny_dirs, capsys, monkeypatch):
    """Ctrl-C in the third round: the two tokens so far are printed, the reason is "interrupted", status 130."""
    original, calls = rounds.ar_round, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **kw)
    monkeypatch.setattr(rounds, "ar_round", interrupted)
    common = ["--prompt", "Hello there", "--target", tiny_dirs["target"], "--mode", "ar", "--max-new-tokens", "8",
              "--no-chat"]
    rc, out, err = run_cli(capsys, *common, "--json")
    data = json.loads(out)
    assert rc == 130 and data["finish_reasons"] == ["interrupted"] and len(data["token_ids"][0]) == 3
    calls.clear()
    rc, out, err = run_cli(capsys, *common)
    assert rc == 130 and out.startswith("Hello there" + data["text"][0] + "\n[3 tokens") and "interrupted" in err


def test_ctrl_c_during_start_up(tiny_dirs, capsys, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(bootstrap, "open_checkpoints", interrupted)
    rc, out, err = run_cli(capsys, "--prompt", "x", "--target", tiny_dirs["target"], "--mode", "ar")
    assert rc == 130 and out == "" and err.strip().splitlines()[-1] == "interrupted"


# ---------------------------------------------------------------------------------------------
# The timeline and the interactive loop
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("concurrent", [False, True])
def test_fast_profile_trace_shows_the_real_spans(tiny_dirs, capsys, tmp_path, concurrent):
    """The fast engine's trace holds the measured spans, each part inside its round. On a CPU (one device) the
    parts run on the main thread one after the other, --concurrent or not (on a GPU the draft side is a second
    stream inside the round's graph; a worker thread only serves a draft on its own GPU)."""
    path = tmp_path / "trace.json"
    data = run_json(capsys, "--prompt", "Hi", *pair(tiny_dirs, "target"), "--mode", "ssd", "--k", "2", "--max-new-tokens",
                    "9", "--no-chat", "--profile", path, *(["--concurrent"] if concurrent else []))
    trace = json.loads(path.read_text())
    threads = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    rounds = sorted((e for e in events if e["name"].startswith("round ")), key=lambda e: e["ts"])
    assert len(rounds) == len(data["rounds"]) and {"prefill", "lookup", "verify", "glue", "tree"} <= {e["name"] for e in events}
    for e in events:
        if e["name"] not in ("prefill",) and not e["name"].startswith("round "):
            r = rounds[e["args"]["round"]]
            assert r["ts"] - 1 <= e["ts"] and e["ts"] + e["dur"] <= r["ts"] + r["dur"] + 1, e
    glue_track = {e["tid"] for e in events if e["name"] in ("glue", "tree")}
    assert glue_track == {threads["main thread"]}
    assert {e["tid"] for e in events if e["name"] == "verify"} == {threads["main thread"]}


def test_interactive_keeps_the_conversation(tiny_dirs, capsys, monkeypatch, tok):
    prompts, generate = [], Engine.generate

    def spy(self, batch, **kw):
        prompts.append(batch[0])
        return generate(self, batch, **kw)
    monkeypatch.setattr(Engine, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nHow are you?\n/reset\nAgain\n/exit\nnot read\n"))
    rc, out, err = run_cli(capsys, "--interactive", "--target", tiny_dirs["target"], "--mode", "ar",
                           "--max-new-tokens", "4")
    replies = out.split("\n")[:3]
    assert rc == 0 and len(prompts) == 3 and out.count("\n") == 3
    user = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": "How are you?"}]
    assert prompts[0] == tok.apply_chat_template(user[:1]) and prompts[1] == tok.apply_chat_template(user)
    assert prompts[2] == tok.apply_chat_template([{"role": "user", "content": "Again"}])      # after /reset
    assert err.count("tokens/round") == 3


def test_interactive_through_a_pipe(tiny_dirs):
    proc = subprocess.run([sys.executable, str(ROOT / "ssd_fast.py"), "--interactive", *pair(tiny_dirs, "target"),
                           "--k", "2", "--max-new-tokens", "5"], input=b"Hello\nHow are you?\n", capture_output=True,
                          cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().count("\n") == 2 and proc.stderr.decode().count("tokens/round") == 2


# ---------------------------------------------------------------------------------------------
# Bad input: one line, what to do, exit status 2; out of memory: status 3
# ---------------------------------------------------------------------------------------------

BAD = [
    (["--target", "/no/such/dir", "--mode", "ar"], "does not exist"),
    (["--target", str(ROOT), "--mode", "ar"], "not a model checkpoint"),
    (["--target", str(ROOT / "ssd.py")], "is a file, not a model checkpoint"),
    (["--target", "{gpt2}"], "unsupported architecture GPT2LMHeadModel"),
    (["--draft", "{other}"], "the draft's vocabulary (97 tokens) differs from the target's (49152)"),
    (["--prompt", "word " * 80], "does not fit the context window of 64 tokens"),
    (["--mode", "sd", "--draft", None], "--mode sd needs a draft: pass --draft DIR"),
    (["--k", "0"], "--k must be >= 1"), (["--k", "two"], "--k must be a positive integer or 'auto', got 'two'"),
    (["--temperature", "-1"], "--temperature must be >= 0"), (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--draft-temperature", "-0.5"], "--draft-temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"), (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be >= 0"), (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--saguaro-c", "0"], "--saguaro-c must be in (0, 1]"), (["--saguaro-c", "1.5"], "--saguaro-c must be in"),
    (["--fan-out", "many"], "--fan-out must be 'auto' or a positive integer"), (["--fan-out", "0"], "--fan-out must be"),
    (["--gpus", "0"], "--gpus must be >= 1"), (["--seed", "-1"], "--seed must be >= 0"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--mode", "fast"], "argument --mode: invalid choice"), (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--prompt", None], "nothing to do: give --prompt TEXT, --prompt-file FILE or --interactive"),
    (["--prompt", ""], "--prompt is empty"), (["--prompt", " \t\n "], "--prompt is empty (or only white space)"),
    (["--stop", ""], "--stop needs a non-empty string"), (["--threads", "0"], "--threads must be >= 1"),
    (["--prompt", None, "--prompt-file", "/no/prompts.txt"], "--prompt-file /no/prompts.txt does not exist"),
    (["--prompt", None, "--prompt-file", "{gpt2}/config.json", "--interactive", True], "--interactive reads its"),
    (["--prompt", None, "--interactive", True, "--json", True], "--interactive and --json do not go together"),
    (["--target", "{base}", "--chat", True], "has no chat template: drop --chat"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a for a in args if isinstance(a, str))[:40] for args, _ in BAD])
def test_bad_input_is_one_clear_line(tiny_dirs, capsys, args, message):
    argv = {"--prompt": "hi", "--target": tiny_dirs["target"], "--draft": tiny_dirs["draft"], "--mode": "ssd"}
    for flag, value in zip(args[::2], args[1::2]):   # None: leave the flag out; True: the flag alone
        argv[flag] = value.format(**tiny_dirs) if isinstance(value, str) else value
    flat = [x for flag, value in argv.items() if value is not None for x in ((flag,) if value is True else (flag, value))]
    rc, out, err = run_cli(capsys, *flat)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and message in lines[-1] and sum(x.startswith("error") for x in lines) == 1


BROKEN_FILES = [   # (file, its content: text, bytes made from the good file's path, or None: no such file)
    ("config.json", "{not json", "is not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    ("config.json", lambda good: b"\xff\xfe{", "is not UTF-8 text"),
    ("config.json", "[1, 2]", "holds a JSON list, not an object of settings"),
    ("config.json", '{"model_type": "llama"}', "has no '"),
    ("generation_config.json", "{not json", "is not valid JSON"),
    ("tokenizer.json", "{not json", "is not valid JSON"),
    ("tokenizer_config.json", "", "is not valid JSON"),
    ("model.safetensors", lambda good: good.read_bytes()[:4000], "is not a readable safetensors file"),
    ("model.safetensors", lambda good: b"\x08\0\0\0\0\0\0\0{oops:1}", "is not a readable safetensors file"),
    ("model.safetensors", None, "has no *.safetensors weights"),
]


@pytest.mark.parametrize("name,content,message", BROKEN_FILES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BROKEN_FILES)])
def test_a_broken_checkpoint_file_is_named(tiny_dirs, capsys, tmp_path, name, content, message):
    """Every error about a checkpoint's file names the file (or, for one that is missing, the directory)."""
    good = Path(tiny_dirs["target"])
    d = _link_checkpoint(good, tmp_path / "broken", skip=(name,))
    if isinstance(content, str):
        (d / name).write_text(content)
    elif content is not None:
        (d / name).write_bytes(content(good / name))
    rc, out, err = run_cli(capsys, "--prompt", "hi", "--target", d, "--mode", "ar", "--max-new-tokens", "2",
                           "--no-chat")
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and "Traceback" not in err, err
    named = str(d) if content is None else str(d / name)
    assert lines[-1].startswith(f"error: {named}") and message in lines[-1], lines[-1]


@NO_CUDA
@pytest.mark.parametrize("args,message", [
    (["--gpus", "2"], "asked for 2 GPUs but only 0 are visible: drop --gpus to run on the CPU"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible"),
    (["--device", "cuda:1"], "no CUDA GPU is visible")])
def test_gpu_flags_without_a_gpu(tiny_dirs, capsys, args, message):
    rc, out, err = run_cli(capsys, "--prompt", "hi", *pair(tiny_dirs), *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err


def _fake_torch(gpus):
    cuda = SimpleNamespace(is_available=lambda: gpus > 0, device_count=lambda: gpus)
    return SimpleNamespace(cuda=cuda, version=SimpleNamespace(cuda="13.0"), __version__="2.x",
                           float32="f32", bfloat16="bf16", float16="f16")


def _args(**kw):
    return SimpleNamespace(**{"device": None, "gpus": None, "mode": "ssd", "dtype": "auto", **kw})


@pytest.mark.parametrize("gpus,kw,expect", [
    (0, {}, ("cpu", "cpu", None, None)),
    (1, {}, ("cuda:0", "cuda:0", None, "share cuda:0")),
    (1, {"mode": "ar"}, ("cuda:0", None, None, None)),
    (1, {"mode": "sd", "dtype": "float16"}, ("cuda:0", "cuda:0", "f16", None)),
    (2, {"device": "cuda:1"}, ("cuda:1", "cuda:1", None, "share cuda:1")),
    (2, {}, ("cuda:0", "cuda:1", None, None)),                 # SSD takes the second GPU by default
    (2, {"mode": "sd"}, ("cuda:0", "cuda:0", None, None)),     # SD has nothing to overlap: one GPU
    (2, {"gpus": 1}, ("cuda:0", "cuda:0", None, "share cuda:0")),
    (1, {"gpus": 2}, "asked for 2 GPUs but only 1 is visible: use --gpus 1 or fewer"),
    (2, {"device": "cuda:1", "gpus": 2}, "asked for 2 GPUs from cuda:1 on but only 2 are visible"),
    (2, {"device": "cuda:2"}, "asked for GPU 2 but only 2 are visible"),
    (4, {"gpus": 3}, "--gpus 2 is the most this engine uses"),
    (1, {"gpus": 1, "device": "cpu"}, "--gpus asks for GPUs but --device cpu was given"),
])
def test_device_choice(gpus, kw, expect):
    """The GPU logic without a GPU: a stand-in torch with `gpus` visible devices."""
    args = _args(**kw)
    if isinstance(expect, str):
        with pytest.raises(bootstrap.UsageError, match=expect.replace("(", r"\(")):
            bootstrap.choose_devices(args, _fake_torch(gpus))
        return
    p = bootstrap.choose_devices(args, _fake_torch(gpus))
    assert (p.target, p.draft, p.dtype) == expect[:3]
    assert (p.note is None) if expect[3] is None else expect[3] in p.note


def test_out_of_memory_names_the_flags_that_help(tiny_dirs, capsys, monkeypatch):
    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(Engine, "generate", oom)
    rc, out, err = run_cli(capsys, "--prompt", "x", "--target", tiny_dirs["target"], "--mode", "ar", "--chat")
    assert rc == 3 and out == "" and err.strip().splitlines()[-1] == (
        "error: out of memory on cpu: try --dtype bfloat16, a smaller --max-new-tokens or fewer prompts, "
        "or --device cpu")


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "ssd.py"), "--prompt", "x", "--target", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


# ---------------------------------------------------------------------------------------------
# ssd.py's own command line (the reference, on the CPU)
# ---------------------------------------------------------------------------------------------

def test_reference_main_agrees_with_the_engine(tiny_dirs, capsys, tok):
    """Greedy: ssd.py's tokens in every mode are ssd_fast.py's on the same checkpoints, raw text (ssd.py's default,
    ssd_fast.py's --no-chat) and with --chat."""
    common = ["--prompt", "Hello there", *pair(tiny_dirs, "draft"), "--k", "3", "--max-new-tokens", "7"]
    fast = run_json(capsys, *common, "--mode", "sd", "--no-chat")["token_ids"]
    for mode in ("ar", "sd", "ssd"):
        data = run_json(capsys, *common, "--mode", mode, main=ssd.main)
        assert data["token_ids"] == fast and data["finish_reasons"] == ["length"], mode
        assert data["text"] == [tok.decode(fast[0])] and data["stats"]["mode"] == mode
    chat = run_json(capsys, *common, "--mode", "ar", "--chat", main=ssd.main)["token_ids"]
    assert chat == run_json(capsys, *common, "--mode", "ar", "--chat")["token_ids"] != fast


def test_reference_main_prints_the_text_and_a_summary(tiny_dirs, capsys, tok):
    """Two prompts: each prompt and its continuation on a line, then one summary line."""
    args = ["--prompt", "Hello there", "--prompt", "Hi", *pair(tiny_dirs), "--mode", "ssd", "--k", "2",
            "--max-new-tokens", "5"]
    texts = run_json(capsys, *args, main=ssd.main)["text"]
    rc, out, err = run_cli(capsys, *args, main=ssd.main)
    assert rc == 0 and err == "" and out.startswith("Hello there" + texts[0] + "\nHi" + texts[1] + "\n")
    summary = out.splitlines()[-1]
    assert summary.startswith("[10 tokens, ") and summary.endswith(" tokens/round, SSD K=2]")


def test_reference_main_ctrl_c_keeps_what_was_generated(tiny_dirs, capsys, monkeypatch):
    original, calls = ssd.ROUNDS["ar"], []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **kw)
    monkeypatch.setitem(ssd.ROUNDS, "ar", interrupted)
    rc, out, err = run_cli(capsys, "--prompt", "Hello there", "--target", tiny_dirs["target"], "--mode", "ar",
                           "--max-new-tokens", "8", main=ssd.main)
    assert rc == 130 and out.splitlines()[-1].startswith("[3 tokens") and "interrupted" in err


@pytest.mark.parametrize("args,message", [
    (["--target", "/no/such/dir"], "does not exist"),
    (["--top-p", "0"], "top_p must be in (0, 1]"), (["--k", "0"], "k (draft tokens per round) must be"),
    (["--k", "two"], "argument --k: invalid int value"), (["--mode", "auto"], "argument --mode: invalid choice"),
    (["--prompt", "word " * 80], "does not fit the context window of 64 tokens"),
    (["--draft", "{other}"], "the draft's vocabulary (97 tokens) differs from the target's (49152)")])
def test_reference_main_bad_input_is_one_line(tiny_dirs, capsys, args, message):
    argv = ["--prompt", "hi", *pair(tiny_dirs), *[a.format(**tiny_dirs) for a in args]]
    if "/no/such/dir" in args:
        argv = ["--prompt", "hi", "--target", "/no/such/dir", "--mode", "ar"]
    rc, out, err = run_cli(capsys, *argv, main=ssd.main)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_reference_program_runs_and_matches_the_engine(tiny_dirs, capsys):
    """`python ssd.py` is a program of its own (no cli.py): the prompt, the engine's greedy text, a summary."""
    args = ["--prompt", "Hello there", *pair(tiny_dirs, "target"), "--k", "3", "--max-new-tokens", "8"]
    expected = run_json(capsys, *args, "--mode", "ssd", "--no-chat")["text"][0]
    proc = subprocess.run([sys.executable, str(ROOT / "ssd.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("Hello there" + expected + "\n[8 tokens, ") and proc.stdout.endswith("SSD K=3]\n")


def test_chrome_trace_of_the_reference_lays_the_parts_end_to_end(tiny_dirs, tok):
    """ssd.generate runs the parts one after another: laid end to end, the draft's overlap drawn as it would be."""
    model = ssd.load_model(tiny_dirs["target"])
    result = ssd.generate(model, tok.encode("Hi"), model, mode="ssd", k=2, max_new_tokens=7)
    trace = report.chrome_trace(result, "ssd.py ssd K=2")
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["name"] for e in events}
    assert {"prefill", "lookup", "verify", "glue", "tree"} <= names and "round" not in names
    threads = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert threads[2] == "draft GPU (overlapped)"
    seq = sorted((e for e in events if e["tid"] == 1), key=lambda e: e["ts"])
    assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(seq, seq[1:]))        # one after another
    verify = [e for e in seq if e["name"] == "verify"]
    glue = [e for e in events if e["tid"] == 2 and e["name"] == "glue"]
    assert len(verify) == len(glue) == len(result.rounds) and [e["ts"] for e in glue] == [e["ts"] for e in verify]


# ---------------------------------------------------------------------------------------------
# The README's command
# ---------------------------------------------------------------------------------------------

def test_embedded_default_end_to_end():
    """The quick start: the embedded SmolLM2 pair, the chat template on by default, the fast engine."""
    proc = subprocess.run([sys.executable, str(ROOT / "ssd_fast.py"), "--prompt", "What is the capital of France?",
                           "--max-new-tokens", "16"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "tokens/round" in proc.stdout and "AR, target on cpu" in proc.stdout
    assert "draft:" in proc.stderr
    assert "mode: ar (--mode auto: SD predicted" in proc.stderr     # the default mode on a CPU, chosen and said
    assert "<|im_end|>" not in proc.stdout                        # EOS is never printed


def test_k_auto_measures_and_picks(tiny_dirs, capsys):
    """--k auto: the fast engine measures verify, glue and tree steps and says what it picked."""
    data = run_json(capsys, "--prompt", "Hi", *pair(tiny_dirs, "draft"), "--mode", "ssd", "--k", "auto",
                    "--max-new-tokens", "6", "--no-chat")
    assert 1 <= data["stats"]["k"] <= 8 and len(data["token_ids"][0]) == 6
    _, _, err = run_cli(capsys, "--prompt", "Hi", *pair(tiny_dirs, "draft"), "--mode", "sd", "--k", "auto",
                        "--max-new-tokens", "4", "--no-chat")
    assert "--k auto: K=" in err
    rc, _, err = run_cli(capsys, "--prompt", "Hi", *pair(tiny_dirs, "draft"), "--k", "many")
    assert rc == 2 and "--k must be a positive integer or 'auto'" in err


def test_choose_lookahead_table(tiny_dirs):
    import ssd_fast
    engine = ssd_fast.Engine(ssd.load_model(tiny_dirs["target"]), ssd.load_model(tiny_dirs["draft"]), device="cpu",
                             max_seq=64, log=lambda *a: None)
    k, budget, table = engine.choose_lookahead(2, "ssd", k_max=4)
    assert 1 <= k <= 4 and budget in (4, 8, 12, 16, 20, 24, 32, 48) and [r["k"] for r in table] == [1, 2, 3, 4]
    best = max(table, key=lambda r: r["tokens_per_ms"])
    assert best["k"] == k and all(r["verify_ms"] > 0 and r["draft_ms"] > 0 for r in table)


def test_concurrent_flag_keeps_the_tokens(tiny_dirs, capsys):
    plain = run_json(capsys, "--prompt", "Hi", *pair(tiny_dirs, "draft"), "--mode", "ssd", "--k", "3",
                     "--max-new-tokens", "8", "--no-chat")
    overlapped = run_json(capsys, "--prompt", "Hi", *pair(tiny_dirs, "draft"), "--mode", "ssd", "--k", "3",
                          "--max-new-tokens", "8", "--no-chat", "--concurrent")
    assert overlapped["token_ids"] == plain["token_ids"]
    assert {"glue", "tree", "verify"} <= set(overlapped["stats"]["time_s"])


# ---------------------------------------------------------------------------------------------
# Loading: the streaming loader, the context the caches hold, the memory check, CPU threads
# ---------------------------------------------------------------------------------------------

def test_fast_cli_streams_the_weights_and_reports_the_load(tiny_dirs, capsys):
    out = run_json(capsys, "--prompt", "hi", *pair(tiny_dirs, "draft"), "--mode", "sd", "--max-new-tokens", "4")
    load = out["load"]
    assert load["seconds"] > 0 and out["stats"]["load_s"] == load["seconds"]
    assert [r["name"] for r in load["target"] + load["draft"]] == ["target", "draft"]
    assert load["target"][0]["bytes"] > 0 and load["target"][0]["tensors"] == 21    # 2 layers x 9 + embedding, norm, LM head
    rc, text, err = run_cli(capsys, "--prompt", "hi", *pair(tiny_dirs), "--max-new-tokens", "4")
    assert rc == 0 and ", load " in text.splitlines()[-1]
    assert "weights to cpu:" in err and "GB/s" in err     # the stage line (not a terminal): time, bytes, speed


def test_max_context_default_is_said_and_can_be_changed(tiny_dirs, capsys):
    rc, out, err = run_cli(capsys, "--prompt", "hi", *pair(tiny_dirs), "--max-new-tokens", "4", "--json")
    longest = max(len(p) for p in json.loads(out)["prompt_ids"])
    want = min(64, longest + 4 + 2 * 4 + 8)                                    # the target's window is 64
    assert json.loads(out)["max_context"] == want and f"context: {want} tokens per sequence" in err
    assert "--max-context N changes it" in err
    out = run_json(capsys, "--prompt", "hi", *pair(tiny_dirs), "--max-new-tokens", "40", "--max-context", "20",
                   "--no-chat")
    assert out["max_context"] == 20 and out["finish_reasons"] == ["context"]
    assert len(out["prompt_ids"][0]) + len(out["token_ids"][0]) <= 20
    for flags, message in [(["--max-context", "65"], "--max-context 65 is longer than the models' context window "
                                                     "(64 tokens)"),
                           (["--max-context", "5"], "--max-context 5 leaves no room for the longest prompt")]:
        rc, out, err = run_cli(capsys, "--prompt", "hi", *pair(tiny_dirs), *flags)
        assert rc == 2 and message in err and err.count("error") == 1


def test_threads_flag_and_default(tiny_dirs, capsys, monkeypatch):
    before = torch.get_num_threads()
    try:
        rc, _, _ = run_cli(capsys, "--prompt", "hi", *pair(tiny_dirs), "--max-new-tokens", "2", "--threads", "1")
        assert rc == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fake = SimpleNamespace(get_num_threads=lambda: 64)
    for cores, want in [(1, 1), (2, 1), (4, 2), (8, 4), (64, 4)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert bootstrap.cpu_threads(None, fake) == want
    assert bootstrap.cpu_threads(3, fake) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert bootstrap.cpu_threads(None, fake) == 64          # torch already follows $OMP_NUM_THREADS
    rc, out, _ = run_cli(capsys, "--help")
    assert "--threads N" in out and "--max-context N" in out


def test_memory_check_refuses_what_does_not_fit(monkeypatch):
    """The CLI's check on stand-in GPUs of 141 GB: a 70B-shaped target is refused on one GPU (before any weight
    is read, with what to change) and accepted over four."""
    from test_loader import LLAMA_70B
    cfg = ssd.ModelConfig.from_dict(LLAMA_70B)
    fake = _fake_torch(8)
    fake.cuda.mem_get_info = lambda device: (141_000_000_000, 141_000_000_000)
    fake.cuda.get_device_properties = lambda i: SimpleNamespace(total_memory=141_000_000_000)
    fake.device = torch.device
    args = SimpleNamespace(fan_out="auto", mode="ar", k=4)
    lines = []
    with pytest.raises(bootstrap.UsageError, match=r"does not fit in GPU memory: target: 141.1 GB of weights .* Try: --tp 2"):
        bootstrap.check_memory(args, bootstrap.Placement("cuda:0", None, None), cfg, None, torch.bfloat16, 1, 4096, 20,
                         lines.append, fake)
    bootstrap.check_memory(args, bootstrap.Placement("cuda:0", None, None, tp=4), cfg, None, torch.bfloat16, 1, 4096, 20,
                     lines.append, fake)
    assert lines and lines[0].startswith("memory check: target rank 0: 35.3 GB of weights")


def test_mode_auto_rule():
    """--mode auto (policy.choose_mode): SSD for one row on a GPU whose SSD round is one CUDA graph, with the K
    whose draft side hides under the verify; else SD where the models' sizes predict it faster than AR by the
    margin, else AR. The cases measured (BENCHMARKS.md, benchmarks/ssd_round/): the embedded pair on a 2-core CPU,
    one thread (AR 12.9 tok/s, SD 11.3) and on an H200 (SSD K=2 1575 vs AR 1136, SD 1218), the 7B pair on an H200
    (SSD K=4 439 vs SD 410, AR 239), and at batch 4 and 16 (SSD at most SD's speed: SD)."""
    import dataclasses as dc
    from embedded import SHIPPED_DRAFT_DIR as DRAFT_DIR
    target = ssd.ModelConfig.from_dict(dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                            max_position_embeddings=8192, tie_word_embeddings=True))
    draft = ssd.ModelConfig.from_dict(ssd.read_config(DRAFT_DIR))
    expanded = dc.replace(target, hidden_size=576 * 8, intermediate_size=1536 * 8, num_attention_heads=72,
                          num_key_value_heads=24)
    assert policy.choose_mode(target, draft, 4, 1, on_gpu=False)[0] == "ar"
    assert policy.choose_mode(target, draft, 4, 1, on_gpu=False, ssd_round=True)[0] == "ar"   # (no graphs on a CPU)
    assert policy.choose_mode(target, draft, 4, 1, on_gpu=True)[0] == "ar"
    assert policy.choose_mode(expanded, draft, 4, 1, on_gpu=True)[0] == "sd"
    assert policy.choose_mode(target, draft, 4, 1, on_gpu=True, ssd_round=True)[0] == "ssd"
    assert policy.choose_mode(expanded, draft, 4, 1, on_gpu=True, ssd_round=True)[0] == "ssd"
    for batch in (4, 16):
        assert policy.choose_mode(expanded, draft, 4, batch, on_gpu=True, ssd_round=True)[0] == "sd"
    assert policy.ssd_lookahead(target, draft, 1, True) == 2 and policy.ssd_lookahead(expanded, draft, 1, True) == 4
    assert policy.choose_mode(target, None, 4, 1, on_gpu=True) == ("ar", None)


def test_mode_auto_without_a_draft_runs_ar(tiny_dirs, capsys):
    data = run_json(capsys, "--prompt", "hi", "--target", tiny_dirs["target"], "--max-new-tokens", "3", "--no-chat")
    assert data["settings"]["mode"] == "ar" and len(data["token_ids"][0]) == 3


def test_mode_auto_with_an_unusable_draft_says_why_it_runs_ar(tiny_dirs, capsys):
    """A draft of another vocabulary cannot speculate for this target: --mode sd and ssd stop with the reason
    (test_bad_input_is_one_clear_line), --mode auto runs AR and says the same reason on stderr."""
    rc, out, err = run_cli(capsys, "--prompt", "hi", "--target", tiny_dirs["target"], "--draft", tiny_dirs["other"],
                           "--mode", "auto", "--max-new-tokens", "3", "--no-chat", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["settings"]["mode"] == "ar" and data["devices"]["draft"] is None
    said = [line for line in err.splitlines() if line.startswith("mode: ar")]
    assert len(said) == 1 and "the draft cannot be used" in said[0], err
    assert "the draft's vocabulary (97 tokens) differs from the target's (49152)" in said[0]
