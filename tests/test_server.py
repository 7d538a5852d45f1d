"""The OpenAI-compatible server (server.py) on the CPU with the embedded pair (SmolLM2-135M-Instruct and its draft,
loaded once for the module): the official `openai` client and raw HTTP, streaming and not, 16 concurrent clients
whose greedy texts equal the CLI's for their prompt alone, seeded sampling that repeats, every bad request of the
issue, a client that disconnects, SIGTERM draining a real server process, and the benchmark script's logic.

Each test starts its own uvicorn in a thread on 127.0.0.1 and a free port (server.ThreadedServer) over the one
engine; leaving the block stops uvicorn and the scheduler's worker, so no two workers ever share the engine.
The expected texts come from the same engine's `generate` for each prompt alone, which is what
`ssd_fast.py --prompt` prints (test_chat_matches_the_cli checks that against the CLI itself)."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from ssd_engine import cli, report  # noqa: E402
import embedded  # noqa: E402
from ssd_engine import server  # noqa: E402
import ssd  # noqa: E402
import ssd_fast  # noqa: E402
from conftest import ROOT  # noqa: E402

CONTEXT = 128          # tokens per sequence: short caches keep the CPU's attention cheap
CAP = 32               # the server's --max-new-tokens
K = 4
NAME = "smollm2-test"
TIMEOUT = 120.0
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Water boils at", "The opposite of hot is", "Once upon a",
           "My favourite colour is", "def add(a, b):", "The sun rises in the", "Cats and", "A haiku about rain:",
           "Monday, Tuesday,", "The largest planet is", "Roses are red,", "import numpy as", "Dear Sir or",
           "E = mc"]


@pytest.fixture(scope="module")
def pair():
    """The embedded models, one fast engine on the CPU, its tokenizer and EOS ids."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the CI machine has 2 cores: a second thread that finds none idle slows decoding
    target_dir = embedded.ensure_target(progress=False)
    draft_dir, _ = embedded.default_draft(progress=False)
    tok = embedded.load_tokenizer(target_dir)
    target, draft, _, _ = ssd_fast.load_pair(str(target_dir), str(draft_dir), "sd", log=lambda *a: None, tokenizer=tok)
    engine = ssd_fast.Engine(target, draft, device="cpu", max_seq=CONTEXT, log=lambda *a: None)
    eos = sorted(set(target.cfg.eos_token_ids) | {tok.eos_token_id})
    yield engine, tok, eos
    torch.set_num_threads(threads)


@contextlib.contextmanager
def serving(pair, mode="sd", max_batch=2, batch_window=0.005, **cfg):
    engine, tok, eos = pair
    scheduler = server.Scheduler(engine, eos=eos, k=K, max_new_tokens=CAP, max_batch=max_batch,
                                 batch_window=batch_window, log=lambda *a: None)
    config = server.ServeConfig(model_name=NAME, tokenizer=tok, eos=eos, max_context=CONTEXT, max_new_tokens=CAP,
                                mode=mode, **cfg)
    with server.ThreadedServer(server.create_app(scheduler, config)) as srv:
        srv.scheduler = scheduler
        yield srv
    assert not scheduler.thread.is_alive()


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def alone(pair, ids, mode="sd", max_tokens=8, **kw):
    """The text the CLI prints for this prompt alone: the same engine's generate, decoded as the CLI does (report.visible)."""
    engine, tok, eos = pair
    out = engine.generate([ids], mode=mode, k=K, max_new_tokens=max_tokens, eos_token_id=eos, **kw)
    return report.visible(tok, out.tokens[0], set(eos), kw.get("stops", []))[0]


def sse_events(response):
    """The data lines of a server-sent-event stream, checking its framing."""
    events = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_openai_client_completions_streaming_and_not(pair):
    ids = pair[1].encode(PROMPTS[0])
    expected = alone(pair, ids)
    with serving(pair) as srv:
        c = client(srv)
        assert [m.id for m in c.models.list().data] == [NAME]
        out = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert out.choices[0].text == expected and out.choices[0].finish_reason in ("length", "stop")
        assert out.usage.prompt_tokens == len(ids) and 1 <= out.usage.completion_tokens <= 8
        stats = out.model_extra["speculative"]
        assert stats == out.usage.model_extra["speculative"]
        assert stats["mode"] == "sd" and stats["k"] == K and stats["rounds"] >= 1
        assert 1 <= stats["tokens_per_round"] <= K + 1 and 0 <= stats["acceptance_rate"] <= 1
        chunks = list(c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == out.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
        # a stop string cuts the text before it, as the CLI's --stop does
        cut = expected[3:8]
        out = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[cut])
        assert out.choices[0].text == expected[:expected.index(cut)] and out.choices[0].finish_reason == "stop"


def test_chat_matches_the_cli(pair, capsys):
    """`ssd_fast.py --prompt P` (chat template on for the instruct model) prints what /v1/chat/completions says."""
    prompt = "Name a fruit."
    argv = ["--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8", "--mode", "sd", "--k", str(K),
            "--device", "cpu", "--json"]
    if "--max-context" in cli.build_parser().format_help():
        argv += ["--max-context", str(CONTEXT)]      # the same cache length as the server's engine
    assert cli.run(argv) == 0
    cli_text = json.loads(capsys.readouterr().out)["text"][0]
    torch.set_num_threads(1)
    with serving(pair) as srv:
        c = client(srv)
        out = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=8,
                                        temperature=0)
        assert out.choices[0].message.content == cli_text and out.choices[0].message.role == "assistant"
        stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=8,
                                           temperature=0, stream=True)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cli_text
        assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
        assert chunks[-1].model_extra["speculative"]["rounds"] >= 1


def test_raw_http_sse_models_health(pair):
    with serving(pair) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
        assert h.get("/health").json()["status"] == "ok"
        models = h.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == NAME
        body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0}
        plain = h.post("/v1/completions", json=body).json()
        assert plain["object"] == "text_completion" and plain["id"].startswith("cmpl-")
        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
        assert "".join(e["choices"][0]["text"] for e in events) == plain["choices"][0]["text"]
        assert events[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert "speculative" in events[-1]
        # a prompt of token ids is the same prompt
        ids = pair[1].encode(PROMPTS[2])
        assert h.post("/v1/completions", json={**body, "prompt": ids}).json()["choices"] == plain["choices"]


def test_16_concurrent_greedy_clients_get_the_cli_text(pair):
    """16 clients, half streaming; the second eight arrive while the first eight decode and join their batch.
    Each text equals its prompt's text alone. AR: a batch of 16 verifying K + 1 tokens a row is slow on a CPU;
    SD's and SSD's greedy texts through the server are checked on their own above."""
    ids = [pair[1].encode(p) for p in PROMPTS]
    expected = [alone(pair, p, mode="ar") for p in ids]
    texts, errors = [None] * 16, []
    first_token = threading.Event()
    with serving(pair, mode="ar", max_batch=16, batch_window=0.05) as srv:
        def ask(i):
            try:
                body = {"model": NAME, "prompt": PROMPTS[i], "max_tokens": 8, "temperature": 0}
                with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
                    if i % 2:
                        texts[i] = h.post("/v1/completions", json=body).json()["choices"][0]["text"]
                        return
                    with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        parts = []
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                parts.append(json.loads(line[6:])["choices"][0]["text"])
                                first_token.set()     # the first eight are decoding: send the others
                        texts[i] = "".join(parts)
            except Exception as e:   # reported below
                errors.append(repr(e))
                first_token.set()
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for t in threads[:8]:
            t.start()
        assert first_token.wait(TIMEOUT)
        for t in threads[8:]:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        load = srv.scheduler.load()
    assert not errors, errors
    for i in range(16):
        assert texts[i] == expected[i], (i, PROMPTS[i], texts[i], expected[i])
    assert load["served"] == 16 and load["admitted_while_decoding"] >= 1 and load["peak_batch"] >= 8


def test_seeded_sampling_repeats_even_beside_other_requests(pair):
    """T > 0 with a seed: its own run, seeded with the request's seed, so the same request gives the same text
    (also while another request decodes), the text of `ssd_fast.py --temperature 0.9 --seed 7`."""
    ids = pair[1].encode(PROMPTS[4])
    expected = alone(pair, ids, temperature=0.9, seed=7)
    body = {"model": NAME, "prompt": PROMPTS[4], "max_tokens": 8, "temperature": 0.9, "seed": 7}
    with serving(pair) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
        first = h.post("/v1/completions", json=body).json()
        assert first["choices"][0]["text"] == expected and first["speculative"]["batch"] == "own"
        other = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", timeout=TIMEOUT, json={
            "model": NAME, "prompt": PROMPTS[5], "max_tokens": 8, "temperature": 1.0}))
        other.start()
        second = h.post("/v1/completions", json=body).json()
        other.join(TIMEOUT)
        assert second["choices"][0]["text"] == expected


def test_ssd_mode_request(pair):
    """The `mode` extension: SSD's greedy text is the target's, and its statistics carry the cache hit rate."""
    ids = pair[1].encode(PROMPTS[1])
    expected = alone(pair, ids, mode="ar", max_tokens=6)
    with serving(pair, max_batch=1) as srv:
        out = client(srv).completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                             extra_body={"mode": "ssd"})
    assert out.choices[0].text == expected
    stats = out.model_extra["speculative"]
    assert stats["mode"] == "ssd" and stats["cache_hit_rate"] is not None and 0 <= stats["cache_hit_rate"] <= 1


BAD = [  # (body or raw bytes, path, status, param, code)
    (b'{"model": "x", "prompt": ', "completions", 400, None, "invalid_json"),
    (b'[1, 2]', "completions", 400, None, "invalid_json"),
    ({"model": "gpt-4", "prompt": "Hi"}, "completions", 404, "model", "model_not_found"),
    ({"model": None, "prompt": "Hi"}, "completions", 400, "model", "invalid_value"),
    ({"prompt": "Hi", "temperature": 2.5}, "completions", 400, "temperature", "invalid_value"),
    ({"prompt": "Hi", "temperature": -1}, "completions", 400, "temperature", "invalid_value"),
    (b'{"model": "%s", "prompt": "Hi", "temperature": NaN}' % NAME.encode(), "completions", 400, "temperature",
     "invalid_value"),
    ({"prompt": "Hi", "top_p": 0}, "completions", 400, "top_p", "invalid_value"),
    ({"prompt": "Hi", "top_p": 1.5}, "completions", 400, "top_p", "invalid_value"),
    ({"prompt": "Hi", "top_k": -2}, "completions", 400, "top_k", "invalid_value"),
    ({"prompt": "Hi", "max_tokens": 0}, "completions", 400, "max_tokens", "invalid_value"),
    ({"prompt": "Hi", "max_tokens": "ten"}, "completions", 400, "max_tokens", "invalid_value"),
    ({"prompt": "Hi", "seed": -1}, "completions", 400, "seed", "invalid_value"),
    ({"prompt": "Hi", "max_tokens": CAP + 1}, "completions", 400, "max_tokens", "max_tokens_exceeded"),
    ({"prompt": "word " * CONTEXT}, "completions", 400, "prompt", "context_length_exceeded"),
    ({"prompt": "word " * (CONTEXT - 20), "max_tokens": CAP}, "completions", 400, "max_tokens",
     "context_length_exceeded"),
    ({"prompt": "Hi", "n": 2}, "completions", 400, "n", "unsupported_value"),
    ({"prompt": "Hi", "n": 0}, "completions", 400, "n", "unsupported_value"),
    ({"prompt": ["Hi", "Ho"]}, "completions", 400, "prompt", "unsupported_value"),
    ({"prompt": ""}, "completions", 400, "prompt", "invalid_value"),
    ({"prompt": [10 ** 9]}, "completions", 400, "prompt", "invalid_value"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, "completions", 400, "stop", "invalid_value"),
    ({"prompt": "Hi", "logprobs": 2}, "completions", 400, "logprobs", "unsupported_value"),
    ({"prompt": "Hi", "mode": "fast"}, "completions", 400, "mode", "invalid_value"),
    ({"messages": []}, "chat/completions", 400, "messages", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "chat/completions", 400, "messages.0.role",
     "invalid_value"),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 3}, "chat/completions", 400, "n", "unsupported_value"),
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}]}, "chat/completions", 400, "messages",
     "context_length_exceeded"),
]


def test_bad_requests_get_the_openai_error_object(pair):
    with serving(pair) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
        for body, path, status, param, code in BAD:
            if isinstance(body, dict):    # the model is ours unless the case names another (None: left out)
                body = json.dumps({k: v for k, v in {"model": NAME, **body}.items() if v is not None}).encode()
            r = h.post(f"/v1/{path}", content=body, headers={"content-type": "application/json"})
            err = r.json()["error"]
            assert (r.status_code, err["param"], err["code"]) == (status, param, code), (body[:80], r.json())
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert err["message"]
        for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
            r = h.request(method, path)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        # the official client raises the matching exceptions
        with pytest.raises(openai.NotFoundError):
            client(srv).completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client(srv).completions.create(model=NAME, prompt="Hi", max_tokens=CAP + 1)
        assert srv.scheduler.load()["served"] == 0     # none of them reached the engine


def test_a_disconnect_mid_stream_frees_the_row(pair):
    with serving(pair, mode="ar", max_batch=1) as srv:
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": CAP, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h, h.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break              # the first text arrived: hang up
        deadline = time.monotonic() + 60
        while srv.scheduler.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        load = srv.scheduler.load()
        assert load["running"] == 0 and load["cancelled"] == 1
        # the freed row serves the next request
        out = client(srv).completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=3, temperature=0)
        assert out.choices[0].text == alone(pair, pair[1].encode(PROMPTS[2]), mode="ar", max_tokens=3)


def test_sigterm_drains_the_request_in_progress_and_exits_cleanly(tmp_path):
    """A real `--serve` process (as ssd_fast.py --serve runs it): SIGTERM during a stream lets it finish, then
    the process exits with status 0."""
    argv = ["--serve", "--port", "0", "--mode", "ar", "--device", "cpu", "--max-context", "64", "--max-new-tokens",
            "12", "--threads", "1", "--served-model-name", NAME]
    proc = subprocess.Popen([sys.executable, "-c", f"import sys; from ssd_engine import server; sys.exit(server.main({argv!r}))"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited early"
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            url = m and m.group(1)
        assert url, "the server did not start"
        while True:   # listening before the models load: wait until it answers
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        body = {"model": NAME, "prompt": "Count: 1, 2, 3,", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    proc.send_signal(signal.SIGTERM)
                    break
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 12
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("argv,message", [
    (["--serve", "--prompt", "Hi"], "takes its prompts over HTTP"),
    (["--serve", "--port", "70000"], "--port must be in 0..65535"),
    (["--serve", "--max-batch", "0"], "--max-batch must be in 1..64"),
    (["--serve", "--temperature", "3"], "--temperature must be in 0..2"),
    (["--serve", "--draft-temperature", "1"], "--draft-temperature is not served"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    assert server.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bench_serve_logic(pair):
    """scripts/bench_serve.py's measurement on a small case: both sides count every token; the JSON has the
    fields the GPU run reports."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_serve
    engine, tok, eos = pair
    scheduler = server.Scheduler(engine, eos=eos, k=K, max_new_tokens=CAP, max_batch=2, log=lambda *a: None)
    cfg = server.ServeConfig(model_name=NAME, tokenizer=tok, eos=eos, max_context=CONTEXT, max_new_tokens=CAP,
                             mode="ar")
    out = bench_serve.bench(scheduler, cfg, [tok.encode(p) for p in PROMPTS[:2]], 4, repeats=1,
                            in_process_clients=True, log=lambda *a: None)
    assert out["engine"]["tokens"] == out["served"]["tokens"] == 8 and out["served"]["all_tokens"]
    assert out["ratio"] > 0 and out["served"]["ttft_s"]["max"] > 0 and out["served"]["itl_ms"]["mean"] > 0
    assert out["greedy_equal_alone"] == 2
    json.dumps(out)


class _FakeRun:
    """What the scheduler uses of ssd_fast._Run, without a model: each round appends one token to every active row."""

    def __init__(self, prompts, max_new_tokens, **settings):
        self.prompts, self.max_new, self.settings, self.rounds = [list(p) for p in prompts], max_new_tokens, settings, []
        self.tokens = [[] for _ in prompts]
        self.finish = [None] * len(prompts)
        self.admitted = []

    def rounds_iter(self):
        while not all(self.finish):
            active = [f is None for f in self.finish]
            for b, on in enumerate(active):
                if on:
                    self.tokens[b].append(b)
                    self.finish[b] = "length" if len(self.tokens[b]) >= self.max_new else None
            yield ssd.RoundStats(accepted=[0] * len(active), active=active)

    def admit(self, prompt, temperature=None):
        b = self.finish.index(next(f for f in self.finish if f is not None))
        self.prompts[b], self.tokens[b], self.finish[b] = list(prompt), [], None
        self.admitted.append(list(prompt))
        return b

    def stop(self, rows, reason="stop"):
        for b in rows:
            self.finish[b] = self.finish[b] or reason

    def result(self):
        return ssd.GenerationResult(tokens=[list(t) for t in self.tokens], finish_reasons=self.finish, rounds=[],
                                    mode="ar", k=0)


class _FakeEngine:
    max_seq, on_gpu = 100, False

    def __init__(self):
        self.runs = []

    def start(self, prompts, **kw):
        self.runs.append(_FakeRun(prompts, **kw))
        return self.runs[-1]


def test_batching_policy():
    """Who shares a run: greedy requests join any run of their mode; sampling ones need the run's top_k / top_p; a
    seeded sampling request runs alone with its seed; first come, first served (nobody joins past a request that
    waits); requests arriving mid-run join it between rounds; each leaves at its own max_tokens."""
    engine = _FakeEngine()
    sch = server.Scheduler(engine, eos=[0], max_new_tokens=8, max_batch=4, log=lambda *a: None)

    def job(i, **kw):
        return server.Job(prompt=[i], max_tokens=3 + i % 2, mode="ar", **kw)

    def run_until_idle(*late):
        """Serve what is pending; `late` arrives after the first round."""
        while sch.batch is not None or sch.pending:
            sch._schedule()
            if sch.batch is not None:
                sch._round()
                sch.pending.extend(late)
                late = ()
    sch.pending.extend([job(1), job(2, temperature=1.0, top_p=0.9), job(3, temperature=1.0, top_p=0.5), job(4),
                        job(5, temperature=0.7, seed=3)])
    run_until_idle(job(6))
    prompts = [r.prompts[:2] for r in engine.runs]
    assert prompts == [[[1], [2]], [[3], [4]], [[5]], [[6], [6]]]   # 4 waited behind 3, and 6 behind them all
    assert [r.settings["top_p"] for r in engine.runs] == [0.9, 0.5, 1.0, 1.0]
    assert [len(r.prompts) for r in engine.runs] == [4, 4, 1, 4]      # shared runs have --max-batch rows
    assert engine.runs[2].settings["seed"] == 3 and engine.runs[2].max_new == 4    # its own max_tokens
    assert [len(t) for t in engine.runs[0].tokens[:2]] == [4, 3]      # each its own max_tokens
    assert not any(r.admitted for r in engine.runs)
    sch.pending.append(job(7))
    run_until_idle(job(8, temperature=1.0))
    assert engine.runs[-1].admitted == [[8]]          # a greedy run takes sampling requests with its filter (none)
    assert sch.load()["served"] == 8 and sch.load()["admitted_while_decoding"] == 1
