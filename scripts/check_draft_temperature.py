"""How much of the shipped draft's held-out acceptance its folded-in draft temperature gives (CPU, float32).

The distillation fits a draft temperature tau on training samples and divides the draft's final norm weight by it
(scripts/distill_draft.py). This samples T=1 continuations of held-out prompts from the target and reports
E[sum min(p, q)] for the draft as shipped, for the same weights with tau undone, and for any --compare drafts.

    python scripts/check_draft_temperature.py [--prompts 64] [--compare OTHER_DRAFT_DIR ...]
"""
import argparse
import copy
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]


def main() -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    import embedded
    from distill_draft import encode_prompt, evaluate, generate_batch, materialize
    from distill_prompts import build_prompts
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default=os.path.join(ROOT, "models", "smollm2-draft"))
    ap.add_argument("--compare", nargs="*", default=[])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(4)
    tdir = str(embedded.ensure_target())
    tok = AutoTokenizer.from_pretrained(tdir)
    target = LlamaForCausalLM.from_pretrained(tdir, dtype=torch.float32).eval()
    E = target.model.embed_tokens.weight.detach().float()
    with open(os.path.join(args.draft, "distill_eval.json")) as f:
        tau = next(iter(json.load(f)["drafts"].values()))["draft_temperature"]
    shipped = materialize(args.draft, E)
    undone = copy.deepcopy(shipped)
    undone.model.norm.weight.data *= tau
    models = {f"shipped (tau={tau})": shipped, "same weights, tau=1": undone}
    models.update({d: materialize(d, E) for d in args.compare})
    _, held = build_prompts(seed=0)
    held = random.Random(args.seed).sample(held, args.prompts)
    enc = [encode_prompt(tok, p) for p in held]
    conts = []
    for s in range(0, len(enc), 32):
        conts += generate_batch(target, enc[s:s + 32], args.tokens, False, "cpu")
    ev = {"greedy": [], "sample": [(p["category"], e, c) for p, e, c in zip(held, enc, conts) if c]}
    for n, m in evaluate(models, target, ev, "cpu").items():
        a = m["all"]
        print(f"{n:24s} E[sum min(p,q)] {a['expected_acceptance_T1']:.4f} over {a['sample_positions']} positions")


if __name__ == "__main__":
    main()
