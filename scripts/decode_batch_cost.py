"""What a batch costs the target: ar rounds of the batching engine at batch 1 and at batch B.

The same HumanEval prompts run through one `Engine` (ar, greedy), first one alone, then B together.
It prints, for each batch size, the prefill (the rounds before every row has its first token) and
the median decode round. So it shows where `ar@B / ar@1` (the bench's aggregate ratio) comes
from: a decode round that costs no more at B rows than at one would give about B x on a
memory-bound machine; the prefill is compute-bound, the same work either way. One process at a
time (the fp32 1.5B target is ~7 GB).

    PYTHONPATH=. python scripts/decode_batch_cost.py --target qwen2.5-coder-1.5b --threads 2
    PYTHONPATH=. python scripts/decode_batch_cost.py --target qwen2.5-coder-1.5b --threads 2 --dtype bfloat16
    PYTHONPATH=. python scripts/decode_batch_cost.py --target models/tiny/target   # a quick check
"""

import argparse
import statistics
import time

from specserve.engine.engine import Engine
from specserve.engine.lm import DTYPES, load_model
from specserve.engine.sequence import Request, SpeculationParams
from specserve.tools.bench import load_prompts


def run(target, prompts: list[list[int]], new_tokens: int) -> dict:
    eng = Engine(target, None, max_num_seqs=len(prompts), max_model_len=max(map(len, prompts)) + new_tokens + 8,
                 probe=False)
    ids = {eng.add(Request(p, new_tokens, spec=SpeculationParams("ar"))) for p in prompts}
    started, prefill, decode = set(), 0.0, []
    while eng.has_work():
        t = time.perf_counter()
        events = eng.step()
        dt = time.perf_counter() - t
        if started >= ids:
            decode.append(dt)
        else:
            prefill += dt
        started |= {rid for rid, c in events if c.token_ids}
    return {"rows": len(prompts), "prefill_s": prefill, "decode_round_s": statistics.median(decode[:-1] or decode),
            "prompt_tokens": sum(map(len, prompts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                    help="the target's dtype (bfloat16 is fast only on CPUs with AVX512-BF16 / AMX)")
    a = ap.parse_args()
    target = load_model(a.target, dtype=a.dtype, threads=a.threads)
    print(f"{target.name}: {target.dtype}, {target.extra['kernels']} kernels")
    prompts = [target.encode(p.text, p.chat) for p in load_prompts("humaneval", a.batch)]
    one = run(target, prompts[:1], a.new_tokens)
    many = run(target, prompts, a.new_tokens)
    for r in (one, many):
        print(f"batch {r['rows']}: prefill {r['prefill_s']:.2f} s for {r['prompt_tokens']} prompt tokens "
              f"({1000 * r['prefill_s'] / r['prompt_tokens']:.1f} ms/token), median decode round "
              f"{r['decode_round_s']:.3f} s")
    print(f"a decode round at batch {a.batch} costs {many['decode_round_s'] / one['decode_round_s']:.2f}x one at batch 1")


if __name__ == "__main__":
    main()
