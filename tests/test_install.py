"""A fresh install works with whatever the requirements resolve to today: none of our module names hides an
installed package (transformers 5.25 began to import Hugging Face's `kernels`, which our old `kernels.py`
shadowed), and transformers still loads models and tokenizers after every one of our modules is imported."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def our_import_names() -> dict:
    """Import name -> file, for every module or package that an entry point puts first on sys.path: the
    repository root (`python ssd_fast.py`, the tests) and scripts/ (`python scripts/bench.py`). A folder without
    __init__.py is at most a namespace portion, which an installed package of that name overrides."""
    names = {}
    for folder in (ROOT, ROOT / "scripts"):
        for path in folder.iterdir():
            if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").is_file()):
                names[path.stem] = path.relative_to(ROOT)
    return names


def clashes(ours: dict, installed: dict) -> list:
    return sorted(f"{file} shadows {', '.join(installed[name])}" for name, file in ours.items() if name in installed)


def test_no_module_has_the_import_name_of_an_installed_distribution():
    found = clashes(our_import_names(), importlib.metadata.packages_distributions())
    assert not found, f"rename these modules: {found}"


def test_the_clash_check_can_fail():
    """The old name is reported against a distribution that provides it (installed or not here)."""
    assert clashes({"kernels": Path("kernels.py")}, {"kernels": ["kernels"]}) == ["kernels.py shadows kernels"]


def test_transformers_loads_a_model_and_a_tokenizer_after_our_modules(tmp_path):
    """In a fresh interpreter started from the repository root (as `python ssd_fast.py` is), import every one of
    our modules first, then let transformers import what it imports (its hub-kernels integration among them),
    save and reload a tiny model and load the shipped draft's tokenizer."""
    modules = sorted(p.stem for p in ROOT.glob("*.py"))
    code = "\n".join([
        *(f"import {m}" for m in modules),
        "import transformers, transformers.integrations.hub_kernels",
        "from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM",
        "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,",
        "                  num_attention_heads=2, num_key_value_heads=1)",
        f"LlamaForCausalLM(cfg).save_pretrained({str(tmp_path / 'm')!r})",
        f"model = LlamaForCausalLM.from_pretrained({str(tmp_path / 'm')!r})",
        f"tok = AutoTokenizer.from_pretrained({str(ROOT / 'models' / 'smollm2-draft')!r})",
        "assert tok.decode(tok.encode('Paris')) == 'Paris' and model.config.vocab_size == 64",
        "print('ok', transformers.__version__)",
    ])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
