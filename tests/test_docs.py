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
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ANYWHERE = re.compile(r"(?<![\w.~-])/(?:root|home/[\w.-]+|Users/[\w.-]+|work|opt|mnt|scratch)/")
IN_RESULTS = re.compile(r"(?<![\w.~-])/tmp/")
RESULTS_AND_DOCS = ("benchmarks/", "models/", "data/")
COMMISSIONING = re.compile(r"\bthe\s+brief\b|\bbrief's\b|\basked\s+for\s+here\b|\bthe\s+(?:issue|task)\s+asks\b|"
                           r"\bas\s+requested\b", re.I)
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


@pytest.mark.parametrize("name,text", [
    ("benchmarks/x/results.json", '"target_dir": "/root/.cache/ssd/smollm2"'),
    ("benchmarks/x/results.json", '"draft_dir": "/work/main/models/smollm2-draft"'),
    ("benchmarks/x/results.md", "Command: `bench.py --out /tmp/run1`"),
    ("benchmarks/x/results.json", 'File \\"/home/alice/ssd/ssd_fast.py\\", line 3'),
    ("scripts/x.py", 'site = "/opt/torch/.venv/lib"'),
    ("README.md", "The brief asked for a table."),
    ("BENCHMARKS.md", "since only the ratio is asked for here"),
])
def test_the_scan_finds_each_kind(name, text):
    assert scan([(name, text)])


@pytest.mark.parametrize("name,text", [
    ("benchmarks/x/results.json", '"target_dir": "~/.cache/ssd/smollm2", "command": "bench.py --out OUT/run1"'),
    ("scripts/bench_load.py", "python scripts/bench_load.py --dir /tmp/tiny --smoke"),
    ("README.md", "see https://example.org/work/ and `models/smollm2-draft/`; a brief summary"),
    ("cli.py", 'raise UsageError(f"asked for {n} GPUs but only {count} are visible")'),
])
def test_the_scan_lets_these_pass(name, text):
    assert not scan([(name, text)])
