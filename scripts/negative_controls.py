"""Negative controls: realistic mistakes in SD/SSD code, each applied as a patch to the source in a scratch copy of
the project, where the statistical test that guards its path (tests/test_power.py) must then fail (p < 1e-6).
After a restructuring, re-run the whole set in one command:

    python scripts/negative_controls.py              # every control; prints caught / missed and each test's p-value
    python scripts/negative_controls.py --list       # the controls: what each patches and which test must fail
    python scripts/negative_controls.py saguaro top-p    # the controls whose names contain any of these words
    python scripts/negative_controls.py --check      # only check that every patch still applies (runs no test)

A patch replaces a piece of the real source that must occur exactly once: when a refactor moves or rewrites that
code, the control reports "does not apply" instead of running a test that no longer sees the mistake. The scratch
copy holds the files git tracks and the untracked ones it does not ignore, as they are in the working tree.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
P_FAIL = 1e-6
POWER = "tests/test_power.py::test_transitions_follow_the_target"
REF_SAGUARO = f"{POWER}[ssd-reference-T1.0-Td0.7-K3-auto-Fauto-N8-C0.5-ragged]"
ENG_SAGUARO = f"{POWER}[ssd-engine-T1.0-topk5-K3-jit-Fauto-N8-C0.5-ragged]"
REF_SD, ENG_SD = f"{POWER}[sd-reference-T1.0-K2-ragged]", f"{POWER}[sd-engine-T0.7-Td1.0-K3-ragged]"


@dataclass
class Control:
    name: str
    why: str
    patches: list      # (file, the text to replace, its replacement)
    tests: list        # pytest node ids: each must fail


CONTROLS = [
    Control("verify with q, not q' (reference)", "Saguaro: proposals drawn from q' but verified with the plain q",
            [("ssd.py", "    return sample(q, gen), q\n",
              "    return sample(q, gen), to_probs(logits, temperature, opts.top_k, opts.top_p)\n")], [REF_SAGUARO]),
    Control("verify with q, not q' (engine)", "the same in the engine's draft sampler",
            [("ssd_engine/sampling.py", "    return sample(ops, q, gen), q\n",
              "    return sample(ops, q, gen), probs(logits, t, req)\n")], [ENG_SAGUARO]),
    Control("wrong draft temperature (reference)", "the draft samples at 0.7 T, the verifier divides by the q at T",
            [("ssd.py", "    return sample(q, gen), q\n",
              "    return sample(saguaro_rescale(to_probs(logits, temperature * 0.7, opts.top_k, opts.top_p), fan_out, "
              "c), gen), q\n")], [REF_SD]),
    Control("wrong draft temperature (engine)", "the same in the engine's draft sampler",
            [("ssd_engine/sampling.py", "    return sample(ops, q, gen), q\n",
              "    return sample(ops, probs(logits, t * 0.7, req), gen), q\n")], [ENG_SD]),
    Control("rejection resamples p (reference)", "a rejection samples the target's p, not max(0, p - q)",
            [("ssd.py", "    r = (p - q).clamp_min(0)\n", "    r = p.clone()\n")], [REF_SD]),
    Control("rejection resamples p (engine)", "the same in the engine's verify (the kernel's reference on a CPU)",
            [("ssd_kernels.py", "    resid = (p_n - q_n).clamp_min(0.0)\n", "    resid = p_n\n")], [ENG_SD]),
    Control("fast backup accepted with ratio 1", "the n-gram proposal verified with q(x) = 0, not one-hot: accepted",
            [("ssd.py", "    return F.one_hot(tokens, vocab_size).float()\n",
              "    return torch.zeros(*tokens.shape, vocab_size, device=tokens.device)\n")],
            [REF_SAGUARO, f"{POWER}[ssd-engine-T1.0-Td0.7-topk5-topp0.9-K4-fast-Fauto-N10-C1.0-ragged]"]),
    Control("cached q kept on a miss", "the SSD round verifies a missed row with the cache's q rows, not its backup's",
            [("ssd_engine/ssd_round.py", "self.prop_q.copy_(torch.where(hit[:, None, None], cached_q, qs))",
              "self.prop_q.copy_(cached_q)")], [ENG_SAGUARO]),
    Control("Saguaro q' not renormalized (engine)", "the masked rescale (automatic fan-out) returns q' undivided",
            [("ssd_engine/sampling.py", "    return q / q.sum(-1, keepdim=True)\n", "    return q\n")], [ENG_SAGUARO]),
    Control("Saguaro q' not renormalized (reference)", "ssd.saguaro_rescale returns q' undivided",
            [("ssd.py", "    return q / q.sum(-1, keepdim=True)\n", "    return q\n")], [REF_SAGUARO]),
    Control("draft top-p not renormalized (engine)", "the draft's q keeps the top-p tokens but not their division",
            [("ssd_engine/sampling.py", "    q = probs(logits, t, req)\n",
              "    q = ssd.to_probs(logits, t, req.top_k).masked_fill(probs(logits, t, req) == 0, 0.0)\n")],
            [f"{POWER}[sd-engine-T1.0-topp0.9-K3-ragged]"]),
    Control("draft top-p not renormalized (reference)", "the same in the reference's draft sampler",
            [("ssd.py", "    q = saguaro_rescale(to_probs(logits, temperature, opts.top_k, opts.top_p), fan_out, c)\n",
              "    q = saguaro_rescale(to_probs(logits, temperature, opts.top_k).masked_fill(\n"
              "        to_probs(logits, temperature, opts.top_k, opts.top_p) == 0, 0.0), fan_out, c)\n")],
            [f"{POWER}[sd-reference-T0.7-Td1.0-topp0.9-K3-ragged]"]),
    Control("shared seeds", "every sampling site seeded alike: the verifier's uniforms are the draft's noise",
            [("ssd.py", '    return int.from_bytes(digest[:8], "little") >> 1\n', "    return seed\n")],
            ["tests/test_power.py::test_draft_and_verifier_streams_are_independent[False-reference-cpu]",
             "tests/test_power.py::test_draft_and_verifier_streams_are_independent[False-fast-cpu]"]),
]


def problems(control: Control, root: Path = ROOT) -> list:
    """Why the control's patches do not apply to the source under `root` (empty: they apply)."""
    out = []
    for path, old, _ in control.patches:
        if not (root / path).exists():
            out.append(f"{path} is gone")
            continue
        n = (root / path).read_text().count(old)
        if n != 1:
            out.append(f"{path}: the text to patch occurs {n} times (want once): {old.strip()[:60]!r}")
    return out


def scratch_copy(dest: Path):
    """The files git tracks and the untracked ones it does not ignore, as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run(control: Control, timeout: float) -> tuple:
    """(verdict, the tests' p-values, seconds): caught when every test fails with p < P_FAIL."""
    t0 = time.perf_counter()
    if problems(control):
        return "does not apply", [], 0.0
    with tempfile.TemporaryDirectory(prefix="ssd-control-") as tmp:
        tmp = Path(tmp)
        scratch_copy(tmp)
        for path, old, new in control.patches:
            f = tmp / path
            f.write_text(f.read_text().replace(old, new))
        ps, verdicts = [], []
        for test in control.tests:
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=tmp,
                                   capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                verdicts.append("timed out")
                ps.append(None)
                continue
            found = re.findall(r"p = ([0-9.]+(?:e[-+]?\d+)?)", r.stdout)
            p = float(found[-1]) if found else None
            ps.append(p)
            if r.returncode == 0:
                verdicts.append("missed")
            elif r.returncode == 1 and p is not None:
                verdicts.append("caught" if p < P_FAIL else "weak")
            else:
                lines = (r.stdout + r.stderr).strip().splitlines()
                raised = [line[1:].strip() for line in lines if line.startswith("E ")]
                verdicts.append("error: " + (raised or lines or [f"pytest exit {r.returncode}"])[-1][:120])
    order = ["does not apply", "timed out", "missed", "weak"]
    worst = next((v for o in order for v in verdicts if v.startswith(o)), None) or \
        next((v for v in verdicts if v.startswith("error")), "caught")
    return worst, ps, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("names", nargs="*", help="run the controls whose names contain any of these (case-insensitive)")
    ap.add_argument("--list", action="store_true", help="list the controls")
    ap.add_argument("--check", action="store_true", help="only check that every patch applies")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test (default 900)")
    args = ap.parse_args(argv)
    chosen = [c for c in CONTROLS if not args.names or any(w.lower() in c.name.lower() for w in args.names)]
    if not chosen:
        ap.error(f"no control matches {args.names}: see --list")
    if args.list:
        for c in chosen:
            print(f"{c.name}\n    {c.why}\n    patches {', '.join(sorted({p for p, _, _ in c.patches}))}; must fail:")
            for t in c.tests:
                print(f"      {t}")
        return 0
    if args.check:
        bad = {c.name: problems(c) for c in chosen if problems(c)}
        for name, why in bad.items():
            print(f"{name}: does not apply: {'; '.join(why)}")
        print(f"{len(chosen) - len(bad)} of {len(chosen)} controls apply")
        return 1 if bad else 0
    width = max(len(c.name) for c in chosen)
    print(f"{'control':<{width}}  {'result':<14}  {'p-value(s)':<22}  seconds", flush=True)
    failures = 0
    for c in chosen:
        verdict, ps, seconds = run(c, args.timeout)
        failures += verdict != "caught"
        shown = ", ".join("-" if p is None else f"{p:.1e}" for p in ps)
        print(f"{c.name:<{width}}  {verdict:<14}  {shown:<22}  {seconds:.0f}", flush=True)
        if verdict == "does not apply":
            print("    " + "; ".join(problems(c)))
    print(f"{len(chosen) - failures} of {len(chosen)} caught (p < {P_FAIL:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
