"""The documents and the recorded results: no machine paths, no words about how the work was commissioned.

Machine paths are the measuring machine's own directories, which mean nothing on another machine. Recorded
results name output directories `OUT/...`, the model cache `~/.cache/ssd`, and repository files by their path
in the repository. The patterns (written so that this file does not match them itself):
  - home directories, anywhere in the tracked text: `/root/`, `/home/<user>/`, `/Users/<user>/`;
  - the work, tool and mount directories of the machines the project ran on, anywhere: `/work/`, `/opt/`,
    `/mnt/`, `/scratch/`;
  - `/tmp/` in recorded results and documents (benchmarks/, models/, data/, Markdown, the notebook): a script
    may give a scratch directory as an example, a result may not name the one it used.
"""
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ANYWHERE = re.compile(r"(?<![\w.~-])/(?:root|home/[\w.-]+|Users/[\w.-]+|work|opt|mnt|scratch)/")
IN_RESULTS = re.compile(r"(?<![\w.~-])/tmp/")
RESULTS_AND_DOCS = ("benchmarks/", "models/", "data/")
COMMISSIONING = re.compile(r"\bthe\s+brief\b|\bbrief's\b|\basked\s+for\s+here\b|\bthe\s+(?:issue|task)\s+asks\b|"
                           r"\bas\s+requested\b|\bthe\s+(?:issue|task)'s\b|\b(?:benchmark|multi-GPU)\s+issue\b", re.I)
PROSE_DATA = ("data/prompts/",)          # the benchmark's prompts: third-party text, not ours
SELF = "tests/test_docs.py"              # its examples below are what the scan must find


def tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in filter(None, names.decode().split("\0")):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 50_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue                      # binary: weights, images
        try:
            yield name, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def hits(pattern, text):
    return [(text.count("\n", 0, m.start()) + 1, text[max(0, m.start() - 30):m.end() + 30].replace("\n", " "))
            for m in pattern.finditer(text)]


def scan(files):
    """{file: [(line, context), ...]} for every machine path and commissioning phrase in (name, text) pairs."""
    found = {}
    for name, text in files:
        if name == SELF:
            continue
        where = hits(ANYWHERE, text)
        if name.startswith(RESULTS_AND_DOCS) or name.endswith((".md", ".ipynb")):
            where += hits(IN_RESULTS, text)
        if not name.startswith(PROSE_DATA):
            where += hits(COMMISSIONING, text)
        if where:
            found[name] = where
    return found


def test_no_machine_paths_or_commissioning_words_in_tracked_files():
    files = list(tracked_text_files())
    assert len(files) > 50
    found = scan(files)
    assert not found, "machine paths or commissioning words:\n" + "\n".join(
        f"  {name}:{line}: ...{context}..." for name, where in found.items() for line, context in where[:5])


def _path(*parts):
    """A machine path for the planted examples below, built here so that this file's text names none."""
    return "/" + "/".join(parts)


@pytest.mark.parametrize("name,text", [
    ("benchmarks/x/results.json", '"target_dir": "' + _path("root", ".cache", "ssd", "smollm2") + '"'),
    ("benchmarks/x/results.json", '"draft_dir": "' + _path("work", "main", "models", "smollm2-draft") + '"'),
    ("benchmarks/x/results.md", "Command: `bench.py --out " + _path("tmp", "run1") + "`"),
    ("benchmarks/x/results.json", 'File \\"' + _path("home", "alice", "ssd", "ssd_fast.py") + '\\", line 3'),
    ("scripts/x.py", 'site = "' + _path("opt", "torch", ".venv", "lib") + '"'),
    ("README.md", "The brief asked for a table."),
    ("BENCHMARKS.md", "since only the ratio is asked for here"),
])
def test_the_scan_finds_each_kind(name, text):
    assert scan([(name, text)])


def _path(*parts):
    """A machine path for the planted examples below, built here so that this file's text names none."""
    return "/" + "/".join(parts)


@pytest.mark.parametrize("name,text", [
    ("benchmarks/x/results.json", '"target_dir": "~/.cache/ssd/smollm2", "command": "bench.py --out OUT/run1"'),
    ("scripts/bench_load.py", "python scripts/bench_load.py --dir " + _path("tmp", "tiny") + " --smoke"),
    ("README.md", "see https://example.org/work/ and `models/smollm2-draft/`; a brief summary"),
    ("cli.py", 'raise UsageError(f"asked for {n} GPUs but only {count} are visible")'),
])
def test_the_scan_lets_these_pass(name, text):
    assert not scan([(name, text)])


# ---------------------------------------------------------------------------------------------
# The figures the documents state, against the results files they cite
# ---------------------------------------------------------------------------------------------
# A Markdown table with a "results file" column states, per row, figures of the file that row names: at the
# row's temperature T (and batch, default 1; and K, when the table has a K column), the best decode tokens/s of
# each system (columns AR, SD, SSD: the cell's first number; a "K = n" in the cell is the K of that best) and
# the ratio of the best SSD to the best SD (column "SSD / SD"). Each is checked to the decimals it is stated
# with, so a results file and the documents that cite it cannot drift apart.

def _cells(line):
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _column(name):
    """'**ours SSD** (best)' -> 'SSD'; 'SD (best K)' -> 'SD'; 'results file' stays."""
    name = re.sub(r"\([^)]*\)", "", name.replace("*", "").replace("`", ""))
    return " ".join(name.split()).removeprefix("ours ")


def results_tables(text):
    """(column names, [(line number, cells) of each row]) of every table with a "results file" column."""
    lines = text.splitlines()
    i = 0
    while i + 1 < len(lines):
        if lines[i].startswith("|") and re.match(r"^\|\s*:?-", lines[i + 1]):
            header, j = [_column(c) for c in _cells(lines[i])], i + 2
            rows = []
            while j < len(lines) and lines[j].startswith("|"):
                rows.append((j + 1, _cells(lines[j])))
                j += 1
            if "results file" in header:
                yield header, rows
            i = j
        else:
            i += 1


def result_rows(path):
    """The measured rows of a results file: scripts/profile_round.py's ("rows") or scripts/bench.py's
    ("records"), as dicts with system, temperature, batch, k and tok_s."""
    data = json.loads(path.read_text())
    if "rows" in data:
        return [dict(r) for r in data["rows"]]
    return [dict(system=r["system"], temperature=r["temperature"], batch=r["batch"], k=r.get("k_used") or r.get("k"),
                 tok_s=r["decode_tok_s"]) for r in data["records"]
            if r.get("status") == "ok" and r.get("c", 1.0) in (None, 1.0) and r.get("decode_tok_s")]


def _stated(cell):
    """The cell's first number and its decimals, or None for an empty cell."""
    m = re.match(r"^[*\s]*(\d+(?:\.(\d+))?)", cell)
    return (float(m.group(1)), len(m.group(2) or "")) if m else None


def _agrees(stated, actual):
    value, decimals = stated
    return abs(value - actual) <= 0.5 * 10 ** -decimals + 1e-9


def check_figures(text, root=ROOT):
    """(figures checked, problems) for every results table in a document's text."""
    checked, problems = 0, []
    for header, rows in results_tables(text):
        for line, row in rows:
            where = f"line {line} ({row[0]}, T = {row[header.index('T')]})"
            cell = dict(zip(header, row))
            cited = re.search(r"benchmarks/[\w./-]+\.json", cell["results file"])
            if not cited or not (root / cited.group()).is_file():
                problems.append(f"{where}: no results file under benchmarks/ in {cell['results file']!r}")
                continue
            T, batch = float(cell["T"]), int(cell.get("batch") or 1)
            k = int(cell["K"]) if cell.get("K") else None
            rows_ = [r for r in result_rows(root / cited.group()) if r["temperature"] == T and r["batch"] == batch
                     and (k is None or r["system"] == "ar" or r["k"] == k)]
            best = {}
            for r in rows_:
                if r["system"] not in best or r["tok_s"] > best[r["system"]]["tok_s"]:
                    best[r["system"]] = r
            for name, system in (("AR", "ar"), ("SD", "sd"), ("SSD", "ssd")):
                stated = _stated(cell.get(name, ""))
                if stated is None:
                    continue
                checked += 1
                if system not in best:
                    problems.append(f"{where}: {cited.group()} has no {system} row at T = {T:g}, batch {batch}")
                elif not _agrees(stated, best[system]["tok_s"]):
                    problems.append(f"{where}: {name} {stated[0]} but {cited.group()} has {best[system]['tok_s']:.3f}")
                else:
                    said_k = re.search(r"K = (\d+)", cell[name])
                    if said_k and int(said_k.group(1)) != best[system]["k"]:
                        problems.append(f"{where}: {name} at K = {said_k.group(1)}, but its best is at K = "
                                        f"{best[system]['k']}")
            stated = _stated(cell.get("SSD / SD", ""))
            if stated is not None:
                checked += 1
                if not {"ssd", "sd"} <= set(best) or not _agrees(stated, best["ssd"]["tok_s"] / best["sd"]["tok_s"]):
                    problems.append(f"{where}: SSD / SD {stated[0]} does not match {cited.group()}")
    return checked, problems


@pytest.mark.parametrize("doc,least", [("README.md", 15), ("BENCHMARKS.md", 30)])
def test_stated_figures_match_the_results_files(doc, least):
    checked, problems = check_figures((ROOT / doc).read_text())
    assert not problems, f"{doc}:\n" + "\n".join(problems)
    assert checked >= least, f"{doc}: only {checked} figures in tables with a results file column"


def test_a_wrong_figure_is_found():
    table = """
| pair | T | AR | SD (best K) | **SSD** (best) | SSD / SD | results file |
| --- | ---: | ---: | ---: | ---: | ---: | --- |
| expanded | 0 | 238.6 | 409.6 (K = 4) | **438.9** (K = 4) | 1.07 | `benchmarks/ssd_round/exp_b1.json` |
"""
    assert check_figures(table) == (4, [])
    for wrong in ("238.7", "(K = 3)", "1.08", "exp_b4.json", "| 1 | 238.6"):
        right = {"238.7": "238.6", "(K = 3)": "(K = 4)", "1.08": "1.07", "exp_b4.json": "exp_b1.json",
                 "| 1 | 238.6": "| 0 | 238.6"}[wrong]
        _, problems = check_figures(table.replace(right, wrong, 1))
        assert problems, wrong


def test_cpu_defaults_figures_match_their_results_file():
    """The CPU-defaults figures of BENCHMARKS.md and the README, against benchmarks/cpu_defaults/results.json."""
    r = json.loads((ROOT / "benchmarks/cpu_defaults/results.json").read_text())
    s = r["serve"]
    ratios = r["ratios_to_one_shot"]
    bench, readme = (ROOT / "BENCHMARKS.md").read_text(), (ROOT / "README.md").read_text()
    rows = {"(one-shot)": r["one_shot"]["tokens_per_s"], "--max-context 4096`": r["one_shot_4096"]["tokens_per_s"],
            "--interactive`": r["interactive"]["tokens_per_s"], "(`Engine(target, draft)`)": r["api_example"]["tokens_per_s"]}
    for label, rate in rows.items():
        line = next(line for line in bench.splitlines() if line.startswith("| ") and label in line)
        assert f"| {rate:.1f} |" in line, (label, rate, line)
    for key in ("one_shot_4096", "interactive", "api_example"):
        assert f"| {ratios[key]:.2f} |" in bench, key
    said = [f"{r['api_example']['readme_example_s']:.1f} s", f"healthy {s['healthy_after_s']:.1f} s",
            f"{s['chat_8_tokens_s']:.2f} s", f"{s['four_concurrent_16_tokens_s']:.2f} s", f"{s['rss_mb']:,.0f} MB"]
    for figure in said:
        assert figure in bench, figure
    for figure in (f"{ratios['interactive']:.2f}x", f"{ratios['api_example']:.2f}x", said[2], said[3], said[4]):
        assert figure in readme, figure
