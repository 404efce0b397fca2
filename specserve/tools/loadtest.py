"""`specserve loadtest`: C concurrent streaming clients for S seconds against a running server.

Each client (its own gRPC channel, like separate users) loops over the prompts, streams a reply,
and records latency, time to first chunk, tokens, the status of every request and whether the
server resumed it after a target replica failed (`stats.resumed`). Greedy replies are checked for
exactness: every reply to the same prompt and mode must equal the first one.
The run stops at the deadline or after `max_requests`; requests in flight then finish.

This module knows the public API client and clocks; it does not know Ray or models.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..client import Client, ClientError

__all__ = ["LoadResult", "run_load", "format_load"]


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float = 0.0
    requests: int = 0
    ok: int = 0
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)  # status code -> count
    error_examples: dict = field(default_factory=dict)  # status code -> one message
    mismatches: int = 0  # greedy replies that differ from the first reply to the same prompt
    resumed: int = 0  # requests the server resumed on another target replica (stats.resumed > 0)
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        def pct(xs, q):
            if not xs:
                return 0.0
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))]

        return {
            "concurrency": self.concurrency, "duration_s": round(self.duration_s, 2),
            "requests": self.requests, "ok": self.ok, "errors": dict(self.errors),
            "error_examples": self.error_examples, "mismatches": self.mismatches, "resumed": self.resumed,
            "requests_per_s": round(self.requests / self.duration_s, 3) if self.duration_s else 0.0,
            "tokens_per_s": round(self.tokens / self.duration_s, 2) if self.duration_s else 0.0,
            "latency_s": {q: round(pct(self.latency_s, v), 4) for q, v in (("p50", .5), ("p90", .9), ("p99", .99))},
            "ttft_s": {q: round(pct(self.ttft_s, v), 4) for q, v in (("p50", .5), ("p90", .9), ("p99", .99))},
            "latency_mean_s": round(statistics.fmean(self.latency_s), 4) if self.latency_s else 0.0,
        }


def run_load(address: str, prompts: list[str], concurrency: int = 8, duration_s: float = 30.0,
             max_tokens: int = 32, mode: str | None = None, temperature: float = 0.0,
             max_requests: int | None = None, token: str | None = None, timeout: float = 120.0) -> LoadResult:
    """Drive the server; return what happened (never raises for a failed request: it counts it)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    if duration_s <= 0:
        raise ValueError(f"--duration must be > 0 seconds, got {duration_s}")
    if not prompts:
        raise ValueError("--prompts: no prompts to send")
    res = LoadResult(concurrency)
    lock = threading.Lock()
    reference: dict[tuple[str, str | None], list[int]] = {}
    issued = [0]
    t_end = time.monotonic() + duration_s

    def take() -> int | None:
        with lock:
            if time.monotonic() >= t_end or (max_requests is not None and issued[0] >= max_requests):
                return None
            issued[0] += 1
            return issued[0] - 1

    def client_loop(cid: int) -> None:
        with Client(address, timeout=timeout, token=token) as c:
            while (n := take()) is not None:
                prompt = prompts[(n + cid) % len(prompts)]
                t0 = time.perf_counter()
                first, ids, code, msg, resumed = None, [], "OK", "", 0
                try:
                    for chunk in c.stream(prompt, max_tokens=max_tokens, mode=mode, temperature=temperature):
                        if first is None:
                            first = time.perf_counter() - t0
                        ids += chunk.token_ids
                        resumed = chunk.stats.resumed if chunk.HasField("stats") else resumed
                except ClientError as e:
                    code, msg = e.code, e.details
                lat = time.perf_counter() - t0
                with lock:
                    res.requests += 1
                    if code != "OK":
                        res.errors[code] += 1
                        res.error_examples.setdefault(code, msg[:300])
                        continue
                    res.ok += 1
                    res.resumed += resumed > 0
                    res.tokens += len(ids)
                    res.latency_s.append(lat)
                    res.ttft_s.append(first if first is not None else lat)
                    if temperature == 0:
                        ref = reference.setdefault((prompt, mode), ids)
                        res.mismatches += ref != ids

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.duration_s = time.monotonic() - t0
    return res


def format_load(s: dict) -> str:
    lines = [
        f"{s['requests']} requests in {s['duration_s']} s from {s['concurrency']} concurrent streams: "
        f"{s['requests_per_s']} req/s, {s['tokens_per_s']} tokens/s",
        f"latency p50 {s['latency_s']['p50']} s, p90 {s['latency_s']['p90']} s, p99 {s['latency_s']['p99']} s; "
        f"time to first chunk p50 {s['ttft_s']['p50']} s, p99 {s['ttft_s']['p99']} s",
        f"ok {s['ok']} ({s['resumed']} resumed after a target replica failed), errors {s['errors'] or 0}, "
        f"greedy mismatches {s['mismatches']}",
    ]
    for code, msg in s["error_examples"].items():
        lines.append(f"  {code}: {msg}")
    return "\n".join(lines)
