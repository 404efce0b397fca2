"""Measure a cost table: `NativeRunner.forward` times of random-weight models of the real pair's shapes.

No download: the models are built from configs (Qwen2.5-Coder-1.5B as target, 0.5B as draft) with
random weights, which cost what trained ones cost. For each of rows x tokens (default {1, 8, 32} x
{1, 5}; the draft also at 8 x those rows, a batch's speculation branches) every row holds a `ctx`-token context (128) and the forward appends `tokens` tokens to each
row, keeping all their logits, as a verify round does; after `warmup` untimed calls, `reps` timed
calls (>= 10 by default), each between two device synchronizations, give the median in ms. The
result is a `CostTable` (tools/cost_table.py). `quick` swaps in tiny shapes so that the same code
runs in a CPU test in seconds.

This module builds models and times forwards; it knows nothing of decoding or scheduling.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..engine.defaults import FANOUT_BUDGET
from ..engine.device import synchronize
from ..engine.lm import DTYPES
from ..engine.runner import make_runner
from .cost_table import CostTable, key

__all__ = ["SHAPES", "QUICK_SHAPES", "build_random", "time_forward", "measure", "branch_rows", "measure_pair"]

_COMMON = dict(tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768,
               use_sliding_window=False)
SHAPES = {
    "target": dict(_COMMON, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2),  # Qwen2.5-Coder-1.5B
    "draft": dict(_COMMON, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2),  # Qwen2.5-Coder-0.5B
}
QUICK_SHAPES = {
    "target": dict(_COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2),
    "draft": dict(_COMMON, vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1),
}


def build_random(shape: dict, device: str, dtype: str, seed: int = 0):
    """A Qwen2 causal LM of `shape` with random weights, built on `device` in `dtype`, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), torch.no_grad():
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(DTYPES[dtype])
    return model.eval()


def time_forward(runner, rows: int, tokens: int, ctx: int, warmup: int, reps: int, seed: int = 0) -> float:
    """Median ms of one forward of `rows` rows x `tokens` new tokens over a `ctx`-token context each."""
    cache, dev = runner.cache, runner.cache.device
    vocab = runner.model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    slots = [cache.alloc() for _ in range(rows)]
    try:
        context = torch.randint(0, vocab, (rows * ctx,), generator=g).to(dev)
        runner.forward(slots, context, [ctx] * rows, [1] * rows)
        x = torch.randint(0, vocab, (rows * tokens,), generator=g).to(dev)
        times = []
        for i in range(warmup + reps):
            synchronize(dev)
            t0 = time.perf_counter()
            runner.forward(slots, x, [tokens] * rows, [tokens] * rows)
            synchronize(dev)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
            for s in slots:
                cache.set_length(s, ctx)  # roll back: every call sees the same context
        return statistics.median(times)
    finally:
        for s in slots:
            cache.free(s)


def measure(model, rows: list[int], tokens: list[int], ctx: int, warmup: int, reps: int,
            log=print) -> dict[str, float]:
    """{"ROWSxTOKENS": median ms} for every rows x tokens pair, through one NativeRunner."""
    runner = make_runner(model, max(rows), ctx + max(tokens), native=True)
    out = {}
    for r in rows:
        for t in tokens:
            out[key(r, t)] = round(time_forward(runner, r, t, ctx, warmup, reps), 4)
            log(f"  {key(r, t):>6}: {out[key(r, t)]:.3f} ms")
    del runner
    return out


def branch_rows(rows, branches: int = FANOUT_BUDGET) -> list[int]:
    """The draft's rows to time for target batches of `rows`: those, and `branches` x each (an ssd
    speculation step drafts every row's branches in one forward, which `simulate --costs` prices)."""
    return sorted({r for r in rows} | {branches * r for r in rows})


def measure_pair(device: str, dtype: str, quick: bool = False, rows=(1, 8, 32), tokens=(1, 5), ctx: int = 128,
                 warmup: int = 3, reps: int = 10, log=print, draft_rows=None) -> CostTable:
    """Build the target, measure it, free it, then the draft: a CostTable (one model in memory at a time).

    draft_rows: the draft's rows (default `branch_rows(rows)`)."""
    if reps < 1 or warmup < 0 or ctx < 1:
        raise ValueError(f"reps must be >= 1, warmup >= 0 and ctx >= 1, got {reps}, {warmup}, {ctx}")
    shapes = QUICK_SHAPES if quick else SHAPES
    tables, grid = {}, {"target": sorted(rows), "draft": sorted(draft_rows or branch_rows(rows))}
    for name in ("target", "draft"):
        log(f"{name}: random weights, {'quick' if quick else 'real'} shape, {dtype} on {device}")
        model = build_random(shapes[name], device, dtype)
        tables[name] = measure(model, grid[name], sorted(tokens), ctx, warmup, reps, log)
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else device
    meta = {"shapes": "quick" if quick else "Qwen2.5-Coder-1.5B / 0.5B configs, random weights",
            "context_tokens": ctx, "warmup": warmup, "reps": reps, "statistic": "median ms of one forward",
            "runner": "NativeRunner", "torch": torch.__version__}
    return CostTable(device=name, dtype=dtype, target=tables["target"], draft=tables["draft"], meta=meta)
