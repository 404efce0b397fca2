"""How long a long prompt stalls the rows already decoding, with and without chunked prefill.

One batching `Engine` (ar, greedy): `--rows` short HumanEval prompts decode; after `--join-round`
rounds a long prompt (`--long-tokens`, HumanEval prompts joined) joins. For each
`--budgets` value (the engine's max_prefill_tokens) it prints the longest round the decoding rows
waited through (their worst inter-token gap), the long prompt's time to first token, and the
decoding rows' tokens/s over the run. A budget at least as long as the prompt is the unchunked
behaviour (the whole prompt in one round). One process at a time (the fp32 1.5B target is ~7 GB).

    PYTHONPATH=. python scripts/prefill_stall.py --target qwen2.5-coder-1.5b --threads 2
    PYTHONPATH=. python scripts/prefill_stall.py --target models/tiny/target --long-tokens 300   # a quick check
"""

import argparse
import time

from specserve.engine.engine import Engine
from specserve.engine.lm import load_model
from specserve.engine.sequence import Request, SpeculationParams
from specserve.tools.bench import load_prompts


def run(target, short: list[list[int]], long: list[int], budget: int, new_tokens: int, join_round: int) -> dict:
    eng = Engine(target, None, max_num_seqs=len(short) + 1, max_model_len=len(long) + new_tokens + 8,
                 max_prefill_tokens=budget)
    ar = SpeculationParams("ar")
    ids = [eng.add(Request(p, new_tokens, spec=ar)) for p in short]
    rounds, long_id, t_join, ttft, rnd = [], None, None, None, 0
    got = dict.fromkeys(ids, 0)
    t0 = time.perf_counter()
    while eng.has_work():
        if rnd == join_round:
            long_id, t_join = eng.add(Request(long, 4, spec=ar)), time.perf_counter()
        t = time.perf_counter()
        events = eng.step()
        dt = time.perf_counter() - t
        if rnd >= join_round and any(rid in got and c.token_ids for rid, c in events):
            rounds.append(dt)  # a round the decoding rows waited through, from the join on
        for rid, c in events:
            if rid in got:
                got[rid] += len(c.token_ids)
            elif rid == long_id and ttft is None and c.token_ids:
                ttft = time.perf_counter() - t_join
        rnd += 1
    wall = time.perf_counter() - t0
    steady = sorted(rounds)[len(rounds) // 2]
    return {"budget": budget, "worst_gap_s": max(rounds), "median_round_s": steady, "long_ttft_s": ttft,
            "decode_tokens_per_s": sum(got.values()) / wall, "prefill_chunks": eng.stats.prefill_chunks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, default=3, help="short prompts decoding when the long one joins")
    ap.add_argument("--long-tokens", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=24, help="tokens each short row generates")
    ap.add_argument("--join-round", type=int, default=3, help="after the short prompts' prefill (chunked too)")
    ap.add_argument("--budgets", default="4096,512", help="max_prefill_tokens values, comma-separated")
    a = ap.parse_args()
    target = load_model(a.target, dtype="float32", threads=a.threads)
    prompts = [target.encode(p.text) for p in load_prompts("humaneval", 40)]
    short = prompts[:a.rows]
    long = [t for p in prompts[a.rows:] for t in p][:a.long_tokens]
    if len(long) < a.long_tokens:
        raise SystemExit(f"--long-tokens {a.long_tokens}: only {len(long)} tokens of prompts to join")
    print(f"{a.rows} rows decoding ({[len(p) for p in short]} prompt tokens), a {len(long)}-token prompt "
          f"joins at round {a.join_round}")
    print("| max_prefill_tokens | worst gap of the decoding rows | median round | long prompt's TTFT "
          "| decoding rows' tok/s | prefill chunks |")
    print("|---|---|---|---|---|---|")
    for b in (int(x) for x in a.budgets.split(",")):
        r = run(target, short, long, b, a.new_tokens, a.join_round)
        print(f"| {r['budget']} | {r['worst_gap_s']:.2f} s | {r['median_round_s']:.2f} s | {r['long_ttft_s']:.2f} s "
              f"| {r['decode_tokens_per_s']:.2f} | {r['prefill_chunks']} |", flush=True)


if __name__ == "__main__":
    main()
