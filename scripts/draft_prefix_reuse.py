"""What a chat turn's ssd Start costs the draft worker, with the conversation's KV kept or not.

A local draft worker (its own process and core, int8, as `specserve serve` runs it) gets turn 1
(`--history` tokens of HumanEval prompts, joined) with a cache key, then turn 2 (turn 1 + its
proposal + a 20-token message) twice: with the key (the parked slot keeps the common prefix) and
without (a full prefill). Prints the Start's latency (the target's wait for its first proposal,
which every row of the batch shares) for each, median of `--reps`.

    PYTHONPATH=. python scripts/draft_prefix_reuse.py --draft qwen2.5-coder-0.5b
"""

import argparse
import statistics
import time

from transformers import AutoTokenizer

from specserve.models.registry import resolve_model
from specserve.pipeline.local_draft_worker import LocalDraftWorker
from specserve.pipeline.remote_drafter import DraftClient
from specserve.pipeline.wire import spec_params
from specserve.tools.bench import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--history", type=int, default=1000, help="tokens of conversation before turn 2's message")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve_model(a.draft))
    ids = [t for p in load_prompts("humaneval", 40) for t in tok(p.text)["input_ids"]]
    if len(ids) < a.history + 20:
        raise SystemExit(f"--history {a.history}: only {len(ids)} tokens of prompts to join")
    history, message = ids[:a.history], ids[a.history:a.history + 20]
    worker = LocalDraftWorker(a.draft, quantize="int8")
    times: dict[str, list[float]] = {"with the key": [], "without": []}
    try:
        with DraftClient(worker.address, timeout=600) as client:
            params = spec_params(k=4)
            for rep in range(a.reps):
                key = f"conv-{rep}"
                first = client.start(f"t1-{rep}", history, params, cache_key=key)
                client.stop(f"t1-{rep}")
                turn2 = history + first.token_ids + message
                for name, k in (("with the key", key), ("without", "")):
                    t0 = time.perf_counter()
                    client.start(f"t2-{rep}-{bool(k)}", turn2, params, cache_key=k)
                    times[name].append(time.perf_counter() - t0)
                    client.stop(f"t2-{rep}-{bool(k)}")
    finally:
        worker.close()
    print(f"turn 2 = {a.history} history tokens + {len(first.token_ids)} proposed + {len(message)} new "
          f"({a.draft}, int8, one core; median of {a.reps})")
    print("| turn 2's Start | latency |\n|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
