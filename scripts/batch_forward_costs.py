"""Time one batched target forward: the native runner vs transformers' batch-expanded DynamicCache.

Random weights from the real Qwen2.5-Coder-1.5B config (no download), fp32, packed linears as
load_model does. Rows x new tokens in {1,4,8} x {1,3,5}, a 128-token cache per row, median of
--reps, at 1 and 2 threads; then a 300-token prefill alone vs beside 8 rows verifying 5.
Prints a markdown table. Run one such process at a time (the model is ~7 GB in fp32).

    PYTHONPATH=. python scripts/batch_forward_costs.py [--reps 4] [--small]
"""

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from specserve.engine.kernels import pack_linears
from specserve.engine.runner import make_runner

REAL_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=32768, rope_theta=1000000.0, use_sliding_window=False)


def build(small: bool):
    cfg = dict(REAL_1_5B)
    if small:
        cfg.update(num_hidden_layers=2, vocab_size=4096)
    torch.manual_seed(0)
    with torch.no_grad():
        model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    pack_linears(model)
    return model


def interleaved(fns, reps):
    """Time each fn `reps` times, alternating between them so that both see the same machine load;
    return (median ms, min ms) per fn."""
    for fn in fns:
        fn()  # warm-up
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append((time.perf_counter() - t0) * 1000)
    return [(statistics.median(t), min(t)) for t in ts]


def hf_step(model, ctx, B, T):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ctx[None], cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(B)
    x = torch.randint(0, model.config.vocab_size, (B, T))

    @torch.inference_mode()
    def step():
        model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=T)
        cache.crop(-T)  # transformers>=5: negative = tokens to remove
    return step


def native_step(runner, slots, B, T, base=128):
    x = torch.randint(0, runner.model.config.vocab_size, (B * T,))

    def step():
        runner.forward(slots[:B], x, [T] * B, [T] * B)
        for s in slots[:B]:
            runner.cache.set_length(s, base)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="2 layers, small vocab: a smoke run")
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()
    model = build(a.small)
    V = model.config.vocab_size
    ctx = torch.randint(0, V, (128,))
    runner = make_runner(model, 9, 512)
    slots = [runner.cache.alloc() for _ in range(9)]
    runner.forward(slots, ctx.repeat(9), [128] * 9, [1] * 9)  # a 128-token cache in every slot
    shapes = [(b, t) for b in (1, 4, 8) for t in (1, 3, 5)]
    head = "| threads | impl | " + " | ".join(f"{b}x{t}" for b, t in shapes) + " |"
    print(head + "\n|---|---|" + "---|" * len(shapes), flush=True)
    for th in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(th)
        res = [interleaved([native_step(runner, slots, b, t), hf_step(model, ctx, b, t)], a.reps) for b, t in shapes]
        for i, name in enumerate(("native", "transformers")):
            print(f"| {th} | {name} median (min) | " + " | ".join(f"{r[i][0]:.0f} ({r[i][1]:.0f})" for r in res) + " |",
                  flush=True)
    torch.set_num_threads(int(a.threads.split(",")[-1]))
    prompt = torch.randint(0, V, (300,))

    def prefill_alone():
        runner.cache.set_length(slots[8], 0)
        runner.forward([slots[8]], prompt, [300], [1])

    def prefill_mixed():
        runner.cache.set_length(slots[8], 0)
        runner.forward(slots, torch.cat([torch.randint(0, V, (40,)), prompt]), [5] * 8 + [300], [5] * 8 + [1])
        for s in slots[:8]:
            runner.cache.set_length(s, 128)
    (alone, _), (verify, _), (mixed, _) = interleaved([prefill_alone, native_step(runner, slots, 8, 5), prefill_mixed],
                                                      a.reps)
    print(f"\n{th} threads, native, median: 300-token prefill alone {alone:.0f} ms; 8x5 verify alone {verify:.0f} ms; "
          f"both in one forward {mixed:.0f} ms (vs {alone + verify:.0f} ms as two forwards)", flush=True)


if __name__ == "__main__":
    main()
