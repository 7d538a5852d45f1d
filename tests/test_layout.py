"""How the code is put together: the reference is the ground floor, the front door the top, no import circle;
the settings of a generation are one object, checked when it is made."""
import ast
from pathlib import Path

import pytest

import ssd

ROOT = Path(__file__).resolve().parents[1]


def our_modules() -> dict:
    """{import name: path} of the repository root's modules and the engine package's."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    mods.update({f"ssd_engine.{p.stem}": p for p in (ROOT / "ssd_engine").glob("*.py") if p.stem != "__init__"})
    return mods


def module_imports(path: Path, ours) -> set:
    """Our modules that `path` imports anywhere: at the top, inside functions, in its `__main__` block."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & set(ours)


def import_graph() -> dict:
    ours = our_modules()
    return {name: module_imports(path, ours) - {name} for name, path in ours.items()}


def test_no_import_circle():
    """Imports anywhere, `__main__` blocks and function bodies included, form no cycle; the reference imports
    nothing of ours but the embedded models (for its main); nothing in the engine imports its front door."""
    graph = import_graph()

    def visit(m, path):
        assert m not in path, f"import circle: {' -> '.join(path + [m])}"
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
    for m in graph:
        visit(m, [])
    assert graph["ssd"] <= {"embedded"}, graph["ssd"]
    assert graph["embedded"] == set() and graph["ssd_kernels"] == set()
    assert not any("ssd_fast" in deps for m, deps in graph.items() if m.startswith("ssd_engine."))


def test_the_layout_check_sees_imports_inside_functions_and_main_blocks(tmp_path):
    """The check above can fail: an import inside a function or a `__main__` block counts."""
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("if __name__ == '__main__':\n    from a import f\n")
    ours = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert module_imports(ours["a"], ours) == {"b"} and module_imports(ours["b"], ours) == {"a"}


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
