"""An OpenAI-compatible HTTP server for the fast engine, with streaming and continuous batching.

    python ssd_fast.py --serve [--host 127.0.0.1] [--port 8000]      # any model, mode and device flag of the CLI

Endpoints: POST /v1/completions (the prompt as it is), POST /v1/chat/completions (the target's chat template
applied), both with `"stream": true` as server-sent events in the OpenAI chunk format; GET /v1/models; GET /health.
Request fields: max_tokens, temperature, top_p, seed, stop, n (1 only), stream, stream_options.include_usage, and
the extensions top_k, mode ("ar" | "sd" | "ssd") and ignore_eos. Every response carries our speculative statistics
(tokens per round, acceptance, cache hit rate) in the extension field `speculative`, and in `usage.speculative`.

How the work is shared (one engine, one device):
  * The engine runs in ONE worker thread (Scheduler) that owns the device; the HTTP side (asyncio, uvicorn) only
    puts requests on a queue and reads their tokens from a queue of its own, so neither waits for the other.
  * Continuous batching: a run (Engine.start) has --max-batch rows. A request that arrives while others decode
    joins the running batch between two rounds (_Run.admit); a finished, stopped or disconnected request leaves it
    (_Run.stop), and its row takes the next request.
  * Which requests share a run: the engine has one sampling filter (top_k, top_p), one mode, one EOS list and one
    random stream per run, and a temperature per row. So requests share a run when their mode and ignore_eos are
    equal and, for T > 0, their top_k and top_p equal the run's (a run started by greedy requests alone has no
    filter); a greedy request (T = 0) joins any run of its mode (argmax is the same under every filter). Admission is first come, first served: when the oldest waiting request
    cannot join the running batch, no later one jumps ahead of it; the batch finishes its rows and the next run
    starts with that request (and every compatible one behind it).
  * Seeds: with a seed and T > 0 a request runs in a run of its own (batch of one, seeded with its seed, nobody
    admitted): its random numbers then depend on nothing but the request, so the same request gives the same text,
    the text `ssd_fast.py --prompt ... --temperature T --seed S` prints. In a shared batch the random streams are
    drawn for the whole batch, so its text would depend on who else is decoding. At T = 0 the seed changes nothing
    and the request shares. Requests without a seed share a run whose seed is fresh every run.
  * Greedy output is the same in a batch as alone: the rows of a batch do not mix (the tests check it against the
    CLI with 16 concurrent clients).
Bad requests get the OpenAI error object {"error": {"message", "type", "param", "code"}} with a 4xx status. Ctrl-C
or SIGTERM: uvicorn stops taking connections, the requests in progress finish, then the worker stops.
"""

import asyncio
import collections
import contextlib
import json
import math
import queue
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Literal

from ssd_engine import bootstrap, cli
from ssd_engine.bootstrap import UsageError
from ssd_engine.report import Streamer, visible

# engine finish reasons -> OpenAI's ("cancelled": the row was stopped for a stop string or a disconnect)
FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length", "context": "length",
          "interrupted": "stop"}


# ---------------------------------------------------------------------------------------------------------------
# Requests and the engine's worker
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One request as the worker sees it. The worker posts events to `events` (on the HTTP side's loop):
    ("tokens", ids so far), then ("done", engine finish reason, ids, statistics) or ("error", status, message)."""
    prompt: list
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    mode: str = "sd"
    ignore_eos: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False          # set by the HTTP side: the row leaves the batch before the next round
    # worker-side bookkeeping
    sent: int = 0
    rounds: int = 0
    accepted: int = 0
    hits: int = 0
    hit_rounds: int = 0
    k: int = 0
    shared: bool = True
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float | None = None

    @property
    def solo(self) -> bool:
        """A seeded sampling request decodes alone (see the module docstring)."""
        return self.seed is not None and self.temperature > 0

    def cancel(self):
        self.cancelled = True

    def statistics(self) -> dict:
        k = self.k if self.mode != "ar" else 0
        return {"mode": self.mode, "k": k, "rounds": self.rounds,
                "tokens_per_round": round((self.accepted + self.rounds) / self.rounds, 4) if self.rounds else None,
                "acceptance_rate": round(self.accepted / (self.rounds * k), 4) if k and self.rounds else None,
                "cache_hit_rate": round(self.hits / self.hit_rounds, 4) if self.hit_rounds else None,
                "batch": "shared" if self.shared else "own",
                "first_token_s": round(self.t_start - self.t_submit, 4) if self.t_start is not None else None}


@dataclass
class _Batch:
    """The run in progress and who sits in which of its rows."""
    run: object
    rounds: object                   # run.rounds_iter()
    rows: dict                       # row -> Job
    mode: str
    ignore_eos: bool
    shared: bool                     # False: a seeded request's own run, nobody joins
    top_k: int = 0
    top_p: float = 1.0
    k: int = 0                       # the lookahead K the run uses (0 for AR)


class ServerClosing(RuntimeError):
    """The server is shutting down: no new requests."""


_CLOSE = object()


class Scheduler:
    """Owns the engine: one thread runs rounds, starts runs, admits and retires rows (module docstring)."""

    def __init__(self, engine, *, eos, k=4, max_new_tokens=64, max_batch=16, fan_out="auto", fan_out_budget=None,
                 saguaro_c=1.0, backup="auto", batch_window=0.02, log=print):
        self.engine, self.eos, self.k = engine, list(eos), k
        self.max_new_tokens, self.max_batch = max_new_tokens, max_batch
        self.spec = dict(fan_out=fan_out, fan_out_budget=fan_out_budget, saguaro_c=saguaro_c, backup=backup)
        self.batch_window, self.log = batch_window, log
        self.inbox = queue.Queue()
        self.pending = collections.deque()
        self.batch: _Batch | None = None
        self.closing = False
        self.served = self.failed = self.cancelled = self.admitted = self.peak = 0   # counters for /health
        self.thread = threading.Thread(target=self._loop, name="ssd-engine", daemon=True)

    # --- the HTTP side's calls (any thread) ---

    def start(self):
        # The worker needs the interpreter lock only briefly between rounds, but when the HTTP thread holds it
        # the worker waits up to a switch interval (5 ms by default: as long as a whole round on a GPU).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        if not self.thread.is_alive():
            self.thread.start()

    def submit(self, job: Job):
        if self.closing:
            raise ServerClosing("the server is shutting down")
        self.inbox.put(job)

    def close(self, timeout=None):
        """Finish what was submitted, then stop the worker."""
        self.closing = True
        self.inbox.put(_CLOSE)
        if self.thread.is_alive():
            self.thread.join(timeout)

    def room(self, mode) -> int:
        """Slots a sequence needs past its tokens: the lookahead's K and the recovery token (ssd.make_request)."""
        return (self.k if mode != "ar" else 0) + 2

    def load(self) -> dict:
        return {"running": len(self.batch.rows) if self.batch else 0, "waiting": len(self.pending) + self.inbox.qsize(),
                "served": self.served, "cancelled": self.cancelled, "failed": self.failed,
                "admitted_while_decoding": self.admitted, "peak_batch": self.peak}

    # --- the worker ---

    def _loop(self):
        import torch
        if self.engine.on_gpu:
            torch.cuda.set_device(self.engine.device)
        with torch.no_grad():
            while self._collect():
                try:
                    self._schedule()
                    if self.batch is not None:
                        self._round()
                except Exception as e:     # a failed round: its requests get the error, the server goes on
                    self._fail(list(self.batch.rows.values()) if self.batch else [], e)
                    self.batch = None

    def _collect(self) -> bool:
        """Move submitted requests to `pending`; when idle, sleep until one comes (False: closed and idle)."""
        if self.batch is None and not self.pending:
            if self.closing and self.inbox.empty():
                return False
            self._take(self.inbox.get())
            # requests that arrive together start together: one batched prefill instead of one admit each
            deadline = time.perf_counter() + self.batch_window
            while len(self.pending) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                try:
                    self._take(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                self._take(self.inbox.get_nowait())
            except queue.Empty:
                return True

    def _take(self, item):
        if item is _CLOSE:
            self.closing = True
        else:
            self.pending.append(item)

    def _fits_shared(self, job) -> bool:
        """A shared run makes room for --max-new-tokens in every row (_Run.admit's check)."""
        return len(job.prompt) + self.max_new_tokens + self.room(job.mode) <= self.engine.max_seq

    def _compatible(self, job, mode, ignore_eos, filt) -> bool:
        """Can `job` decode in a shared run of this mode, EOS rule and sampling filter (None: not fixed yet)?"""
        return (not job.solo and self._fits_shared(job) and job.mode == mode and job.ignore_eos == ignore_eos
                and (job.temperature == 0 or filt is None or (job.top_k, job.top_p) == filt))

    def _schedule(self):
        while self.pending and self.pending[0].cancelled:     # left before it started
            self._deliver([(self.pending.popleft(), ("done", "cancelled", [], None))])
        if self.batch is None:
            if self.pending:
                self._start_batch()
        elif self.pending and len(self.batch.rows) < self.max_batch:
            self._admit()

    def _start_batch(self):
        head = self.pending.popleft()
        shared = not head.solo and self._fits_shared(head)
        jobs = [head]
        filt = (head.top_k, head.top_p) if head.temperature > 0 else None
        while shared and self.pending and len(jobs) < self.max_batch:   # the compatible requests behind it, in order
            job = self.pending[0]
            if not self._compatible(job, head.mode, head.ignore_eos, filt):
                break
            filt = filt or ((job.top_k, job.top_p) if job.temperature > 0 else None)
            jobs.append(self.pending.popleft())
        top_k, top_p = filt or (0, 1.0)     # greedy rows do not care: argmax is the same under any filter
        # Filler rows (copies of the first prompt, stopped at once) give the run --max-batch rows, so that later
        # requests can join it; the bucket's padding rows would be prefilled with that same prompt anyway.
        fill = self.max_batch - len(jobs) if shared else 0
        prompts = [j.prompt for j in jobs] + [head.prompt] * fill
        temperatures = [j.temperature for j in jobs] + [0.0] * fill
        seed = head.seed if not shared else secrets.randbelow(2 ** 31)
        try:
            run = self.engine.start(prompts, mode=head.mode, k=self.k, temperature=temperatures, top_k=top_k,
                                    top_p=top_p, max_new_tokens=self.max_new_tokens if shared else head.max_tokens,
                                    seed=seed, eos_token_id=[] if head.ignore_eos else self.eos, **self.spec)
        except Exception as e:
            self._fail(jobs, e)
            return
        if fill:
            run.stop(list(range(len(jobs), len(prompts))), "filler")
        self.batch = _Batch(run, run.rounds_iter(), dict(enumerate(jobs)), head.mode, head.ignore_eos, shared,
                            top_k, top_p, run.result().k)
        now = time.perf_counter()
        for j in jobs:
            j.t_start, j.k, j.shared = now, self.batch.k, shared
        self._sweep(None)

    def _admit(self):
        batch, now = self.batch, time.perf_counter()
        admitted = False
        while (batch.shared and self.pending and len(batch.rows) < self.max_batch
               and self._compatible(self.pending[0], batch.mode, batch.ignore_eos, (batch.top_k, batch.top_p))):
            job = self.pending.popleft()
            if job.cancelled:
                self._deliver([(job, ("done", "cancelled", [], None))])
                continue
            try:
                row = batch.run.admit(job.prompt, temperature=job.temperature)
            except ValueError:          # no free row after all: wait for one
                self.pending.appendleft(job)
                break
            batch.rows[row] = job
            job.t_start, job.k, job.shared = now, batch.k, True
            admitted = True
            self.admitted += 1
        if admitted:
            self._sweep(None)           # the first token (from the prefill) goes out now

    def _round(self):
        batch = self.batch
        try:
            stats = next(batch.rounds)
        except StopIteration:           # every row is done
            self._sweep(None)
            self.batch = None
            return
        self._sweep(stats)
        # The requests keep their own statistics; the run's list of rounds would grow with the server's uptime.
        del batch.run.rounds[:]

    def _sweep(self, stats):
        """After a round (or a prefill): count each request's round, send its new tokens, and retire the rows
        that are done (EOS, their max_tokens, the context) or cancelled (a stop string, a disconnect)."""
        batch = self.batch
        res = batch.run.result()
        events, leaving = [], []
        self.peak = max(self.peak, len(batch.rows))
        for row, job in list(batch.rows.items()):
            if stats is not None and stats.active is not None and row < len(stats.active) and stats.active[row]:
                job.rounds += 1
                job.accepted += stats.accepted[row]
                if stats.hit is not None and row < len(stats.hit):
                    job.hit_rounds += 1
                    job.hits += bool(stats.hit[row])
            ids, reason = res.tokens[row], res.finish_reasons[row]
            if len(ids) > job.max_tokens or (len(ids) == job.max_tokens and reason is None):
                ids, reason = ids[:job.max_tokens], "length"    # a shared run makes room for more
            elif reason is None and job.cancelled:
                reason = "cancelled"
            if reason is None:
                if len(ids) > job.sent:
                    events.append((job, ("tokens", list(ids))))
                    job.sent = len(ids)
                continue
            if res.finish_reasons[row] is None:
                leaving.append(row)
            del batch.rows[row]
            self.served += 1
            self.cancelled += reason == "cancelled"
            events.append((job, ("done", reason, list(ids), job.statistics())))
        if leaving:
            batch.run.stop(leaving, "cancelled")
        self._deliver(events)

    def _fail(self, jobs, error):
        status = 400 if isinstance(error, ValueError) else 500
        self.log(f"server: a run failed ({type(error).__name__}: {error})")
        if status == 500:
            traceback.print_exc(file=sys.stderr)
        self.failed += len(jobs)
        self._deliver([(j, ("error", status, f"{type(error).__name__}: {error}")) for j in jobs])

    @staticmethod
    def _deliver(events):
        """Hand events to the HTTP side: one call per event loop and round (call_soon_threadsafe wakes it)."""
        by_loop = collections.defaultdict(list)
        for job, event in events:
            if job.loop is not None:
                by_loop[job.loop].append((job, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):     # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_dispatch, items)


def _dispatch(items):
    for job, event in items:
        job.events.put_nowait(event)


# ---------------------------------------------------------------------------------------------------------------
# The HTTP side
# ---------------------------------------------------------------------------------------------------------------

class APIError(Exception):
    """Answered as the OpenAI error object."""

    def __init__(self, status, message, param=None, code=None, type_=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServeConfig:
    """What the HTTP side needs to know besides the scheduler."""
    model_name: str
    tokenizer: object
    eos: list
    max_context: int                 # the engine's max_seq: prompt + generated tokens + K's room
    max_new_tokens: int = 64         # the most a request may ask for, and the default
    mode: str = "sd"
    modes: tuple = ("ar", "sd", "ssd")
    temperature: float = 0.0         # defaults for requests that leave these out (the CLI's flags)
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple = ()                # --stop strings: apply to every request
    created: int = field(default_factory=lambda: int(time.time()))


def _models():
    """The request bodies (pydantic), built on first use so that importing server.py needs no FastAPI."""
    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="allow", allow_inf_nan=False)
        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=-1)           # an extension (vLLM's); -1 or 0 = off
        seed: int | None = Field(None, ge=0, lt=2 ** 63)
        stop: str | list[str] | None = None
        n: int | None = 1
        stream: bool = False
        stream_options: StreamOptions | None = None
        mode: Literal["ar", "sd", "ssd"] | None = None   # an extension: this request's decoding
        ignore_eos: bool = False                          # an extension (vLLM's): generate max_tokens exactly
        presence_penalty: float | None = None             # OpenAI fields not implemented here: 0 / null only
        frequency_penalty: float | None = None
        logit_bias: dict | None = None
        user: str | None = None

    class Completion(Sampling):
        prompt: str | list[int] | list[str] | list[list[int]]
        echo: bool = False
        best_of: int | None = None
        suffix: str | None = None
        logprobs: int | None = None

    class Part(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[Part] | None = None

    class Chat(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool | None = None
        top_logprobs: int | None = None

    return Completion, Chat


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


class API:
    """The endpoints, over a Scheduler (see create_app)."""

    def __init__(self, scheduler: Scheduler, cfg: ServeConfig):
        self.scheduler, self.cfg = scheduler, cfg
        self.tok = cfg.tokenizer
        self.eos = set(cfg.eos)
        self.Completion, self.Chat = _models()

    # --- parsing and checking a request ---

    async def _body(self, request, schema):
        from pydantic import ValidationError
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = [str(x) for x in err["loc"] if not str(x).startswith(("str", "list", "function"))]
            param = ".".join(loc) or None
            raise APIError(400, f"{param or 'body'}: {err['msg']}", param=param, code="invalid_value") from None
        if req.model != self.cfg.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist: this server serves '{self.cfg.model_name}' "
                                "(GET /v1/models)", param="model", code="model_not_found")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by this server (only 0)", param=name,
                               code="unsupported_value")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_value")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                           code="unsupported_value")
        if req.n not in (None, 1):
            raise APIError(400, f"n must be 1 (one completion per request), got {req.n}", param="n",
                           code="unsupported_value")
        return req

    def _job(self, req, prompt, param, max_tokens) -> tuple[Job, list]:
        cfg = self.cfg
        mode = req.mode or cfg.mode
        if mode not in cfg.modes:
            raise APIError(400, f"mode {mode} needs a draft model, and this server has none (it serves "
                                f"{', '.join(cfg.modes)})", param="mode", code="unsupported_value")
        if max_tokens is None:
            max_tokens = cfg.max_new_tokens
        if max_tokens > cfg.max_new_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}, more than this server gives a request "
                                f"({cfg.max_new_tokens}, its --max-new-tokens)", param="max_tokens",
                           code="max_tokens_exceeded")
        room = self.scheduler.room(mode)
        if len(prompt) + room > cfg.max_context:
            raise APIError(400, f"the prompt is {len(prompt)} tokens, longer than this server's context of "
                                f"{cfg.max_context} tokens (with {room} for the lookahead)", param=param,
                           code="context_length_exceeded")
        if len(prompt) + max_tokens + room > cfg.max_context:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) do not fit this "
                                f"server's context of {cfg.max_context} tokens (with {room} for the lookahead): "
                                f"ask for at most {cfg.max_context - room - len(prompt)} tokens",
                           param="max_tokens", code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop", code="invalid_value")
        temperature = cfg.temperature if req.temperature is None else req.temperature
        top_k = cfg.top_k if req.top_k is None else max(0, req.top_k)
        job = Job(prompt=list(prompt), max_tokens=max_tokens, temperature=float(temperature),
                  top_k=top_k, top_p=cfg.top_p if req.top_p is None else req.top_p,
                  seed=cfg.seed if req.seed is None else req.seed, mode=mode, ignore_eos=req.ignore_eos)
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        return job, stops + list(cfg.stops)

    def _encode_prompt(self, prompt) -> list:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]        # a batch of one
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            raise APIError(400, "one prompt per request (n = 1): send the others as their own requests",
                           param="prompt", code="unsupported_value")
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        vocab = self.tok.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt", code="invalid_value")
        return ids

    def _encode_chat(self, messages) -> list:
        if not self.tok.has_chat_template:
            raise APIError(400, f"the model {self.cfg.model_name} has no chat template: use /v1/completions",
                           param="messages", code="unsupported_value")
        turns = []
        for m in messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text for p in m.content)
            turns.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            return self.tok.apply_chat_template(turns)
        except Exception as e:
            raise APIError(400, f"the chat template rejected these messages ({e})", param="messages",
                           code="invalid_value") from None

    # --- running a request ---

    async def _generate(self, job: Job, stops):
        """Yield a submitted job's (text delta, None) as rounds are accepted, then (last delta, final) once:
        final = dict(finish_reason, completion_tokens, statistics). The text is the CLI's: EOS never shows, a stop
        string cuts it (report.visible), and the stream holds back a possible stop string's start (report.Streamer)."""
        parts = []
        streamer = Streamer(self.tok, self.eos, stops, parts.append)
        done = False
        try:
            while not done:
                event = await job.events.get()
                final = None
                if event[0] == "tokens":
                    if streamer.update(event[1]):
                        job.cancel()      # a stop string: the row leaves at the next round
                elif event[0] == "done":
                    _, reason, ids, stats = event
                    text, ids, hit = visible(self.tok, ids, self.eos, stops)
                    streamer.finish(text)
                    final = {"finish_reason": "stop" if hit else FINISH.get(reason, "stop"),
                             "completion_tokens": len(ids), "statistics": stats}
                    done = True
                else:
                    _, status, message = event
                    done = True
                    raise APIError(status, message)
                if parts or final:
                    delta = "".join(parts)
                    parts.clear()
                    yield delta, final
        finally:
            if not done:          # the client went away (or the stream was closed): free the row
                job.cancel()

    async def _watch_disconnect(self, request, job):
        """Non-streaming requests: cancel the job if the client disconnects before the answer."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    async def _complete(self, request, job, stops):
        watcher = asyncio.ensure_future(self._watch_disconnect(request, job))
        try:
            text = []
            async for delta, final in self._generate(job, stops):
                text.append(delta)
            return "".join(text), final
        finally:
            watcher.cancel()

    def _usage(self, job, final) -> dict:
        n = final["completion_tokens"]
        return {"prompt_tokens": len(job.prompt), "completion_tokens": n, "total_tokens": len(job.prompt) + n,
                "speculative": final["statistics"]}

    async def _stream(self, job, stops, chat, rid, include_usage):
        """Server-sent events in the OpenAI chunk format, then `data: [DONE]`."""
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.cfg.model_name}

        def choice(delta, finish=None):
            if chat:
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        try:
            if chat:
                yield _sse({**head, "choices": [choice({"role": "assistant", "content": ""})]})
            async for delta, final in self._generate(job, stops):
                if final is None:
                    yield _sse({**head, "choices": [choice({"content": delta} if chat else delta)]})
                    continue
                if delta:
                    yield _sse({**head, "choices": [choice({"content": delta} if chat else delta)]})
                yield _sse({**head, "choices": [choice({} if chat else "", final["finish_reason"])],
                            "speculative": final["statistics"]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": self._usage(job, final)})
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    async def completions(self, request):
        req = await self._body(request, self.Completion)
        if req.echo or req.suffix or (req.best_of or 1) != 1:
            raise APIError(400, "echo, suffix and best_of are not supported by this server",
                           param="echo" if req.echo else "suffix" if req.suffix else "best_of",
                           code="unsupported_value")
        job, stops = self._job(req, self._encode_prompt(req.prompt), "prompt", req.max_tokens)
        return await self._respond(request, req, job, stops, chat=False)

    async def chat_completions(self, request):
        req = await self._body(request, self.Chat)
        job, stops = self._job(req, self._encode_chat(req.messages), "messages",
                               req.max_completion_tokens if req.max_tokens is None else req.max_tokens)
        return await self._respond(request, req, job, stops, chat=True)

    async def _respond(self, request, req, job, stops, chat):
        from fastapi.responses import JSONResponse, StreamingResponse
        try:
            self.scheduler.submit(job)
        except ServerClosing as e:
            raise APIError(503, str(e), code="server_shutting_down") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(job, stops, chat, rid, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, final = await self._complete(request, job, stops)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": final["finish_reason"]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final["finish_reason"]}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.cfg.model_name, "choices": [choice],
                             "usage": self._usage(job, final), "speculative": final["statistics"]})

    def models(self):
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": self.cfg.created,
                                            "owned_by": "ssd", "max_model_len": self.cfg.max_context}]}

    def health(self):
        from fastapi.responses import JSONResponse
        status = "draining" if self.scheduler.closing else "ok"
        return JSONResponse({"status": status, "model": self.cfg.model_name, "mode": self.cfg.mode,
                             **self.scheduler.load()}, status_code=503 if status != "ok" else 200)


def create_app(scheduler: Scheduler, cfg: ServeConfig):
    """The FastAPI app. Its lifespan starts the scheduler's worker and, at shutdown (after uvicorn has let the
    requests in progress finish), stops it."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)

    api = API(scheduler, cfg)
    app = FastAPI(title="SSD", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):   # unknown paths and methods, in the same shape
        return JSONResponse(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                     else None).body(), status_code=e.status_code)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.chat_completions(request)

    @app.get("/v1/models")
    async def models():
        return api.models()

    @app.get("/health")
    async def health():
        return api.health()

    return app


# ---------------------------------------------------------------------------------------------------------------
# Running it: in this process's main thread (the command line) or in a thread (tests, the benchmark)
# ---------------------------------------------------------------------------------------------------------------

def bind(host="127.0.0.1", port=0) -> socket.socket:
    """A listening socket (port 0: a free one; its number is sock.getsockname()[1])."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


class ThreadedServer:
    """uvicorn in a background thread on 127.0.0.1 and a free port: `with ThreadedServer(app) as srv: srv.url`."""

    def __init__(self, app, host="127.0.0.1", port=0, timeout=30.0):
        import uvicorn
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)
        self.timeout = timeout

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(self.timeout)
        self.sock.close()


def build_parser():
    """The CLI's parser (every model, mode, device and decoding flag) plus the serving flags."""
    ap = cli.build_parser()
    ap.prog = "ssd_fast.py --serve"
    ap.description = ("An OpenAI-compatible HTTP server for the fast engine (AR, SD, SSD), with streaming and "
                      "continuous batching. The model, mode, device and decoding flags are the command line's; the "
                      "decoding flags are the defaults of requests that leave them out.")
    ap.epilog = """\
examples:
  %(prog)s                                        the embedded pair, SSD, http://127.0.0.1:8000/v1
  %(prog)s --mode sd --port 8080 --max-new-tokens 512 --max-batch 32
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}], "stream": true}'

exit status: 0 stopped (Ctrl-C or SIGTERM: the requests in progress finish first), 2 bad flags."""
    ap.set_defaults(seed=None)   # a request without a seed gets a fresh one (unless --seed gives a default)
    g = ap.add_argument_group("serving (ssd_fast.py --serve)")
    g.add_argument("--serve", action="store_true",
                   help="serve the OpenAI API over HTTP (POST /v1/completions, /v1/chat/completions; GET /v1/models, "
                        "/health) instead of generating from --prompt. The decoding flags are the requests' defaults; "
                        "--max-new-tokens is the most one request may ask for")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send (default: the target checkpoint's directory name)")
    g.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="rows decoded together: concurrent requests share a batch of up to N (default 16 on a GPU; "
                        f"on a CPU {CPU_ROWS_PER_THREAD} per --threads thread, at most 16, said at start-up)")
    g.add_argument("--batch-window", type=float, default=20.0, metavar="MS",
                   help="when idle, a request waits up to MS for others (until --max-batch are waiting), so that a "
                        "burst starts with one batched prefill instead of one admit per request (default 20)")
    return ap


# On a CPU a batch's step costs about its rows' work (no idle parallel units to fill), and the KV cache lives in
# the machine's memory: serve a few rows per thread and a context that answers chats, not the models' window.
CPU_ROWS_PER_THREAD, CPU_CONTEXT = 4, 2048


def size_for_the_machine(args, on_gpu: bool, threads: int) -> list:
    """Fill in --max-batch when not given: 16 on a GPU, CPU_ROWS_PER_THREAD per thread (at most 16) on a CPU.
    Returns the CPU defaults taken, to be said at start-up."""
    if args.max_batch is not None:
        return []
    args.max_batch = 16 if on_gpu else min(16, CPU_ROWS_PER_THREAD * threads)
    return [] if on_gpu else [f"--max-batch {args.max_batch}"]


def kv_gib(target_cfg, draft_cfg, rows: int, context: int) -> float:
    """The KV caches of `rows` rows of `context` tokens in float32 (the CPU's dtype), target and draft."""
    per_token = sum(2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
                    for c in (target_cfg, draft_cfg) if c is not None)
    return rows * context * per_token / 2 ** 30


def check_args(args):
    """The CLI's checks, and the serving flags'."""
    if args.prompt or args.prompt_file or args.interactive or args.json or args.profile:
        raise UsageError("--serve takes its prompts over HTTP: drop --prompt, --prompt-file, --interactive, "
                             "--json and --profile")
    if args.draft_temperature is not None:
        raise UsageError("--draft-temperature is not served: each request's temperature is its draft's too")
    seed, args.seed = args.seed, (args.seed if args.seed is not None else 0)
    args.prompt = ["(served)"]      # cli.check_args wants something to do
    try:
        cli.check_args(args)
    finally:
        args.prompt, args.seed = [], seed
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch is not None and not 1 <= args.max_batch <= 64:
        raise UsageError(f"--max-batch must be in 1..64, got {args.max_batch}")
    if not (math.isfinite(args.batch_window) and 0 <= args.batch_window <= 1000):
        raise UsageError(f"--batch-window must be in 0..1000 ms, got {args.batch_window}")
    if args.temperature > 2:
        raise UsageError(f"--temperature must be in 0..2 for the server (OpenAI's range), got {args.temperature}")


def load(args, log):
    """Devices, models, tokenizer and the engine, as the CLI chooses and loads them (bootstrap.py), sized for
    --max-batch rows of --max-context tokens. Returns (scheduler, config)."""
    import torch
    placement = bootstrap.place(args, torch)
    on_gpu = placement.target != "cpu"
    cpu_defaults = size_for_the_machine(args, on_gpu, torch.get_num_threads())

    def context(args, prompt_ids, target_cfg, draft_cfg, log):
        window = min(target_cfg.max_position_embeddings, draft_cfg.max_position_embeddings if draft_cfg else 1 << 30)
        tokens = args.max_context or min(window, 4096 if on_gpu else CPU_CONTEXT)
        if cpu_defaults:
            threads = torch.get_num_threads()
            log(f"CPU defaults, sized to this machine ({threads} thread{'s' * (threads > 1)}): "
                + ", ".join(cpu_defaults) + (f", --max-context {tokens}" if not args.max_context else "")
                + f" (KV cache {kv_gib(target_cfg, draft_cfg, args.max_batch, tokens):.2f} GiB); the flags change them")
        if tokens > window:
            raise UsageError(f"--max-context {tokens} is longer than the models' context window ({window} tokens)")
        return tokens

    def ready(args, boot):
        draft_on = f" + {placement.draft}" if placement.draft and placement.draft != placement.target else ""
        return (f"server: {args.served_model_name or boot.target_dir.name} on {placement.target_devices()}{draft_on}, "
                f"mode {args.mode}" + (f" K={args.k}" if args.mode != "ar" else "")
                + f", batches of up to {args.max_batch}, context {boot.engine.max_seq} tokens; ready")
    # the warm-up captures the CUDA graphs of a full batch and of a batch of one, greedy, to the full length
    boot = bootstrap.boot(args, placement, log, rows=args.max_batch, context=context,
                          warm_rows=sorted({args.max_batch, 1}), ready=ready,
                          warm=dict(temperature=0.0, top_k=0, top_p=1.0, seed=0, eos_token_id=[]))
    engine, tok, eos = boot.engine, boot.tok, boot.eos
    budget = boot.settings.get("fan_out_budget") if args.mode == "ssd" else None
    scheduler = Scheduler(engine, eos=eos, k=args.k, max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                          fan_out=args.fan_out, fan_out_budget=budget, saguaro_c=args.saguaro_c, backup=args.backup,
                          batch_window=args.batch_window / 1000, log=log)
    cfg = ServeConfig(model_name=args.served_model_name or boot.target_dir.name, tokenizer=tok, eos=eos,
                      max_context=engine.max_seq, max_new_tokens=args.max_new_tokens, mode=args.mode,
                      modes=("ar", "sd", "ssd") if engine.draft is not None else ("ar",), temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stops=tuple(args.stop))
    return scheduler, cfg


def main(argv=None) -> int:
    """`ssd_fast.py --serve ...`; returns the exit status (2: bad flags, 0: stopped by Ctrl-C / SIGTERM)."""
    def log(*a):
        print(*a, file=sys.stderr, flush=True)
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        check_args(args)
        import fastapi  # noqa: F401  (a missing install is one line, before the models load)
        import uvicorn
    except SystemExit as e:         # --help
        return int(e.code or 0)
    except UsageError as e:
        log(f"error: {e}")
        return 2
    except ImportError as e:
        log(f"error: --serve needs FastAPI and uvicorn ({e}): pip install -r requirements.txt")
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        log(f"error: cannot listen on {args.host}:{args.port} ({e.strerror or e}): choose another --port or --host")
        return 2
    try:
        scheduler, cfg = load(args, log)
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    host = f"[{args.host}]" if ":" in args.host else args.host
    log(f"server: listening on http://{host}:{sock.getsockname()[1]}/v1 (Ctrl-C stops it after the requests in "
        "progress)")
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, cfg), log_level="info", lifespan="on",
                                           access_log=False))
    # uvicorn handles SIGINT / SIGTERM (stop accepting, let the requests in progress finish, lifespan shutdown),
    # then raises the signal again for the handler it found: a stop asked for is a clean exit, status 0.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    scheduler.close()
    log("server: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
