"""From flags to a warm engine: what the command line (cli.py) and the server (server.py) both do before they
decode, written once.

  1. `place`: the devices (`--device`, `--gpus`, `--tp`) and the CPU threads;
  2. `boot`: resolve the models (the embedded SmolLM2 pair by default); preflight: read both configs and the
     tokenizer, encode the prompts and validate the whole request with ssd.make_request, so an unsupported
     architecture, a draft of another vocabulary or a prompt longer than the context window is reported before
     any weights are read; settle `--mode auto`; size the context and check it fits the GPU; stream the weights
     to the device (a progress bar on a terminal); build the Engine; resolve `--k auto`; on a GPU capture the
     CUDA graphs with a short warm-up.

Bad input raises UsageError (or ValueError, FileNotFoundError): the caller prints it as one line, exit status 2.
`load_pair` is the Python API's loader (ssd.load_model on the CPU; re-exported as ssd_fast.load_pair).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace   # what ssd.make_request reads of a model, before any weights load: its config

# torch, ssd and the engine are imported where they are used, so that --help and a bad flag answer at once


class UsageError(ValueError):
    """A bad flag: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Devices and threads
# ---------------------------------------------------------------------------------------------

def place(args, torch) -> "Placement":
    """The devices for these flags, and the CPU threads when the target runs on the CPU. `--mode auto` is
    settled once the configs are read (boot); until then it is SD, or AR when a checkpoint of the user's comes
    without a draft (nothing to speculate with)."""
    args.mode_auto = args.mode == "auto"
    if args.mode_auto:
        args.mode = "ar" if args.target is not None and args.draft is None else "sd"
    placement = choose_devices(args, torch)
    if placement.target == "cpu":
        torch.set_num_threads(cpu_threads(args.threads, torch))
    return placement


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


def choose_devices(args, torch) -> Placement:
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
    if device is None:   # a GPU when there is one
        device = "cuda" if count else "cpu"
    if device == "cuda":
        device = "cuda:0"
    on_gpu = device != "cpu"
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
    draft, note = device, None
    if args.mode != "ar" and on_gpu:
        if gpus >= 2:
            draft = f"cuda:{first + 1}"
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
# Models, context, memory
# ---------------------------------------------------------------------------------------------

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


def choose_context(args, prompt_ids, target_cfg, draft_cfg, log) -> int:
    """Tokens per sequence the engine's caches hold: --max-context, else what these prompts need (the
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
    checked against the target's (as load_pair does)."""
    from ssd_engine import loader
    target = loader.Checkpoint(target_dir, progress=startup.weights, name="target")
    draft = None
    if draft_dir is not None:
        draft = loader.Checkpoint(draft_dir, shared_embedding_from=target, progress=startup.weights, name="draft")
        same_dir = draft_dir.resolve() == target_dir.resolve()
        if not same_dir and any((draft_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            startup("draft tokenizer check")
            if not same_tokenizer(load_tokenizer(draft_dir), tok):
                raise ValueError("the draft's tokenizer differs from the target's: use a draft with the same "
                                 "vocabulary")
    return target, draft


def settle_auto_mode(args, on_gpu: bool, target_cfg, draft_cfg, batch: int, log, graphs: bool = True,
                     unusable: str | None = None) -> None:
    """--mode auto: SSD, SD or AR by policy.choose_mode's rule (from the configs, not timings); says which and why.
    SSD takes the K of policy.ssd_lookahead unless --k was given. `unusable`: why the given draft cannot
    speculate for this target (AR, said so)."""
    from ssd_engine import policy
    k = 4 if args.k_auto else args.k
    if unusable is not None:
        draft_cfg = None
    mode, gain = policy.choose_mode(target_cfg, draft_cfg, k, batch, on_gpu, ssd_round=on_gpu and graphs)
    if mode == "ssd" and not getattr(args, "k_given", True):
        args.k = policy.ssd_lookahead(target_cfg, draft_cfg, batch, on_gpu)
    if unusable is not None:
        log(f"mode: ar (--mode auto: the draft cannot be used, {unusable}; --mode sd or ssd stops with this error)")
    elif gain is None:
        log("mode: ar (--mode auto: no draft given)")
    else:
        k = args.k if mode == "ssd" and not args.k_auto else k
        log(f"mode: {mode} (--mode auto: {mode.upper() if mode != 'ar' else 'SD'} predicted {gain:.2f}x AR here at "
            f"K={k}, acceptance 0.6; speculation needs {policy.SD_OVER_AR_MARGIN}x; SSD only for one row on a GPU; "
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
# boot: flags -> a warm engine
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Boot:
    """A warm engine and what the caller needs to talk to it."""
    engine: object               # ssd_engine.engine.Engine
    tok: object                  # the target's tokenizer
    placement: Placement
    target_dir: Path
    draft_dir: Path | None
    about: str | None            # the embedded draft's description, when it is the default
    chat: bool                   # prompts go through the target's chat template
    prompts: list                # the prompts' text, and their token ids
    prompt_ids: list
    settings: dict               # generate's keywords, eos_token_id included
    eos: list
    max_seq: int
    load: dict                   # {"seconds": ..., "target": [...], "draft": [...]}: what loading took


def boot(args, placement, log, prompts=(), rows=None, context=choose_context, warm_rows=None, warm=None,
         ready=None) -> Boot:
    """Preflight, load, build the engine, resolve --k auto and warm it up; `log` says each step on stderr.
    `prompts`: their text (none for --interactive and the server). `rows`: the batch the engine is sized and
    --mode auto / --k auto are chosen for (default: the prompts'). `context(args, prompt_ids, target_cfg,
    draft_cfg, log)` gives the tokens per sequence. The warm-up on a GPU (CUDA graphs) decodes the prompts, or
    "Hello" in a batch of each of `warm_rows`, with the settings updated by `warm`. `ready(args, boot)`: the last
    start-up line (default ready_line)."""
    import torch
    rows = rows or max(1, len(prompts))
    if placement.note:
        log(placement.note)
    target_dir, draft_dir, about = resolve_models(args, log)
    target_cfg = read_model_config(target_dir, "--target")
    draft_cfg = read_model_config(draft_dir, "--draft") if draft_dir else None
    if getattr(args, "mode_auto", False):
        draft_cfg, placement = _settle_mode(args, placement, target_cfg, draft_cfg, rows, log)
        draft_dir = draft_dir if draft_cfg is not None else None
    tok, chat, prompt_ids, settings = _preflight(args, target_dir, target_cfg, draft_cfg, prompts)
    max_seq = context(args, prompt_ids, target_cfg, draft_cfg, log)
    on_gpu = placement.target != "cpu"
    if on_gpu:      # will it fit? From the configs, before any weight is read
        check_memory(args, placement, target_cfg, draft_cfg, placement.dtype or torch.bfloat16, rows, max_seq,
                     max((len(p) for p in prompt_ids), default=max_seq), log, torch)
        torch.cuda.set_device(torch.device(placement.target))
    warm_up = on_gpu and not args.no_cuda_graphs
    stages = 1 + warm_up + (draft_dir is not None and draft_dir.resolve() != target_dir.resolve() and any(
        (draft_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")))
    startup = Startup(stages, log)
    try:      # the weights stream from disk to the device in the engine's dtype (loader.py)
        target, draft = open_checkpoints(target_dir, draft_dir, tok, startup)
        startup(f"weights to {placement.target_devices()}")
        t_load = time.perf_counter()
        engine = build_engine(target, draft, placement, args, startup.log, max_seq)
        if args.k_auto and args.mode != "ar":
            _resolve_k_auto(args, engine, rows, settings, startup.log)
        load = {"seconds": round(time.perf_counter() - t_load, 3), "target": target.loads,
                "draft": draft.loads if draft is not None else []}
        if warm_up:
            startup("capturing CUDA graphs")
            hello = [tok.encode("Hello")]
            batches = [hello * n for n in warm_rows] if warm_rows else [prompt_ids or hello]
            for batch in batches:
                engine.generate(batch, **{**settings, "max_new_tokens": min(args.max_new_tokens, 4 * (args.k + 1)),
                                          **(warm or {})})
        # EOS: the config's and generation_config's (the loader merges them) and the tokenizer's.
        eos = sorted(set(target.cfg.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
        booted = Boot(engine=engine, tok=tok, placement=placement, target_dir=target_dir, draft_dir=draft_dir,
                      about=about, chat=chat, prompts=list(prompts), prompt_ids=prompt_ids,
                      settings={**settings, "eos_token_id": eos}, eos=eos, max_seq=max_seq, load=load)
        startup.finish((ready or ready_line)(args, booted))
    finally:
        startup.close()
    return booted


def ready_line(args, b: Boot) -> str:
    """The command line's last start-up line: what runs where, and how long loading took."""
    dtype = b.placement.dtype or b.engine.dtype
    return (f"ssd_fast.py: target {b.target_dir.name}" + (f", draft {b.draft_dir.name}" if b.draft_dir else "")
            + f", {str(dtype).removeprefix('torch.')}, mode {args.mode}" + (f" K={args.k}" if args.mode != "ar" else "")
            + ", chat template " + ("on" if b.chat else "off")
            + f"; weights loaded in {b.load['seconds']:.1f} s; ready")


def _settle_mode(args, placement, target_cfg, draft_cfg, rows, log):
    """--mode auto from the configs: (the draft's config or None for AR, the placement)."""
    import ssd
    # SSD's round as one CUDA graph: CUDA graphs on, the target on one GPU, the draft sharing it
    one_graph = not args.no_cuda_graphs and placement.tp == 1 and placement.draft in (None, placement.target)
    unusable = None
    if draft_cfg is not None:       # a draft of another vocabulary cannot speculate: AR, and say why
        try:
            ssd.check_compatible(SimpleNamespace(cfg=target_cfg), SimpleNamespace(cfg=draft_cfg))
        except ValueError as e:
            unusable = str(e)
    settle_auto_mode(args, placement.target != "cpu", target_cfg, draft_cfg, rows, log, graphs=one_graph,
                     unusable=unusable)
    if args.mode == "ar":
        return None, dataclasses.replace(placement, draft=None)
    return draft_cfg, placement


def _preflight(args, target_dir, target_cfg, draft_cfg, prompts):
    """The tokenizer, the chat choice, the prompts' ids and generate's settings, the whole request checked by
    ssd.make_request before any weights are read."""
    import ssd
    spec_t, spec_d = SimpleNamespace(cfg=target_cfg), (SimpleNamespace(cfg=draft_cfg) if draft_cfg else None)
    if spec_d is not None:
        ssd.check_compatible(spec_t, spec_d)
    tok = load_tokenizer(target_dir)
    # instruct models are talked to the way they were trained: through their chat template, unless asked
    chat = tok.has_chat_template if args.chat is None else args.chat
    if chat and not tok.has_chat_template:
        raise UsageError(f"--chat: the target's tokenizer ({target_dir}) has no chat template: drop --chat")

    def encode(text):
        return tok.apply_chat_template([{"role": "user", "content": text}]) if chat else tok.encode(text)
    prompt_ids = [encode(p) for p in prompts]
    settings = dict(mode=args.mode, k=args.k, temperature=args.temperature,
                    draft_temperature=getattr(args, "draft_temperature", None), top_k=args.top_k, top_p=args.top_p,
                    fan_out=args.fan_out, saguaro_c=args.saguaro_c, backup=args.backup,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise UsageError(f"prompt {i + 1} encodes to no tokens: give some text")
    if prompt_ids:
        ssd.make_request(spec_t, prompt_ids, spec_d, **settings)
    return tok, chat, prompt_ids, settings


def build_engine(target, draft, placement, args, log, max_seq):
    """The Engine on the placement's devices, with the flags' engine options."""
    from ssd_engine.engine import Engine
    kw = dict(device=placement.target, dtype=placement.dtype, cuda_graphs=not args.no_cuda_graphs, log=log,
              concurrent={"auto": None, "on": True, "off": False}[args.concurrent],
              linear=getattr(args, "linear", "auto"), max_seq=max_seq)
    if placement.draft and (placement.draft != placement.target or placement.tp > 1):
        kw["draft_device"] = placement.draft
    if placement.tp > 1:   # each worker process streams its own slices of the checkpoint (loader.py)
        kw["tp"] = placement.tp
    return Engine(target, draft, **kw)


def _resolve_k_auto(args, engine, rows, settings, log):
    """--k auto: the Engine measures (resolve_k_auto, the one place K is chosen); the flags and settings take it."""
    import ssd
    s, line = engine.resolve_k_auto(rows, ssd.Settings(**{**settings, "k": "auto", "seed": settings["seed"] or 0}))
    args.k = settings["k"] = s.k
    if s.fan_out_budget is not None:
        settings["fan_out_budget"] = s.fan_out_budget
    if line:
        log(line)


# ---------------------------------------------------------------------------------------------
# The Python API's loader
# ---------------------------------------------------------------------------------------------

def load_pair(target_dir=None, draft_dir=None, mode="ssd", dtype=None, device="cpu", log=print, progress=None,
              tokenizer=None):
    """Target, draft (None in AR mode), tokenizer and the target's directory, loaded by ssd.load_model (float32 on
    the CPU by default); the embedded SmolLM2 pair by default. `progress(stage)` (optional) is called as each
    stage of the loading starts; pass the target's `tokenizer` if you have loaded it already."""
    import embedded
    import ssd
    import torch
    dtype = dtype or torch.float32
    step = progress or (lambda stage: None)
    if target_dir is None:
        target_dir = embedded.ensure_target()
        if draft_dir is None and mode != "ar":
            draft_dir, about = embedded.default_draft()
            log(f"draft: {about}")
    elif draft_dir is None and mode != "ar":
        raise ValueError(f"--mode {mode} needs a draft: pass --draft DIR (or --mode ar)")
    step("target weights")
    target = ssd.load_model(target_dir, dtype, device)
    if tokenizer is None:
        step("tokenizer")
        tokenizer = embedded.load_tokenizer(target_dir)
    draft = None
    if mode != "ar":
        step("draft weights")
        draft_path = Path(draft_dir).expanduser()
        draft_cfg = ssd.read_config(draft_path) if draft_path.is_dir() else {}
        shared = target.model.embed_tokens.weight if draft_cfg.get("ssd_shared_embedding") else None
        draft = ssd.load_model(draft_dir, dtype, device, shared_embedding=shared)
        ssd.check_compatible(target, draft)
        same_dir = draft_path.resolve() == Path(target_dir).expanduser().resolve()
        if not same_dir and any((draft_path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            step("draft tokenizer check")
            if not same_tokenizer(embedded.load_tokenizer(draft_dir), tokenizer):
                raise ValueError("the draft's tokenizer differs from the target's: use a draft with the same "
                                 "vocabulary")
    return target, draft, tokenizer, Path(target_dir)


def same_tokenizer(a, b) -> bool:
    probe = "Speculative decoding, 1234 ünïcödé {code: [x]}"
    return a.encode(probe) == b.encode(probe)
