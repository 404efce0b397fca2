"""What the draft worker's speculation costs the target's verify when they share the machine (SSD).

SSD runs the target and the draft worker side by side, one core each. Their forwards are
memory-bound, so a draft speculating on the other core can slow the target's verify down. This
script times the target's verify-shaped forward (`--tokens` tokens after a `--context`-token
prefix, through the engine's `NativeRunner`, 1 thread on core 0) three ways: alone, then while a
second process on core 1 runs the draft's speculation-shaped forwards (`--branches` rows of one
token) back to back, then alone again. The ratio busy/alone is what SSD pays on each verify; a
machine where the two have separate memory systems (GPUs, two hosts) pays nothing. One process
of each model at a time (the fp32 1.5B target is ~7 GB).

    PYTHONPATH=. python scripts/verify_contention.py
    PYTHONPATH=. python scripts/verify_contention.py --target models/tiny/target --draft models/tiny/draft-random --reps 5
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time

from specserve.engine.lm import load_model
from specserve.engine.runner import NativeRunner, TreeRow
from specserve.engine.slot_cache import SlotCache


def _runner(lm, slots: int, cols: int) -> NativeRunner:
    return NativeRunner(lm.model, SlotCache.for_model(lm.model, slots, cols))


def _draft_load(name: str, branches: int, context: int, ready, stop) -> None:
    """Core 1: the draft's speculation-shaped forwards, back to back until `stop` is set."""
    os.sched_setaffinity(0, {os.cpu_count() - 1})
    draft = load_model(name, threads=1, quantize="int8")
    run = _runner(draft, branches, context + 2)
    run.forward_rows([TreeRow.causal(s, [1] * context, 0, 1) for s in range(branches)])
    ready.set()
    while not stop.is_set():
        run.forward_rows([TreeRow.causal(s, [1], context, 1) for s in range(branches)])


def _verify_ms(run: NativeRunner, tokens: int, context: int, reps: int) -> float:
    times = []
    for _ in range(reps + 2):
        t = time.perf_counter()
        run.forward_rows([TreeRow.causal(0, [1] * tokens, context, tokens)])  # the same columns each time
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=5, help="tokens a verify feeds (k + 1; default 5)")
    ap.add_argument("--context", type=int, default=150, help="tokens already in the cache (default 150)")
    ap.add_argument("--branches", type=int, default=8, help="rows of the draft's forward (default 8, the fan-out budget)")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two cores: the target on one, the draft on the other")
    os.sched_setaffinity(0, {0})
    target = load_model(a.target, threads=1)
    run = _runner(target, 1, a.context + a.tokens + 2)
    run.forward_rows([TreeRow.causal(0, [1] * a.context, 0, 1)])
    alone = _verify_ms(run, a.tokens, a.context, a.reps)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_draft_load, args=(a.draft, a.branches, a.context, ready, stop), daemon=True)
    p.start()
    try:
        if not ready.wait(600):
            raise SystemExit("the draft process did not start in 10 minutes")
        busy = _verify_ms(run, a.tokens, a.context, a.reps)
    finally:
        stop.set()
        p.join(60)
    again = _verify_ms(run, a.tokens, a.context, a.reps)
    print(f"{target.name}: a verify of {a.tokens} tokens after {a.context}, 1 thread: alone {alone:.0f} ms, "
          f"beside the draft's {a.branches}-row forwards {busy:.0f} ms, alone again {again:.0f} ms: "
          f"x{busy / ((alone + again) / 2):.2f} under speculation")


if __name__ == "__main__":
    main()
