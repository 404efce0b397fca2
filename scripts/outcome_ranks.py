"""How predictable SSD's outcomes are for a draft: the rank of each round's t* in the draft's own distribution.

SSD's cache hits when the speculation drafted a branch for the round's outcome (j, t*): t* is the
target's bonus token after a fully accepted round, or its recovered token after a rejection. The
speculation can only branch on tokens the draft ranks high at that position (a recovered token
is never the draft's own pick there, which the target rejected). This script replays a greedy
bench run's ssd trace (rounds drafted / accepted / hit, and the committed tokens) through the
draft, one token per forward as drafting does (a many-token forward quantizes activations
differently under dynamic int8), and prints, for bonus and for recovered tokens apart:

  * the rank of t* among the draft's candidates at its position (0 = the draft's argmax);
  * the share that a branch set of the draft's top F candidates there could hit (F = 1..8): an
    upper bound on the hit rate of that kind of round, whatever the fan-out spends;
  * the hit rate the run measured on the round after each kind.

A rank the draft puts far down (the draft gives t* under 1 %) is a miss for any fan-out a draft
can afford; only a draft that agrees with the target more often moves it.

    PYTHONPATH=. python scripts/outcome_ranks.py docs/bench/humaneval-cpu-ssd-batch-avx512bf16.json --mode ssd@1
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from specserve.engine.lm import load_model
from specserve.tools.bench import hits_by_previous_round, load_prompts

TOP = (1, 2, 3, 4, 8)


def outcome_positions(drafted: list[int], accepted: list[int], n_tokens: int) -> list[tuple[int, str, int]]:
    """Where each round's t* lands among the committed tokens: (index, "bonus" | "recovered", round).

    Round r commits accepted[r] drafts and then t*, so its t* is token index sum(accepted[:r] + 1) +
    accepted[r]; a round whose drafts were all accepted (accepted == drafted, including rounds
    with no drafts) ends in a bonus token, any other in a recovered one. Rounds past the
    committed tokens (the budget cut the last one) are left out.
    """
    if len(drafted) != len(accepted):
        raise ValueError(f"drafted and accepted differ in length: {len(drafted)} != {len(accepted)}")
    out, pos = [], 0
    for r, (k, a) in enumerate(zip(drafted, accepted)):
        if not 0 <= a <= k:
            raise ValueError(f"round {r}: accepted {a} is not within 0..drafted {k}")
        i = pos + a
        if i >= n_tokens:
            break
        out.append((i, "bonus" if a == k else "recovered", r))
        pos = i + 1
    return out


@torch.inference_mode()
def draft_logits(lm, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The draft's logits before each of `tokens`, fed one token per forward after the prompt: [V] each."""
    cache = lm.new_cache()
    rows = [cache.forward(prompt, keep=1)[-1]]
    for t in tokens[:-1]:
        rows.append(cache.forward([t], keep=1)[-1])
    return rows


def rank_of(logits: torch.Tensor, token: int) -> int:
    """0 for the argmax; ties count in the token's favour."""
    return int((logits > logits[token]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", help="a greedy `specserve bench` result with an ssd mode")
    ap.add_argument("--mode", default=None, help="the mode whose trace to replay (default: the first ssd one)")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--draft-quantize", default="int8", choices=["int8", "none"])
    ap.add_argument("--prompts", default="humaneval", help="the bench's --prompts (default humaneval)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    res = json.loads(open(args.bench_json).read())
    if res["config"].get("temperature", 0.0) != 0.0:
        sys.exit("outcome_ranks: the run sampled (temperature > 0); only a greedy run's t* is the target's argmax")
    modes = sorted({r["mode"] for r in res["records"]})
    mode = args.mode or next((m for m in modes if m.startswith("ssd")), None)
    if mode not in modes:
        sys.exit(f"outcome_ranks: --mode {mode!r} is not in {args.bench_json} (it holds {', '.join(modes)})")
    records = [r for r in res["records"] if r["mode"] == mode]
    prompts = {p.id: p for p in load_prompts(args.prompts, res["config"]["prompts"])}
    missing = sorted({r["prompt_id"] for r in records} - set(prompts))
    if missing:
        sys.exit(f"outcome_ranks: prompts {missing} are not among --prompts {args.prompts}")

    lm = load_model(args.draft, quantize=args.draft_quantize, threads=args.threads)
    ranks = {"bonus": [], "recovered": []}
    agree = [0, 0]  # accepted drafts that are the replayed draft's argmax: the replay is faithful
    for rec in records:
        p = prompts[rec["prompt_id"]]
        toks = rec["token_ids"]
        rows = draft_logits(lm, lm.encode(p.text, p.chat), toks)
        ends = outcome_positions(rec["drafted_per_round"], rec["accepted_per_round"], len(toks))
        start = 0
        for i, kind, _ in ends:
            ranks[kind].append(rank_of(rows[i], toks[i]))
            agree[0] += sum(rank_of(rows[j], toks[j]) == 0 for j in range(start, i))
            agree[1] += i - start
            start = i + 1
    after = hits_by_previous_round((r["drafted_per_round"], r["accepted_per_round"], r["hit_per_round"])
                                   for r in records)
    hits = {"bonus": after["after_accept"], "recovered": after["after_reject"]}  # the round after: [hits, rounds]

    print(f"{args.bench_json} {mode}: {len(records)} sequences, draft {lm.name} ({args.draft_quantize})")
    print(f"accepted drafts that are the replayed draft's argmax: {agree[0]} / {agree[1]}")
    for kind, rs in ranks.items():
        if not rs:
            continue
        hist = collections.Counter(min(x, 10) for x in rs)
        first = 0 if kind == "bonus" else 1  # a recovered token is never the draft's own (rejected) pick
        cover = "  ".join(f"top-{f} {sum(first <= x < first + f for x in rs) / len(rs):.2f}" for f in TOP)
        h, n = hits[kind]
        print(f"{kind} tokens: {len(rs)}; rank histogram (10 = 10 or more) {dict(sorted(hist.items()))}")
        print(f"  share within the draft's {'candidates' if first == 0 else 'alternatives'}: {cover}")
        print(f"  measured hit rate of the round after: {h} / {n}" + (f" ({h / n:.2f})" if n else ""))


if __name__ == "__main__":
    main()
