"""The batching engine on the real prepared pair: greedy exactness against generate() and throughput.

Loads qwen2.5-coder-1.5b (fp32, packed) and qwen2.5-coder-0.5b (int8 dynamic: a draft never changes
the output), runs N prompts greedy through `generate(mode="ar")` one at a time (the reference, and
ar@1's throughput), then through one Engine at concurrency C in ar and sd. Prints, per mode, the
aggregate tokens/s, mean batch, mean k, acceptance and greedy mismatches (first diverging position
and the target's top-2 logit gap there). Needs the prepared models (`specserve models prepare`).

    PYTHONPATH=. python scripts/batch_real_check.py [--n 8] [--tokens 32] [--threads 2]
"""

import argparse
import time

import torch

from specserve.engine.engine import Engine, run_to_completion
from specserve.engine.lm import load_model
from specserve.engine.sequence import Request, SpeculationParams
from specserve.engine.speculative import SpecConfig
from specserve.engine.single import generate

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "def is_prime(n: int) -> bool:\n",
    "# Sort a list of dictionaries by the key 'age'\npeople = [{'name': 'a', 'age': 3}]\n",
    "class Stack:\n    def __init__(self):\n",
    "def parse_csv(path):\n    \"\"\"Read a CSV file and return a list of rows.\"\"\"\n    import csv\n",
    "import numpy as np\n\ndef normalize(v):\n",
    "def binary_search(a, x):\n    lo, hi = 0, len(a)\n",
    "# Python: count the words in a string\ndef word_count(s):\n",
]


def top2_gap(target, ids):
    with torch.inference_mode():
        logits = target.model(torch.tensor([ids])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="ar@8,sd@8,sd@1", help="mode@concurrency, comma-separated")
    a = ap.parse_args()
    target = load_model("qwen2.5-coder-1.5b", dtype="float32", threads=a.threads)
    draft = load_model("qwen2.5-coder-0.5b", dtype="float32", quantize="int8", tokenizer=False)
    prompts = [target.encode(p) for p in (PROMPTS * 4)[: a.n]]
    t0 = time.perf_counter()
    refs = [[t for c in generate(target, None, p, a.tokens, spec=SpecConfig(mode="ar")) for t in c.token_ids]
            for p in prompts]
    ar1 = sum(map(len, refs)) / (time.perf_counter() - t0)
    print(f"ar@1 via generate(): {ar1:.2f} tok/s", flush=True)
    for mode, conc in [(r.split("@")[0], int(r.split("@")[1])) for r in a.runs.split(",")]:
        eng = Engine(target, draft if mode == "sd" else None, max_num_seqs=conc, max_model_len=512)
        cost = eng.policy.cost
        print("probed costs {tokens: s}: target", {n: round(t, 3) for n, t in sorted(cost.target.points.items())},
              "draft", {n: round(t, 3) for n, t in sorted(cost.draft.points.items())} if cost.draft else None,
              flush=True)
        if conc == 1:  # batch 1: the first two prompts only (time)
            prompts, refs = prompts[:2], refs[:2]
        t0 = time.perf_counter()
        res = run_to_completion(eng, [Request(p, a.tokens, spec=SpeculationParams(mode)) for p in prompts])
        wall = time.perf_counter() - t0
        outs = [v[0] for v in res.values()]
        bad = []
        for p, o, r in zip(prompts, outs, refs):
            if o != r:
                i = next((j for j, (x, y) in enumerate(zip(o, r)) if x != y), min(len(o), len(r)))
                bad.append((i, round(top2_gap(target, p + r[:i]), 5)))
        st = eng.stats.to_dict(eng)
        print(f"{mode}@{conc}: {sum(map(len, outs)) / wall:.2f} tok/s aggregate, mean_batch {st['mean_batch']}, "
              f"mean_k {st['mean_k']}, acceptance {st['acceptance_rate']}, mismatches {len(bad)} "
              f"(first position, top-2 gap) {bad}", flush=True)


if __name__ == "__main__":
    main()
