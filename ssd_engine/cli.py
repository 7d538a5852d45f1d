"""The command line of the fast engine (ssd_fast.py; the reference ssd.py has a small one of its own).

    python ssd_fast.py --prompt "The capital of France is"

What the program does, in order:

  1. check every flag (a bad one is one line `error: ...`, exit status 2, before anything loads);
  2. bootstrap.py: choose devices (`--device`, `--gpus`, `--tp`), resolve the models (the embedded SmolLM2 pair by
     default), preflight the request (configs, tokenizer, prompts) before any weights are read, load the weights
     (a progress bar with elapsed time on a terminal) and on a GPU capture the CUDA graphs with a short warm-up;
  3. generate: one prompt streams its text as rounds are accepted; several print one after another;
     `--json` prints one object; `--interactive` is a chat loop. A one-line summary follows (report.py).

Stdout carries the output: the generated text (after the prompt itself with --no-chat) and the summary
line; the JSON object alone with --json; the replies with --interactive (their summary lines go to stderr).
Progress, notes and errors go to stderr. Exit status: 0 done, 2 bad input, 3 out of memory, 130 interrupted (Ctrl-C;
what was generated is printed first).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ssd_engine import bootstrap
from ssd_engine.bootstrap import UsageError
from ssd_engine.report import Streamer, chrome_trace, decode_seconds, json_object, summary_line, visible, write_out

DESCRIPTION = ("AR, SD and SSD (Saguaro) decoding with the fast engine (ssd_fast.py: Triton kernels and CUDA "
               "graphs on a GPU, the same algorithm with PyTorch ops on a CPU).")
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

serving: %(prog)s --serve runs the OpenAI-compatible HTTP server (server.py) with the model, mode, device and
  decoding flags above; %(prog)s --serve --help lists its own flags (--host, --port, --max-batch, ...).

exit status: 0 done, 2 bad input, 3 out of memory, 130 interrupted (what was generated is printed first)."""
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


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ssd_fast.py", description=DESCRIPTION, epilog=EPILOG,
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
                      help="wrap each prompt in the target's chat template. This is the default when the target's "
                           "tokenizer has one (instruct models such as the embedded SmolLM2-135M-Instruct do)")
    chat.add_argument("--no-chat", dest="chat", action="store_false",
                      help="send the prompt text as it is (and echo it before the continuation)")

    g = ap.add_argument_group("models and devices")
    g.add_argument("--target", metavar="DIR",
                   help="target checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--draft", metavar="DIR",
                   help="draft checkpoint directory, same vocabulary as the target (default with the embedded "
                        "target: its distilled draft)")
    g.add_argument("--device", metavar="cpu|cuda|cuda:N",
                   help="where the target runs (default: cuda if a GPU is visible, else cpu)")
    g.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs to use from --device on: 1 = target and draft share a GPU, 2 = the draft gets its "
                        "own GPU (what SSD's overlap needs). Default: 2 for --mode ssd when a second GPU is visible "
                        "(the draft's side then runs during the verify), else 1")
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
                   help="run the engine's steps eagerly (slower; for debugging)")
    g.add_argument("--concurrent", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="SSD: run the draft's glue pass and tree decode while the target verifies: "
                        "on one GPU on a second CUDA stream inside the round's CUDA graph, with the draft on its own "
                        "GPU (--gpus 2) on a worker thread. auto (default): on where CUDA graphs run or the draft has "
                        "its own GPU; off: one part after the other (always so on a CPU)")

    g = ap.add_argument_group("decoding")
    g.add_argument("--mode", choices=["auto", "ar", "sd", "ssd"], default="auto",
                   help="ar = target alone, sd = speculative decoding, ssd = speculative speculative decoding; "
                        "auto (default) = ssd, sd or ar, whichever the models' sizes on this device say is "
                        "faster (said on stderr): ssd for one prompt on a GPU with CUDA graphs, where it measured "
                        "fastest (BENCHMARKS.md)")
    g.add_argument("--k", type=_k_flag, default=None, metavar="K|auto",
                   help="lookahead: draft tokens per round (default 4; when --mode auto picks SSD, the largest K <= 4 "
                        "whose draft side the models' sizes say hides under the verify); 'auto' measures the models' "
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
# run()
# ---------------------------------------------------------------------------------------------

def run(argv=None) -> int:
    """The whole program; returns the exit status. Bad input: one line on stderr, status 2."""
    def log(*a):
        print(*a, file=sys.stderr, flush=True)
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:       # --help
        return int(e.code or 0)
    except UsageError as e:
        log(f"error: {e}")
        return 2
    device = "cpu"
    try:
        import torch
        check_args(args)
        placement = bootstrap.place(args, torch)
        device = placement.target
        return _main(args, placement, log)
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


def _is_oom(e: BaseException) -> bool:
    import torch
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _main(args, placement, log) -> int:
    prompts = list(args.prompt) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    boot = bootstrap.boot(args, placement, log, prompts)
    if args.interactive:
        return interactive(args, boot, log)
    tok, eos, stops, settings = boot.tok, boot.eos, list(args.stop), boot.settings
    single = len(prompts) == 1 and not args.json
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
    if single and not boot.chat:
        write_out(prompts[0])
    result = boot.engine.generate(boot.prompt_ids, **settings, on_round=on_round if (streamer or stops) else None,
                                  profile=bool(args.profile))
    rows = [visible(tok, ids, eos, stops) for ids in result.tokens]
    texts = [text for text, _, _ in rows]
    reasons = ["stop" if hit and reason != "interrupted" else reason
               for (_, _, hit), reason in zip(rows, result.finish_reasons)]
    summary = result.summary()
    decode_s = decode_seconds(result)
    summary.update(load_s=boot.load["seconds"], decode_s=round(decode_s, 6),
                   tokens_per_s=round(summary["generated_tokens"] / decode_s, 3) if decode_s > 0 else None)
    if args.profile:
        Path(args.profile).expanduser().write_text(json.dumps(chrome_trace(
            result, f"ssd_fast.py {args.mode}" + (f" K={args.k}" if args.mode != "ar" else ""))))
        log(f"timeline written to {args.profile}: open it in chrome://tracing or https://ui.perfetto.dev")
    if args.json:
        print(json.dumps(json_object(boot, result, [ids for _, ids, _ in rows], texts, reasons, summary)))
    elif single:
        streamer.finish(texts[0])
        write_out("\n" + summary_line(summary, decode_s, boot.placement) + "\n")
    else:
        for i, (p, text) in enumerate(zip(prompts, texts)):
            head = p.splitlines()[0] if p.strip() else p
            head = head if len(head) <= 60 else head[:57] + "..."
            write_out(f"--- [{i + 1}/{len(texts)}] {head} ---\n{'' if boot.chat else p}{text}\n")
        write_out(summary_line(summary, decode_s, boot.placement) + "\n")
    if "interrupted" in reasons:
        log("interrupted: the text above is what was generated")
        return 130
    return 0

def interactive(args, boot, log) -> int:
    """A chat loop: each user line is a turn; the conversation goes through the chat template every
    turn (without a template, each line continues the text so far). Replies stream; Ctrl-C stops a
    reply (it is kept), /reset forgets the conversation, /exit or the end of input quits."""
    engine, tok, chat, eos, settings = boot.engine, boot.tok, boot.chat, boot.eos, boot.settings
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
        log(summary_line(summary, decode_seconds(result), boot.placement))
        if result.finish_reasons[0] == "interrupted":
            log("(reply interrupted)")
        if chat:
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]
        else:
            transcript += ("\n" if transcript else "") + line + text
