"""How the code is put together: the reference is the ground floor, the command line the top, no import circle;
the settings of a generation are one object, checked when it is made."""
import ast
from pathlib import Path

import pytest

import ssd

ROOT = Path(__file__).resolve().parents[1]


def module_imports(path: Path, top_level_only: bool) -> set:
    """Our modules that `path` imports (at module level only, or anywhere outside `if __name__ == "__main__"`)."""
    ours = {p.stem for p in ROOT.glob("*.py")}
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else [n for n in tree.body if not _is_main_block(n)]
    found = set()
    for top in nodes:
        for node in ([top] if top_level_only else ast.walk(top)):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
    return found & ours - {path.stem}


def _is_main_block(node) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def test_no_import_circle():
    """Imports anywhere but a module's `__main__` block (the CLI's front doors) form no cycle."""
    graph = {p.stem: module_imports(p, top_level_only=False) for p in ROOT.glob("*.py")}

    def visit(m, path):
        assert m not in path, f"import circle: {' -> '.join(path + [m])}"
        for d in graph.get(m, ()):
            visit(d, path + [m])
    for m in graph:
        visit(m, [])
    assert "cli" not in graph["ssd"] and graph["ssd_round"] <= {"ssd"} and "ssd_fast" not in graph["tp"]


def test_settings_are_checked_when_made():
    for bad, message in [(dict(k=0), "k"), (dict(temperature=-1), "temperature"), (dict(mode="fast"), "mode"),
                         (dict(top_p=0), "top_p"), (dict(saguaro_c=1.5), "saguaro_c"), (dict(backup="slow"), "backup"),
                         (dict(fan_out_budget=0), "fan_out_budget"), (dict(draft_temperature=[1, -2]), "draft_temperature")]:
        with pytest.raises(ValueError, match=message):
            ssd.Settings(**bad)
    with pytest.raises(TypeError, match="unknown settings"):
        ssd.Settings.of(None, temprature=1.0)
    s = ssd.Settings(mode="sd", k=3)
    assert ssd.Settings.of(s, k=5).k == 5 and s.k == 3          # keywords override, the object stays


def test_settings_object_equals_keywords(tiny_pair):
    target, draft = tiny_pair
    s = ssd.Settings(mode="ssd", k=2, temperature=1.0, seed=4, max_new_tokens=10, eos_token_id=[])
    by_object = ssd.generate(target, [[1, 2, 3]], draft=draft, settings=s).tokens
    by_keywords = ssd.generate(target, [[1, 2, 3]], draft=draft, mode="ssd", k=2, temperature=1.0, seed=4,
                               max_new_tokens=10, eos_token_id=[]).tokens
    assert by_object == by_keywords
