"""`specserve bench-server`: the bench's prompts and table, measured through a running server.

Each request goes client -> Serve gRPC proxy -> Router -> Target replica (<-> Draft replica)
and back; tokens/s are counted on the client's clock, so they include every hop. The summary
adds `stack_overhead_ms`: the median per request of (client wall time - the target's own time),
i.e. what the serving stack costs on top of the engine's loop.

This module knows the public API client and the bench's records; it does not load models.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict

from .bench import Prompt, Record, _first_diff, summarize
from ..client import Client

__all__ = ["SERVER_MODES", "run_server_bench"]

SERVER_MODES = ("ar", "sd", "ssd")


def _one(client: Client, p: Prompt, mode: str, max_new: int, temperature: float, seed: int) -> tuple[Record, float]:
    t0 = time.perf_counter()
    reply = client.generate(p.text, chat=p.chat, max_tokens=max_new, mode=mode, temperature=temperature, seed=seed)
    wall = time.perf_counter() - t0
    s = reply.stats
    rec = Record(p.id, mode, prompt_tokens=s.prompt_tokens, new_tokens=s.new_tokens, elapsed_s=wall,
                 rounds=s.rounds, draft_tokens=s.draft_tokens, accepted_tokens=s.accepted_tokens,
                 cache_hits=s.cache_hits, cache_misses=s.cache_misses, fallback=s.fallback,
                 token_ids=list(reply.token_ids))
    return rec, wall - s.elapsed_s


def run_server_bench(client: Client, prompts: list[Prompt], modes: list[str], max_new_tokens: int = 128,
                     temperature: float = 0.0, seed: int = 0, warmup: bool = True, progress: bool = True) -> dict:
    """Every mode on every prompt through the server (interleaved, rotating order); records + summary."""
    from tqdm import tqdm

    bad = [m for m in modes if m not in SERVER_MODES]
    if bad:
        raise ValueError(f"--modes: unknown mode(s) {', '.join(bad)}; choose from {', '.join(SERVER_MODES)}")
    greedy = temperature == 0
    if "ar" not in modes and greedy:
        modes = ["ar", *modes]
    if warmup:
        for m in modes:
            _one(client, prompts[0], m, min(8, max_new_tokens), temperature, seed)
    records, overhead = [], {m: [] for m in modes}
    bar = tqdm(total=len(prompts) * len(modes), desc="bench-server", unit="req", disable=not progress, file=sys.stderr)
    for i, p in enumerate(prompts):
        got = {}
        for m in modes[i % len(modes):] + modes[: i % len(modes)]:
            got[m], extra = _one(client, p, m, max_new_tokens, temperature, seed + i)
            overhead[m].append(extra)
            bar.set_postfix_str(f"{p.id} {m} {got[m].tokens_per_s:.2f} tok/s")
            bar.update(1)
        if greedy:
            for m, r in got.items():
                if m != "ar":
                    r.mismatch_at = _first_diff(r.token_ids, got["ar"].token_ids)
        records += [got[m] for m in modes]
    bar.close()
    summary = summarize(records, modes, greedy)
    for m in modes:
        summary[m]["stack_overhead_ms"] = round(1000 * statistics.median(overhead[m]), 1)
    return {"config": {"address": client.address, "modes": modes, "prompts": len(prompts),
                       "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed},
            "summary": summary,
            "records": [asdict(r) | {"tokens_per_s": round(r.tokens_per_s, 3)} for r in records]}
