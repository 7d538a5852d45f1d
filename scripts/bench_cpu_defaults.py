"""What a new user meets on a CPU with the default flags, side by side in one run (the embedded pair):

  one-shot        `ssd_fast.py --prompt P --json` (the context sized to the prompt, the default)
  one-shot 4096   the same with `--max-context 4096`
  interactive     `ssd_fast.py --interactive` with P piped in (its context: 4096)
  API example     the README's Python API: `ssd_fast.Engine(target, draft)` (max_seq 4096), `generate` on P in the mode
                  the one-shot run chose, then the README's own two-question SSD example (wall time)
  serve           `ssd_fast.py --serve` with its defaults: start-up, one 8-token chat (non-streaming), 4 concurrent
                  16-token requests (ignore_eos), the server's resident memory (now and peak)

Every decode runs greedily on the same prompt, so each one-shot, interactive and API run makes the same tokens;
tok/s is each run's own decode rate (its summary: generated tokens / decode time, prefill excluded). Medians of
--repeats, the four decodes interleaved (one of each per repeat). Writes OUT/results.json and OUT/results.md.

    python scripts/bench_cpu_defaults.py --out benchmarks/cpu_defaults --repeats 5
"""
import argparse
import concurrent.futures as cf
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about the sea."
CHAT = "What is the capital of France?"


def cli(*flags, stdin=None):
    run = subprocess.run([sys.executable, str(ROOT / "ssd_fast.py"), *flags], input=stdin, capture_output=True,
                         text=True, cwd=ROOT, timeout=900)
    if run.returncode:
        raise RuntimeError(f"ssd_fast.py {' '.join(flags)} exited {run.returncode}: {run.stderr[-2000:]}")
    return run


def one_shot(tokens, *extra):
    stats = json.loads(cli("--prompt", PROMPT, "--max-new-tokens", str(tokens), "--json", *extra).stdout)["stats"]
    return stats["tokens_per_s"], stats["mode"], stats["generated_tokens"]


def interactive(tokens):
    run = cli("--interactive", "--max-new-tokens", str(tokens), stdin=PROMPT + "\n")
    m = re.search(r"\[(\d+) tokens in [\d.]+ s, ([\d.]+) tok/s", run.stderr)
    if not m:
        raise RuntimeError(f"no summary line in --interactive's stderr: {run.stderr[-1000:]}")
    return float(m.group(2)), int(m.group(1))


class ApiExample:
    """The README's Python API in this process: `ssd_fast.Engine(target, draft)` with its defaults (max_seq 4096)."""

    def __init__(self):
        sys.path.insert(0, str(ROOT))
        import torch
        from ssd_engine import bootstrap, report
        import ssd_fast
        torch.set_num_threads(bootstrap.cpu_threads(None, torch))
        target, draft, self.tok, _ = ssd_fast.load_pair(log=lambda *a: None)
        self.engine, self.decode_seconds = ssd_fast.Engine(target, draft), report.decode_seconds

    def chat(self, text):
        return self.tok.apply_chat_template([{"role": "user", "content": text}])

    def rate(self, tokens, mode):
        out = self.engine.generate([self.chat(PROMPT)], mode=mode, max_new_tokens=tokens)
        return out.summary()["generated_tokens"] / self.decode_seconds(out)      # as the CLI's summary line

    def readme_example_s(self):
        t0 = time.perf_counter()
        self.engine.generate([self.chat(q) for q in ["What is the capital of France?",
                                                     "Name a planet of the solar system."]],
                             mode="ssd", k=4, max_new_tokens=24)
        return time.perf_counter() - t0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - t0, answer


def memory_mb(pid):
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def serve(repeats):
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "ssd_fast.py"), "--serve", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        healthy_s = time.perf_counter() - t0
        model = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())["data"][0]["id"]
        chat = dict(model=model, messages=[{"role": "user", "content": CHAT}], max_tokens=8, temperature=0)
        one = [post(port, "/v1/chat/completions", chat)[0] for _ in range(repeats)]
        four = []
        for i in range(repeats):
            bodies = [dict(model=model, messages=[{"role": "user", "content": f"Tell me about {topic}."}],
                           max_tokens=16, temperature=0, ignore_eos=True)
                      for topic in ("the moon", "volcanoes", "honey bees", "jazz")]
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda b: post(port, "/v1/chat/completions", b)[1], bodies))
            four.append(time.perf_counter() - t)
            assert all(a["usage"]["completion_tokens"] == 16 for a in answers)
        mem = memory_mb(proc.pid)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    said = [line for line in err.splitlines() if line.startswith(("CPU defaults", "server:", "mode:"))]
    return dict(healthy_after_s=healthy_s, chat_8_tokens_s=statistics.median(one), chat_8_tokens_runs=one,
                four_concurrent_16_tokens_s=statistics.median(four), four_concurrent_runs=four,
                rss_mb=mem["VmRSS"], peak_rss_mb=mem["VmHWM"], start_up_said=said)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode (default 64)")
    args = ap.parse_args(argv)
    res = dict(command=f"python scripts/bench_cpu_defaults.py --out OUT/{args.out.name} --repeats {args.repeats}"
                       f" --tokens {args.tokens}",
        cores=os.cpu_count(), prompt=PROMPT, tokens=args.tokens)
    # The four decodes interleaved, one of each per repeat, so that a slower minute of a shared machine hits all
    api, runs = ApiExample(), {k: [] for k in ("one_shot", "one_shot_4096", "interactive", "api_example")}
    for _ in range(args.repeats):
        rate, mode, generated = one_shot(args.tokens)
        runs["one_shot"].append(rate)
        runs["one_shot_4096"].append(one_shot(args.tokens, "--max-context", "4096")[0])
        runs["interactive"].append(interactive(args.tokens)[0])
        runs["api_example"].append(api.rate(args.tokens, mode))
    for k, v in runs.items():
        res[k] = dict(tokens_per_s=statistics.median(v), runs=v)
    res["one_shot"].update(mode=mode, generated=generated)
    res["api_example"]["max_seq"] = api.engine.max_seq
    walls = [api.readme_example_s() for _ in range(args.repeats)]
    res["api_example"].update(readme_example_s=statistics.median(walls), readme_example_runs=walls)
    res["serve"] = serve(args.repeats)
    base = res["one_shot"]["tokens_per_s"]
    res["ratios_to_one_shot"] = {k: res[k]["tokens_per_s"] / base for k in ("one_shot_4096", "interactive",
                                                                            "api_example")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    s = res["serve"]
    md = [f"# CPU defaults ({res['cores']} cores), embedded pair, {args.tokens} tokens, median of {args.repeats}", "",
          f"`{res['command']}`", "", "| run | tok/s | / one-shot |", "| --- | ---: | ---: |",
          f"| one-shot ({res['one_shot']['mode']}) | {base:.1f} | 1.00 |"]
    md += [f"| {k} | {res[k]['tokens_per_s']:.1f} | {res['ratios_to_one_shot'][k]:.2f} |"
           for k in ("one_shot_4096", "interactive", "api_example")]
    md += ["", f"README's API example (two questions, SSD, 24 tokens): {res['api_example']['readme_example_s']:.1f} s",
           "", f"serve: healthy after {s['healthy_after_s']:.1f} s; one 8-token chat {s['chat_8_tokens_s']:.2f} s; "
           f"4 concurrent 16-token requests {s['four_concurrent_16_tokens_s']:.2f} s; RSS {s['rss_mb']:.0f} MB "
           f"(peak {s['peak_rss_mb']:.0f} MB)", "", *(f"    {line}" for line in s["start_up_said"])]
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
