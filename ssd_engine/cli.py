"""The command line of ssd.py (the readable reference) and ssd_fast.py (the fast engine).

    python ssd_fast.py --prompt "The capital of France is"        # the fast engine
    python ssd.py --prompt "The capital of France is"             # the reference, same flags

Both programs call `run(argv, backend)`: backend "reference" decodes with ssd.generate, "fast" with
ssd_fast.Engine. The flags mean the same thing in both. What the program does, in order:

  1. check every flag (a bad one is one line `error: ...`, exit status 2, before anything loads);
  2. choose devices (`--device`, `--gpus`) and resolve the models (the embedded SmolLM2 pair by default);
  3. preflight: read both configs and the tokenizer, encode the prompts and validate the whole request
     with ssd.make_request, so an unsupported architecture, a draft of another vocabulary or a prompt
     longer than the context window is reported before any weights are read;
  4. load the weights (a progress bar with elapsed time on a terminal), move them to the device, and on
     a GPU capture the CUDA graphs with a short warm-up;
  5. generate: one prompt streams its text as rounds are accepted; several print one after another;
     `--json` prints one object; `--interactive` is a chat loop. A one-line summary follows.

Stdout carries the output: the generated text (after the prompt itself with --no-chat) and the summary
line; the JSON object alone with --json; the replies with --interactive (their summary lines go to stderr).
Progress, notes and errors go to stderr. Exit status: 0 done, 2 bad input, 3 out of memory, 130 interrupted (Ctrl-C; what was generated
is printed first).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

PROGRAMS = {"reference": "ssd.py", "fast": "ssd_fast.py"}
DESCRIPTIONS = {
    "reference": "AR, SD and SSD (Saguaro) decoding with the readable reference (ssd.py, runs on the CPU).",
    "fast": "AR, SD and SSD (Saguaro) decoding with the fast engine (ssd_fast.py: Triton kernels and CUDA graphs "
            "on a GPU, the same algorithm with PyTorch ops on a CPU).",
}
EPILOG = """\
examples:
  %(prog)s --prompt "What is the capital of France?"
  %(prog)s --no-chat --prompt "The capital of France is"
  %(prog)s --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --max-new-tokens 128
  %(prog)s --prompt-file prompts.txt --json > out.json
  %(prog)s --interactive

output: stdout carries the generated text and one summary line: one prompt's text as it is accepted (after the
  prompt itself with --no-chat, since the text continues it); several prompts' texts each under a
  '--- [i/n] PROMPT ---' line. --json: one JSON object and nothing else. --interactive: the replies (and the
  '> ' prompt on a terminal); each reply's summary line goes to stderr. Progress, notes and errors go to stderr.
{serving}
exit status: 0 done, 2 bad input, 3 out of memory, 130 interrupted (what was generated is printed first)."""
SERVING = """
serving: %(prog)s --serve runs the OpenAI-compatible HTTP server (server.py) with the model, mode, device and
  decoding flags above; %(prog)s --serve --help lists its own flags (--host, --port, --max-batch, ...).
"""


class UsageError(ValueError):
    """A bad flag: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error and exits; we want one line
        raise UsageError(f"{message} (see --help)")


def _k_flag(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be a positive integer or 'auto', got {value!r}") from None


K_AUTO_MAX = 8   # the largest K that --k auto considers


def build_parser(backend: str = "fast") -> argparse.ArgumentParser:
    ap = _Parser(prog=PROGRAMS[backend], description=DESCRIPTIONS[backend],
                 epilog=EPILOG.format(serving=SERVING if backend == "fast" else ""),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("input")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text; repeat the flag for a batch")
    g.add_argument("--prompt-file", metavar="FILE",
                   help="a file with one prompt per line (blank lines are skipped; '-' reads stdin): a batch")
    g.add_argument("--interactive", action="store_true",
                   help="a multi-turn chat in the terminal (or from piped stdin); /reset forgets the conversation, "
                        "/exit or end of input quits, Ctrl-C stops a reply")
    chat = g.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help=("wrap each prompt in the target's chat template. This is the default when the target's "
                            "tokenizer has one (instruct models such as the embedded SmolLM2-135M-Instruct do)")
                      if backend == "fast" else
                      ("wrap each prompt in the target's chat template. The reference continues the raw text by "
                       "default, except in --interactive (ssd_fast.py defaults to the template for instruct models)"))
    chat.add_argument("--no-chat", dest="chat", action="store_false",
                      help="send the prompt text as it is (and echo it before the continuation)")

    g = ap.add_argument_group("models and devices")
    g.add_argument("--target", metavar="DIR",
                   help="target checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--draft", metavar="DIR",
                   help="draft checkpoint directory, same vocabulary as the target (default with the embedded "
                        "target: its distilled draft)")
    g.add_argument("--device", metavar="cpu|cuda|cuda:N",
                   help="where the target runs (default: " + ("cuda if a GPU is visible, else cpu)" if backend == "fast"
                                                            else "cpu; the reference runs on the CPU only)"))
    g.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs to use from --device on: 1 = target and draft share a GPU, 2 = the draft gets its "
                        "own GPU (what SSD's overlap needs). Default: 2 for --mode ssd when a second GPU is visible "
                        "(the draft's side then runs during the verify), else 1")
    if backend == "fast":
        g.add_argument("--tp", type=int, default=1, metavar="N",
                       help="tensor parallelism: split the target over N GPUs from --device on (one process per GPU, "
                            "Megatron-style shards, NCCL inside the CUDA graphs). SD and SSD put the draft on the next "
                            "GPU when one is visible (N+1 GPUs: what SSD's overlap wants), else on the target's first "
                            "GPU (said once). --gpus, if given, must be N (draft shares) or N+1. The attention heads "
                            "and KV heads must divide by N. Default 1")
        g.add_argument("--max-context", type=int, metavar="N",
                       help="the longest sequence (prompt + generated tokens) the engine makes room for: the KV caches "
                            "are allocated for N tokens per row. Default: the longest prompt + --max-new-tokens + K's "
                            "room (4096 for --interactive), never more than the models' context window (said on "
                            "stderr). A 128K-context checkpoint thus gets 128K-token caches only when asked")
        g.add_argument("--linear", choices=["auto", "torch", "triton"], default="auto",
                       help="the projections of one-row decode steps on a GPU: auto (default) times cuBLAS against "
                            "the one-row Triton GEMV per projection at load and keeps the faster (with CUDA graphs); "
                            "torch: always cuBLAS; triton: always the Triton kernel")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations (default auto: bfloat16 on a GPU, float32 on a CPU)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the models' math when they run on the CPU (default: half of the cores this "
                        "process may use, at most 4, or $OMP_NUM_THREADS if set). More threads than idle cores make "
                        "decoding much slower (on a busy 2-core machine, 2 threads ran 6-8x slower than 1)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the fast engine's steps eagerly (slower; for debugging). The reference never uses "
                        "CUDA graphs and ignores it")
    g.add_argument("--concurrent", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="fast engine, SSD: run the draft's glue pass and tree decode while the target verifies: "
                        "on one GPU on a second CUDA stream inside the round's CUDA graph, with the draft on its own "
                        "GPU (--gpus 2) on a worker thread. auto (default): on where CUDA graphs run or the draft has "
                        "its own GPU; off: one part after the other (always so on a CPU, and in the reference)")

    g = ap.add_argument_group("decoding")
    g.add_argument("--mode", choices=["auto", "ar", "sd", "ssd"], default="auto" if backend == "fast" else "ssd",
                   help="ar = target alone, sd = speculative decoding, ssd = speculative speculative decoding; "
                        + ("auto (default) = ssd, sd or ar, whichever the models' sizes on this device say is "
                           "faster (said on stderr): ssd for one prompt on a GPU with CUDA graphs, where it measured "
                           "fastest (BENCHMARKS.md)" if backend == "fast" else
                           "auto = sd or ar by the models' sizes. Default: ssd (this is the lesson)"))
    g.add_argument("--k", type=_k_flag, default=None, metavar="K|auto",
                   help="lookahead: draft tokens per round (default 4; when --mode auto picks SSD, the largest K <= 4 "
                        "whose draft side the models' sizes say hides under the verify); 'auto' (ssd_fast.py) measures the models' "
                        "step times and picks the K (and, with --fan-out auto, the speculation budget) whose drafting "
                        "fits inside the target's verify")
    g.add_argument("--fan-out", default="auto", metavar="auto|F",
                   help="SSD: 'auto' sizes Saguaro's geometric fan-out from the running acceptance (budget 4(K+1), or, "
                        "with the draft side concurrent on its own GPU, the budget whose measured draft side fits in "
                        "the verify, printed); "
                        "an integer F gives F recovery-token candidates to every outcome")
    g.add_argument("--saguaro-c", type=float, default=1.0, metavar="C",
                   help="SSD: Saguaro sampling constant in (0, 1]; below 1 it trades acceptance for cache hits "
                        "(default 1 = off)")
    g.add_argument("--backup", choices=["auto", "jit", "fast"], default="auto",
                   help="SSD on a cache miss: jit = the draft decodes now, fast = a cheap n-gram proposal, auto = "
                        "chosen from the batch size and measured costs (default)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    g.add_argument("--draft-temperature", type=float, metavar="T", help="the draft's (default: --temperature)")
    g.add_argument("--top-k", type=int, default=0, metavar="N", help="keep the N most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens with mass P (1 = off)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="generate at most N tokens per prompt, exactly N unless EOS, a stop string or the context "
                        "window ends it first (default 64)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop a prompt's generation when its text contains STR (cut before it); repeatable")
    g.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same output")

    g = ap.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (prompts, ids, text, finish reasons, statistics, rounds, devices, "
                        "models) and nothing else on stdout")
    g.add_argument("--profile", metavar="FILE",
                   help="write the per-round timeline as a Chrome trace (open in chrome://tracing or "
                        "ui.perfetto.dev)")
    return ap


# ---------------------------------------------------------------------------------------------
# Checking the flags
# ---------------------------------------------------------------------------------------------

def check_args(args) -> None:
    """Every numeric flag, with a message naming it. NaN fails every comparison, so it is rejected too."""
    def finite(x):
        return x is not None and math.isfinite(x)
    args.k_auto = args.k == "auto"
    args.k_given = args.k is not None
    if args.k is None:   # not given: 4 (--mode auto picks SSD's K itself)
        args.k = 4
    if args.k_auto:
        args.k = K_AUTO_MAX          # an upper bound until the engine has measured (sizes the caches)
    if not (args.k >= 1):
        raise UsageError(f"--k must be >= 1 (draft tokens per round), got {args.k}")
    for flag, value in (("--temperature", args.temperature), ("--draft-temperature", args.draft_temperature)):
        if value is not None and not (finite(value) and value >= 0):
            raise UsageError(f"{flag} must be >= 0 (0 = greedy), got {value}")
    if not (finite(args.top_p) and 0 < args.top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (finite(args.saguaro_c) and 0 < args.saguaro_c <= 1):
        raise UsageError(f"--saguaro-c must be in (0, 1] (1 = off), got {args.saguaro_c}")
    if args.fan_out != "auto":
        try:
            fan = int(args.fan_out)
        except ValueError:
            fan = 0
        if fan < 1:
            raise UsageError(f"--fan-out must be 'auto' or a positive integer, got {args.fan_out!r}")
        args.fan_out = fan
    if args.gpus is not None and args.gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {args.gpus}")
    if getattr(args, "tp", 1) < 1:
        raise UsageError(f"--tp must be >= 1 (GPUs the target is split over), got {args.tp}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if any(s == "" for s in args.stop):
        raise UsageError("--stop needs a non-empty string")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt is empty (or only white space): give some text")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "max_context", None) is not None and args.max_context < 2:
        raise UsageError(f"--max-context must be >= 2 (tokens per sequence), got {args.max_context}")
    if args.interactive:
        if args.prompt or args.prompt_file:
            raise UsageError("--interactive reads its prompts from the terminal: drop --prompt / --prompt-file")
        if args.json:
            raise UsageError("--interactive and --json do not go together: use --prompt-file FILE --json for scripts")
    elif not args.prompt and not args.prompt_file:
        raise UsageError("nothing to do: give --prompt TEXT, --prompt-file FILE or --interactive")


def read_prompt_file(path: str) -> list[str]:
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"--prompt-file {path} does not exist (give a text file, one prompt per line)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompt-file {path} has no prompts (one per line; blank lines are skipped)")
    return prompts


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Placement:
    target: str                 # "cpu", "cuda:0", ... (with tp > 1: the first of the target's GPUs)
    draft: str | None           # where the draft runs (None in AR mode)
    dtype: object               # a torch dtype, or None for the engine's default
    note: str | None = None     # said once on stderr
    tp: int = 1                 # GPUs the target is split over (tensor parallel, tp.py)

    def target_devices(self) -> str:
        if self.tp == 1:
            return self.target
        first = int(self.target[5:])
        return f"cuda:{first}..cuda:{first + self.tp - 1} (tensor parallel)"


def choose_devices(args, backend: str, torch) -> Placement:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = args.device
    if device is not None and device != "cpu" and not (device == "cuda" or
                                                      (device.startswith("cuda:") and device[5:].isdigit())):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if args.gpus is not None:
        if device == "cpu":
            raise UsageError("--gpus asks for GPUs but --device cpu was given: drop one of them")
        if args.gpus > count:
            hint = "drop --gpus to run on the CPU" if count == 0 else f"use --gpus {count} or fewer"
            raise UsageError(f"asked for {args.gpus} GPU{'s' if args.gpus > 1 else ''} but only {count} "
                             f"{'is' if count == 1 else 'are'} visible: {hint}")
    if device is not None and device.startswith("cuda"):
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA GPU is visible (torch {torch.__version__}, "
                             f"CUDA {torch.version.cuda or 'not built in'}): drop --device to run on the CPU")
        if device.startswith("cuda:") and int(device[5:]) >= count:
            raise UsageError(f"--device {device}: asked for GPU {device[5:]} but only {count} "
                             f"{'is' if count == 1 else 'are'} visible (cuda:0 .. cuda:{count - 1})")
    tp = getattr(args, "tp", 1) or 1
    if tp > 1:
        if device == "cpu":
            raise UsageError("--tp splits the target over GPUs (one process per GPU); on the CPU drop --tp")
        if count < tp:
            hint = "drop --tp to run on the CPU" if count == 0 else f"use --tp {count} or fewer"
            raise UsageError(f"--tp {tp} splits the target over {tp} GPUs but only {count} "
                             f"{'is' if count == 1 else 'are'} visible: {hint}")
    if device is None:   # the fast engine takes a GPU when there is one; the reference runs on the CPU
        device = "cuda" if count and (backend == "fast" or args.gpus) else "cpu"
    if device == "cuda":
        device = "cuda:0"
    on_gpu = device != "cpu"
    if backend == "reference" and on_gpu:
        raise UsageError("ssd.py, the readable reference, runs on the CPU only: use ssd_fast.py for GPUs, "
                         "or pass --device cpu")
    first = int(device[5:]) if on_gpu else 0
    if tp > 1:
        return _tp_placement(args, tp, device, first, count, torch)
    gpus = args.gpus
    if gpus is None:   # SSD wants the draft on its own GPU: take the next one when it is there
        gpus = 2 if args.mode == "ssd" and on_gpu and first + 1 < count else 1
    if on_gpu and first + gpus > count:
        raise UsageError(f"asked for {gpus} GPUs from {device} on but only {count} are visible "
                         f"(cuda:0 .. cuda:{count - 1}): start from a lower --device or use fewer --gpus")
    if gpus > 2:
        raise UsageError(f"--gpus {gpus}: the target runs on one GPU and the draft on at most one more, so "
                         "--gpus 2 is the most this engine uses")
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if dtype is None and backend == "reference":
        dtype = torch.float32
    draft, note = device, None
    if args.mode != "ar" and on_gpu:
        if gpus >= 2 and engine_takes_draft_device():
            draft = f"cuda:{first + 1}"
        elif gpus >= 2:
            note = (f"note: this engine runs the draft on the target's GPU ({device}); the second GPU stays "
                    "idle")
        elif args.mode == "ssd":
            note = (f"note: target and draft share {device}, so the draft's work is not overlapped with the "
                    "verify as SSD intends: give the draft its own GPU with --gpus 2")
    return Placement(target=device, draft=draft if args.mode != "ar" else None, dtype=dtype, note=note)


def _tp_placement(args, tp, device, first, count, torch) -> Placement:
    """--tp N: the target on N GPUs from `device` on; for SD/SSD the draft on the next GPU (what SSD's overlap
    wants) when --gpus allows it and one is visible, else sharing the target's first GPU, with a note."""
    if args.gpus is not None and args.gpus not in (tp, tp + 1):
        raise UsageError(f"--tp {tp} takes {tp} GPUs for the target and, for SD/SSD, one more for the draft: "
                         f"--gpus must be {tp} or {tp + 1}, got {args.gpus}")
    if first + tp > count:
        raise UsageError(f"--tp {tp} from {device} on needs cuda:{first}..cuda:{first + tp - 1} but only {count} "
                         f"{'is' if count == 1 else 'are'} visible: start from a lower --device or use a smaller --tp")
    spare = first + tp < count and args.gpus != tp
    if args.gpus == tp + 1 and not spare:
        raise UsageError(f"--gpus {tp + 1} with --tp {tp} from {device} on needs cuda:{first + tp} for the draft but "
                         f"only {count} GPUs are visible")
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    draft, note = None, None
    if args.mode != "ar":
        draft = f"cuda:{first + tp}" if spare else device
        if not spare:
            note = (f"note: --tp {tp} uses cuda:{first}..cuda:{first + tp - 1} for the target and no GPU is left for "
                    f"the draft: it shares {device} with the target's first shard (one more GPU gives it its own)")
    elif args.gpus == tp + 1:
        note = f"note: --mode ar runs no draft: cuda:{first + tp} stays idle"
    return Placement(target=device, draft=draft, dtype=dtype, note=note, tp=tp)


def engine_takes_draft_device() -> bool:
    import inspect

    import ssd_fast
    return "draft_device" in inspect.signature(ssd_fast.Engine.__init__).parameters


# ---------------------------------------------------------------------------------------------
# Progress of the start-up work
# ---------------------------------------------------------------------------------------------

class Startup:
    """Start-up stages on stderr: a tqdm bar with the stage's name and the elapsed time on a terminal,
    one line per finished stage otherwise; `finish` prints the total."""

    def __init__(self, total: int, log):
        self.log_line, self.t0, self.stage, self.t_stage = log, time.perf_counter(), None, None
        self.loaded, self.t_shown = {}, 0.0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                            bar_format="{desc} {bar:24} {n_fmt}/{total_fmt} [{elapsed}]")

    def __call__(self, stage: str):
        self._end_stage()
        self.stage, self.t_stage = stage, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description_str(f"loading: {stage}")

    def _end_stage(self):
        if self.stage is None:
            return
        seconds = time.perf_counter() - self.t_stage
        if self.bar is not None:
            self.bar.update(1)
        else:
            read = self._weights_line(final=True)
            rate = sum(v[0] for v in self.loaded.values()) / seconds / 1e9 if seconds > 0 else 0
            self.log_line(f"  {self.stage}: {seconds:.1f} s" + (f" ({read}, {rate:.2f} GB/s)" if read else ""))
        self.stage, self.loaded = None, {}

    def weights(self, name, rank, done, total, tensors, n_tensors):
        """loader.Checkpoint's progress: bytes and tensors read, per model and tensor-parallel rank."""
        self.loaded[(name, rank)] = (done, total, tensors, n_tensors)
        now = time.perf_counter()
        if self.bar is not None and (now - self.t_shown > 0.1 or done == total):
            self.t_shown = now
            self.bar.set_description_str(f"loading: {self.stage}: {self._weights_line()}")

    def _weights_line(self, final=False) -> str:
        """target 3.1/16.1 GB, 40/291 tensors; with ranks: their bytes too."""
        out = []
        for name in dict.fromkeys(n for n, _ in self.loaded):
            ranks = sorted((r, v) for (n, r), v in self.loaded.items() if n == name)
            done, total = sum(v[0] for _, v in ranks), sum(v[1] for _, v in ranks)
            tensors, n_tensors = sum(v[2] for _, v in ranks), sum(v[3] for _, v in ranks)
            line = (f"{name} {done / 1e9:.2f} GB, {tensors} tensors" if final else
                    f"{name} {done / 1e9:.2f}/{total / 1e9:.2f} GB, {tensors}/{n_tensors} tensors")
            if len(ranks) > 1:
                line += " (" + ", ".join(f"rank {r} {v[0] / 1e9:.2f}" + ("" if final else f"/{v[1] / 1e9:.2f}")
                                         + " GB" for r, v in ranks) + ")"
            out.append(line)
        return "; ".join(out)

    def log(self, *a):
        """Log a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(" ".join(str(x) for x in a), file=sys.stderr)
        else:
            self.log_line(*a)

    def finish(self, message: str):
        self._end_stage()
        if self.bar is not None:
            self.bar.close()
        self.log_line(f"{message} in {time.perf_counter() - self.t0:.1f} s")

    def close(self):  # on an error: leave the terminal clean
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Text: EOS, stop strings, streaming
# ---------------------------------------------------------------------------------------------

def find_stop(text: str, stops) -> int:
    """Index of the earliest stop string in text, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def visible(tok, ids, eos, stops):
    """(text to show, ids it comes from, stopped): EOS never shows; a stop string cuts the text before
    it, and the ids are cut to the shortest prefix whose text contains it."""
    ids = list(ids)
    text = tok.decode([t for t in ids if t not in eos])
    cut = find_stop(text, stops) if stops else -1
    if cut < 0:
        return text, ids, False
    for m in range(1, len(ids) + 1):
        if find_stop(tok.decode([t for t in ids[:m] if t not in eos]), stops) >= 0:
            ids = ids[:m]
            break
    return text[:cut], ids, True


class Streamer:
    """Writes one row's text as rounds are accepted: decodes the whole generated sequence and writes
    the new suffix, holding back an incomplete UTF-8 character ("\ufffd" at the end) and any tail that
    may be the start of a stop string."""

    def __init__(self, tok, eos, stops, write):
        self.tok, self.eos, self.stops, self.write, self.printed = tok, eos, stops, write, ""

    def update(self, ids) -> bool:
        text, _, stopped = visible(self.tok, ids, self.eos, self.stops)
        if not stopped:
            hold = len(text) - len(text.rstrip("\ufffd"))
            for s in self.stops:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            text = text[:len(text) - hold]
        self._emit(text)
        return stopped

    def finish(self, text: str):
        self._emit(text)

    def _emit(self, text):
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.write(text[len(self.printed):])
            self.printed = text


def write_out(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Statistics and the timeline
# ---------------------------------------------------------------------------------------------

def decode_seconds(result) -> float:
    """Time spent in rounds: the fast engine records each round's wall time as "round"; the reference
    times the parts, which run one after another."""
    return sum(r.times["round"] if "round" in r.times else sum(r.times.values()) for r in result.rounds)


def summary_line(summary: dict, decode_s: float, placement: Placement, backend: str) -> str:
    n = summary["generated_tokens"]
    rate = f"{n / decode_s:.1f} tok/s" if decode_s > 0 else "- tok/s"
    parts = [f"{n} tokens in {decode_s:.2f} s", rate, f"{summary['tokens_per_round']:.2f} tokens/round",
             f"prefill {summary['prefill_s']:.2f} s"]
    if summary.get("load_s") is not None:
        parts.append(f"load {summary['load_s']:.1f} s")
    if summary["acceptance_rate"] is not None:
        parts.append(f"acceptance {summary['acceptance_rate']:.2f}")
    if summary["cache_hit_rate"] is not None:
        parts.append(f"cache hit rate {summary['cache_hit_rate']:.2f}")
        backups = summary.get("backups") or {}
        if any(backups.values()):
            parts.append("backups " + ", ".join(f"{k} {v}" for k, v in backups.items() if v))
        if backend == "reference" and "overlapped_time_s" in summary:
            parts.append(f"overlapped {summary['overlapped_time_s']:.2f} s")
    parts.append(f"{summary['mode'].upper()}" + (f" K={summary['k']}" if summary["k"] else ""))
    where = f"target on {placement.target_devices()}"
    where += f", draft on {placement.draft}" if placement.draft else ", no draft"
    parts.append(where)
    return "[" + ", ".join(parts) + "]"


PARTS_IN_PARALLEL = ("glue", "tree")    # SSD: what the draft's GPU does during the verify


def chrome_trace(result, title: str) -> dict:
    """The rounds as a Chrome trace. The fast engine records each part's real span (profile=True):
    one track per thread (the main thread: lookup, backup, verify, waiting for the draft; the draft
    worker: glue pass and tree decode), so the overlap is what happened. The reference runs the parts
    one after the other: they are laid end to end on the track "as run", and for SSD a second track
    shows the draft's glue pass and tree decode starting with the verify, as they would on a second GPU."""
    if any(r.spans for r in result.rounds):
        return _measured_trace(result, title)
    us = 1e6
    events = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": title}},
              {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "as run (sequential)"}},
              {"name": "prefill", "ph": "X", "pid": 1, "tid": 1, "ts": 0.0,
               "dur": round(result.prefill_time * us, 3), "args": {}}]
    if result.mode == "ssd":
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": 2,
                       "args": {"name": "draft GPU (overlapped)"}})
    start = result.prefill_time
    for i, r in enumerate(result.rounds):
        info = {"round": i, "accepted": r.accepted}
        if r.hit is not None:
            info.update(hit=r.hit, backup=r.backup, fan_out=r.fan_out)
        t, verify_at = start, None
        for name, dur in r.times.items():
            if name == "round":
                continue
            if name == "verify":
                verify_at = t
            events.append({"name": name, "ph": "X", "pid": 1, "tid": 1, "ts": round(t * us, 3),
                           "dur": round(dur * us, 3), "args": info})
            t += dur
        if result.mode == "ssd" and verify_at is not None:
            u = verify_at
            for name in PARTS_IN_PARALLEL:
                if name in r.times:
                    events.append({"name": name, "ph": "X", "pid": 1, "tid": 2, "ts": round(u * us, 3),
                                   "dur": round(r.times[name] * us, 3), "args": info})
                    u += r.times[name]
        start += max(r.times.get("round", 0.0), t - start)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _measured_trace(result, title: str) -> dict:
    us = 1e6
    base = min(t0 for r in result.rounds for _, t0, _, _ in r.spans) - result.prefill_time
    tracks = {"round": 1, "main thread": 2, "draft worker": 3}
    events = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": title}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
               for name, tid in tracks.items()]
    events.append({"name": "prefill", "ph": "X", "pid": 1, "tid": 1, "ts": 0.0,
                   "dur": round(result.prefill_time * us, 3), "args": {}})
    for i, r in enumerate(result.rounds):
        info = {"round": i, "accepted": r.accepted}
        if r.hit is not None:
            info.update(hit=r.hit, backup=r.backup, fan_out=r.fan_out)
        for name, t0, t1, track in r.spans:
            events.append({"name": name if name != "round" else f"round {i}", "ph": "X", "pid": 1,
                           "tid": tracks.get(track, 4), "ts": round((t0 - base) * us, 3),
                           "dur": round((t1 - t0) * us, 3), "args": info})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


# ---------------------------------------------------------------------------------------------
# The two backends behind one interface
# ---------------------------------------------------------------------------------------------

class _Spec:
    """What ssd.make_request needs of a model: its config (checked before any weights load)."""

    def __init__(self, cfg):
        self.cfg = cfg


class Backend:
    def __init__(self, kind, target, draft, placement, args, log, max_seq=None, target_dir=None):
        self.kind, self.target, self.draft, self.placement = kind, target, draft, placement
        self.engine = None
        if kind == "fast":
            import ssd_fast
            kw = dict(device=placement.target, dtype=placement.dtype, cuda_graphs=not args.no_cuda_graphs, log=log,
                      concurrent={"auto": None, "on": True, "off": False}[args.concurrent],
                      linear=getattr(args, "linear", "auto"))
            if max_seq:
                kw["max_seq"] = max_seq
            if placement.draft and (placement.draft != placement.target or placement.tp > 1):
                kw["draft_device"] = placement.draft
            if placement.tp > 1:   # each worker process streams its own slices of the checkpoint (loader.py)
                kw["tp"] = placement.tp
            self.engine = ssd_fast.Engine(target, draft, **kw)

    def generate(self, prompts, **kw):
        if self.engine is not None:
            return self.engine.generate(prompts, **kw)
        import ssd
        kw.pop("profile", None)
        return ssd.generate(self.target, prompts, draft=self.draft, **kw)


def resolve_models(args, log):
    """(target dir, draft dir or None, description of the draft or None)."""
    import embedded
    if args.mode == "ar" and args.draft is not None:
        log("note: --mode ar runs the target alone; --draft is not used")
    if args.target is None:
        target_dir = embedded.ensure_target()
        if args.mode == "ar":
            return Path(target_dir), None, None
        if args.draft is not None:
            return Path(target_dir), Path(args.draft).expanduser(), None
        draft_dir, about = embedded.default_draft()
        log(f"draft: {about}")
        return Path(target_dir), Path(draft_dir), about
    target_dir = Path(args.target).expanduser()
    read_model_config(target_dir, "--target")     # a bad path is the first thing to say
    if args.draft is None and args.mode != "ar":
        raise UsageError(f"--mode {args.mode} needs a draft: pass --draft DIR (or --mode ar)")
    return target_dir, (Path(args.draft).expanduser() if args.mode != "ar" else None), None


def choose_context(args, backend, prompt_ids, target_cfg, draft_cfg, log) -> int:
    """Tokens per sequence the fast engine's caches hold: --max-context, else what these prompts need (the
    longest + --max-new-tokens + room for K), 4096 for --interactive; at most the models' context window."""
    window = min(target_cfg.max_position_embeddings, draft_cfg.max_position_embeddings if draft_cfg else 1 << 30)
    longest = max((len(p) for p in prompt_ids), default=0)
    asked = getattr(args, "max_context", None)
    if asked is not None:
        if asked > window:
            raise UsageError(f"--max-context {asked} is longer than the models' context window ({window} tokens): "
                             f"use --max-context {window} or less")
        k_room = args.k + 2 if args.mode != "ar" else 2
        if prompt_ids and longest + k_room > asked:
            raise UsageError(f"--max-context {asked} leaves no room for the longest prompt ({longest} tokens, plus "
                             f"{k_room} for the lookahead): use --max-context {longest + k_room + args.max_new_tokens} "
                             "or drop it")
        return asked
    if not prompt_ids:
        context = min(window, 4096)
        reason = "--interactive"
    else:
        context = min(window, longest + args.max_new_tokens + 2 * args.k + 8)
        reason = f"the longest prompt, {longest} tokens, + --max-new-tokens {args.max_new_tokens} + room for K"
    if backend == "fast":
        log(f"context: {context} tokens per sequence ({reason}"
            + (f"; the models allow {window}" if context < window else "") + "); --max-context N changes it")
    return context


def check_memory(args, placement, target_cfg, draft_cfg, dtype, batch, context, prompt_tokens, log, torch):
    """The loader's estimate against the GPUs' memory; a UsageError saying what to change when it does not fit."""
    from ssd_engine import loader
    first = torch.device(placement.target)
    devices = {first.index + r for r in range(placement.tp)}
    if placement.draft:
        devices.add(torch.device(placement.draft).index)
    free = torch.cuda.mem_get_info(first)[0]          # what other processes leave on the first GPU
    gpu = min([free] + [torch.cuda.get_device_properties(i).total_memory for i in devices - {first.index}])
    fan = args.fan_out if isinstance(args.fan_out, int) else None
    k = args.k if args.mode != "ar" else 0
    est = loader.estimate_memory(target_cfg, loader.dtype_bytes(dtype), placement.tp, batch, context, gpu,
                                 draft=draft_cfg if args.mode != "ar" else None,
                                 draft_shares=placement.draft == placement.target, k=k,
                                 prompt_tokens=prompt_tokens,
                                 branches=fan * (k + 1) if fan and args.mode == "ssd" else
                                 (None if args.mode == "ssd" else 0))
    if not est.fits:
        raise UsageError(est.message)
    log(est.message)


def open_checkpoints(target_dir, draft_dir, tok, startup):
    """loader.Checkpoint handles (headers only: no weights read) for the fast engine, and the draft's tokenizer
    checked against the target's (as ssd.load_pair does)."""
    from ssd_engine import loader
    target = loader.Checkpoint(target_dir, progress=startup.weights, name="target")
    draft = None
    if draft_dir is not None:
        draft = loader.Checkpoint(draft_dir, shared_embedding_from=target, progress=startup.weights, name="draft")
        same_dir = draft_dir.resolve() == target_dir.resolve()
        if not same_dir and any((draft_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            startup("draft tokenizer check")
            probe = "Speculative decoding, 1234 ünïcödé {code: [x]}"
            if load_tokenizer(draft_dir).encode(probe) != tok.encode(probe):
                raise ValueError("the draft's tokenizer differs from the target's: use a draft with the same "
                                 "vocabulary")
    return target, draft


def settle_auto_mode(args, on_gpu: bool, target_cfg, draft_cfg, batch: int, log, graphs: bool = True,
                     unusable: str | None = None) -> None:
    """--mode auto: SSD, SD or AR by ssd_fast.choose_mode's rule (from the configs, not timings); says which and why.
    SSD takes the K of ssd_fast.ssd_lookahead unless --k was given. `unusable`: why the given draft cannot
    speculate for this target (AR, said so)."""
    import ssd_fast
    k = 4 if args.k_auto else args.k
    if unusable is not None:
        draft_cfg = None
    mode, gain = ssd_fast.choose_mode(target_cfg, draft_cfg, k, batch, on_gpu, ssd_round=on_gpu and graphs)
    if mode == "ssd" and not getattr(args, "k_given", True):
        args.k = ssd_fast.ssd_lookahead(target_cfg, draft_cfg, batch, on_gpu)
    if unusable is not None:
        log(f"mode: ar (--mode auto: the draft cannot be used, {unusable}; --mode sd or ssd stops with this error)")
    elif gain is None:
        log("mode: ar (--mode auto: no draft given)")
    else:
        k = args.k if mode == "ssd" and not args.k_auto else k
        log(f"mode: {mode} (--mode auto: {mode.upper() if mode != 'ar' else 'SD'} predicted {gain:.2f}x AR here at "
            f"K={k}, acceptance 0.6; speculation needs {ssd_fast.SD_OVER_AR_MARGIN}x; SSD only for one row on a GPU; "
            "--mode ar|sd|ssd forces one)")
    args.mode = mode


def read_model_config(path: Path, flag: str):
    import ssd
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(f"{flag} {path} is a file, not a model checkpoint: pass the checkpoint's directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {path} does not exist: pass a Hugging Face checkpoint directory")
    config = ssd.read_config(path)
    try:
        return ssd.ModelConfig.from_dict(config)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'} has no {e.args[0]!r}: is it a Hugging Face model's "
                         "config.json?") from None
    except TypeError as e:
        raise ValueError(f"{path / 'config.json'} has a setting of the wrong type ({e})") from None


def load_tokenizer(directory: Path):
    """embedded.load_tokenizer, with an error that names the tokenizer file that is not JSON."""
    import embedded
    import ssd
    try:
        return embedded.load_tokenizer(directory)
    except ValueError:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (directory / name).is_file():
                ssd.read_json(directory / name)
        raise


# ---------------------------------------------------------------------------------------------
# run()
# ---------------------------------------------------------------------------------------------

def run(argv=None, backend: str = "fast") -> int:
    """The whole program; returns the exit status. Bad input: one line on stderr, status 2."""
    def log(*a):
        print(*a, file=sys.stderr, flush=True)
    try:
        args = build_parser(backend).parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:       # --help
        return int(e.code or 0)
    except UsageError as e:
        log(f"error: {e}")
        return 2
    device = "cpu"
    try:
        import torch
        check_args(args)
        # --mode auto settles on SD or AR once the configs are read (_main); until then it is SD, or AR when
        # no draft is given for a checkpoint of the user's (nothing to speculate with).
        args.mode_auto = args.mode == "auto"
        if args.mode_auto:
            args.mode = "ar" if args.target is not None and args.draft is None else "sd"
        if args.k_auto and backend == "reference":
            raise UsageError("--k auto measures the fast engine's step times: use ssd_fast.py, or give --k N")
        placement = choose_devices(args, backend, torch)
        device = placement.target
        if device == "cpu":
            torch.set_num_threads(cpu_threads(args.threads, torch))
        return _main(args, backend, placement, log)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    except BrokenPipeError:        # e.g. piped into `head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        log(f"error: out of memory on {device}: try --dtype bfloat16, a smaller --max-new-tokens or fewer "
            f"prompts, or --device cpu")
        return 3


def cpu_threads(requested, torch) -> int:
    """--threads, else $OMP_NUM_THREADS (torch already follows it), else half the usable cores, at most 4: decoding
    a batch of one is a chain of small products that gains little from more threads, and threads that find no
    idle core wait on each other (measured on a busy 2-core machine, the embedded pair: 1 thread 2.0-2.5 s of
    decoding, 2 threads 15-20 s)."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2, torch.get_num_threads()))


def _is_oom(e: BaseException) -> bool:
    import torch
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _main(args, backend, placement, log) -> int:
    import ssd
    import torch

    prompts_text = list(args.prompt) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if placement.note:
        log(placement.note)
    if args.no_cuda_graphs and backend == "reference":
        log("note: --no-cuda-graphs: the reference never uses CUDA graphs (nothing to turn off)")

    # Preflight: configs, tokenizer, prompts and the whole request, before any weights are read.
    target_dir, draft_dir, about = resolve_models(args, log)
    target_cfg = read_model_config(target_dir, "--target")
    draft_cfg = read_model_config(draft_dir, "--draft") if draft_dir else None
    if getattr(args, "mode_auto", False):
        # SSD's round as one CUDA graph: CUDA graphs on, the target on one GPU, the draft sharing it
        one_graph = not args.no_cuda_graphs and placement.tp == 1 and placement.draft in (None, placement.target)
        unusable = None
        if draft_cfg is not None:       # a draft of another vocabulary cannot speculate: AR, and say why
            try:
                ssd.check_compatible(_Spec(target_cfg), _Spec(draft_cfg))
            except ValueError as e:
                unusable = str(e)
        settle_auto_mode(args, placement.target != "cpu", target_cfg, draft_cfg, max(1, len(prompts_text)), log,
                         graphs=one_graph, unusable=unusable)
        if args.mode == "ar":
            draft_dir, draft_cfg, placement = None, None, dataclasses.replace(placement, draft=None)
    spec_t, spec_d = _Spec(target_cfg), (_Spec(draft_cfg) if draft_cfg else None)
    if spec_d is not None:
        ssd.check_compatible(spec_t, spec_d)
    tok = load_tokenizer(target_dir)
    # The front door talks to instruct models the way they were trained (their chat template); the
    # reference, a lesson in decoding, continues the raw text unless asked.
    chat = (tok.has_chat_template and (backend == "fast" or args.interactive)) if args.chat is None else args.chat
    if chat and not tok.has_chat_template:
        raise UsageError(f"--chat: the target's tokenizer ({target_dir}) has no chat template: drop --chat")

    def encode(text):
        return tok.apply_chat_template([{"role": "user", "content": text}]) if chat else tok.encode(text)
    prompt_ids = [encode(p) for p in prompts_text]
    settings = dict(mode=args.mode, k=args.k, temperature=args.temperature, draft_temperature=args.draft_temperature,
                    top_k=args.top_k, top_p=args.top_p, fan_out=args.fan_out, saguaro_c=args.saguaro_c,
                    backup=args.backup, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if prompt_ids:
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise UsageError(f"prompt {i + 1} encodes to no tokens: give some text")
        ssd.make_request(spec_t, prompt_ids, spec_d, **settings)
    max_seq = choose_context(args, backend, prompt_ids, target_cfg, draft_cfg, log)
    on_gpu = placement.target != "cpu"
    if backend == "fast" and on_gpu:      # will it fit? From the configs, before any weight is read
        dtype = placement.dtype or torch.bfloat16
        check_memory(args, placement, target_cfg, draft_cfg, dtype, max(1, len(prompt_ids)), max_seq,
                     max((len(p) for p in prompt_ids), default=max_seq), log, torch)

    # Load: weights, device, CUDA graphs.
    if on_gpu:
        torch.cuda.set_device(torch.device(placement.target))
    warm_up = backend == "fast" and on_gpu and not args.no_cuda_graphs
    stages = 1 + (draft_dir is not None and backend == "reference") + warm_up
    if draft_dir is not None and draft_dir.resolve() != target_dir.resolve() and any(
            (draft_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        stages += 1
    startup = Startup(stages, log)
    try:
        if backend == "fast":     # streamed from disk to the device in the engine's dtype (loader.py)
            target, draft = open_checkpoints(target_dir, draft_dir, tok, startup)
            startup(f"weights to {placement.target_devices()}")
        t_load = time.perf_counter()
        if backend == "reference":
            target, draft, _, _ = ssd.load_pair(str(target_dir), str(draft_dir) if draft_dir else None, args.mode,
                                                dtype=placement.dtype, device="cpu", log=startup.log,
                                                progress=startup, tokenizer=tok)
        engine = Backend(backend, target, draft, placement, args, startup.log, max_seq=max_seq, target_dir=target_dir)
        load = {"seconds": round(time.perf_counter() - t_load, 3)}
        if backend == "fast":
            load.update(target=target.loads, draft=draft.loads if draft is not None else [])
        if args.k_auto and args.mode != "ar":
            k, budget, table = engine.engine.choose_lookahead(max(1, len(prompt_ids)), args.mode, k_max=K_AUTO_MAX)
            args.k = settings["k"] = k
            if args.mode == "ssd" and args.fan_out == "auto":
                eng = engine.engine
                if eng.worker is not None and eng.on_gpu:   # the draft side overlaps: time the real one
                    budget = eng.fit_budget(max(1, len(prompt_ids)), k, args.saguaro_c)
                settings["fan_out_budget"] = budget
            row = table[k - 1]
            startup.log(f"--k auto: K={k}" + (f", speculation budget {budget}" if args.mode == "ssd" else "")
                        + f" (verify {row['verify_ms']:.2f} ms, drafting {row['draft_ms']:.2f} ms"
                        + (", hidden behind the verify)" if row["hidden"] else ", the target waits)"))
        if warm_up:
            startup("capturing CUDA graphs")
            warm = prompt_ids or [tok.encode("Hello")]
            engine.generate(warm, **{**settings, "max_new_tokens": min(args.max_new_tokens, 4 * (args.k + 1))})
        dtype = placement.dtype or (engine.engine.dtype if engine.engine is not None else torch.float32)
        startup.finish(f"{PROGRAMS[backend]}: target {target_dir.name}"
                       + (f", draft {draft_dir.name}" if draft_dir else "")
                       + f", {str(dtype).removeprefix('torch.')}, mode {args.mode}"
                       + (f" K={args.k}" if args.mode != "ar" else "") + ", chat template " + ("on" if chat else "off")
                       + f"; weights loaded in {load['seconds']:.1f} s; ready")
    finally:
        startup.close()
    # EOS: the config's and generation_config's (load_model merges them) and the tokenizer's.
    eos = set(target.cfg.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    settings["eos_token_id"] = sorted(eos)

    models = {"target": str(target_dir), "draft": str(draft_dir) if draft_dir else None,
              "draft_about": about or (draft_dir.name if draft_dir else None)}
    devices = {"target": placement.target, "draft": placement.draft}
    if placement.tp > 1:
        devices["tp"] = placement.tp
    if args.interactive:
        return interactive(args, backend, engine, tok, chat, eos, settings, placement, log)

    # Generate.
    stops = list(args.stop)
    single = len(prompt_ids) == 1 and not args.json
    streamer = Streamer(tok, eos, stops, write_out) if single else None
    stopped = set()

    def on_round(tokens, stats):
        if streamer is not None:
            return [0] if streamer.update(tokens[0]) else None
        if not stops:
            return None
        rows = [b for b, ids in enumerate(tokens) if b not in stopped and visible(tok, ids, eos, stops)[2]]
        stopped.update(rows)
        return rows
    if single and not chat:
        write_out(prompts_text[0])
    result = engine.generate(prompt_ids, **settings, on_round=on_round if (streamer or stops) else None,
                             profile=bool(args.profile))
    rows = [visible(tok, ids, eos, stops) for ids in result.tokens]
    texts = [text for text, _, _ in rows]
    token_ids = [ids for _, ids, _ in rows]
    reasons = ["stop" if hit and reason != "interrupted" else reason
               for (_, _, hit), reason in zip(rows, result.finish_reasons)]
    summary = result.summary()
    decode_s = decode_seconds(result)
    summary.update(load_s=load["seconds"], decode_s=round(decode_s, 6),
                   tokens_per_s=round(summary["generated_tokens"] / decode_s, 3) if decode_s > 0 else None)
    if args.profile:
        Path(args.profile).expanduser().write_text(json.dumps(chrome_trace(
            result, f"{PROGRAMS[backend]} {args.mode}" + (f" K={args.k}" if args.mode != "ar" else ""))))
        log(f"timeline written to {args.profile}: open it in chrome://tracing or https://ui.perfetto.dev")
    if args.json:
        print(json.dumps({"prompts": prompts_text, "prompt_ids": prompt_ids, "token_ids": token_ids, "text": texts,
                          "finish_reasons": reasons, "stats": summary,
                          "rounds": [dataclasses.asdict(r) for r in result.rounds], "devices": devices,
                          "models": models, "backend": backend, "chat": chat, "load": load,
                          "max_context": max_seq if backend == "fast" else None,
                          "settings": settings}))
    elif single:
        streamer.finish(texts[0])
        write_out("\n" + summary_line(summary, decode_s, placement, backend) + "\n")
    else:
        for i, (p, text) in enumerate(zip(prompts_text, texts)):
            head = p.splitlines()[0] if p.strip() else p
            head = head if len(head) <= 60 else head[:57] + "..."
            write_out(f"--- [{i + 1}/{len(texts)}] {head} ---\n{'' if chat else p}{text}\n")
        write_out(summary_line(summary, decode_s, placement, backend) + "\n")
    if "interrupted" in reasons:
        log("interrupted: the text above is what was generated")
        return 130
    return 0


def interactive(args, backend, engine, tok, chat, eos, settings, placement, log) -> int:
    """A chat loop: each user line is a turn; the conversation goes through the chat template every
    turn (without a template, each line continues the text so far). Replies stream; Ctrl-C stops a
    reply (it is kept), /reset forgets the conversation, /exit or the end of input quits."""
    tty = sys.stdin.isatty()
    if tty:
        log("chat: type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits, "
            "Ctrl-C stops a reply")
    history, transcript = [], ""
    while True:
        try:
            line = input("> ") if tty else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):   # Ctrl-D / Ctrl-C at the prompt: quit
            log("")
            return 0
        if line == "":                          # end of piped input
            return 0
        line = line.rstrip("\r\n")
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history, transcript = [], ""
            log("(conversation forgotten)")
            continue
        if not command:
            continue
        if chat:
            ids = tok.apply_chat_template(history + [{"role": "user", "content": line}])
        else:
            ids = tok.encode(transcript + ("\n" if transcript else "") + line)
        streamer = Streamer(tok, eos, args.stop, write_out)
        try:
            result = engine.generate([ids], **settings, on_round=lambda tokens, stats: [0] if streamer.update(
                tokens[0]) else None)
        except ValueError as e:
            log(f"error: {e}" + ("; /reset starts a new conversation" if "context window" in str(e) else ""))
            continue
        text, _, _ = visible(tok, result.tokens[0], eos, args.stop)
        streamer.finish(text)
        write_out("\n")
        summary = result.summary()
        log(summary_line(summary, decode_seconds(result), placement, backend))
        if result.finish_reasons[0] == "interrupted":
            log("(reply interrupted)")
        if chat:
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]
        else:
            transcript += ("\n" if transcript else "") + line + text
