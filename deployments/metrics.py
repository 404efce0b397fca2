"""Prometheus metrics (`ray.serve.metrics`; Ray's exporter prefixes every name `ray_`, counters `_total`).

Two places record them, each where its facts are true:

* the **Router** (`Metrics`): per request, from the stats on its last chunk -- requests, latency
  and the speculation metrics, labelled by `mode` and `model`, with vLLM's names where they mean the
  same thing (`spec_decode_num_drafts`, `_num_draft_tokens`, `_num_accepted_tokens`,
  `_num_accepted_tokens_per_pos` with a `position` label). Counters add up over routers.
* each **target replica** (`EngineMetrics`): its batching engine's own state after every round
  (and while it idles: Ray drops a gauge that is not set again for some 20 s) -- batch size,
  current k, queue length, labelled by `model`; Serve adds `deployment`, `replica` and
  `application`. These are facts of one engine: a replica exports its own series, so several
  replicas never overwrite each other (a router-side gauge fed from chunks would show whichever
  replica finished a request last, and only when one finished). Not by mode: one round mixes
  ar and sd rows.

Times are in seconds and their names end in `_seconds`. `observations(stats, model)` and
`engine_observations(engine, model, rounds_seen)` say what is recorded, as plain data, so they are
tested without Ray. Serve's own queue metrics (`ray_serve_deployment_queued_queries`,
`ray_serve_replica_processing_queries`) count requests before they reach a replica's engine.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

from ray.serve.metrics import Counter, Gauge, Histogram

from specserve.serving.api import pb

log = logging.getLogger("ray.serve")

_LATENCY_BOUNDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_ITL_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
_BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SPEC = ("mode", "model")
PER_POS = SPEC + ("position",)
ENGINE = ("model",)


class Spec(NamedTuple):
    kind: str  # counter | gauge | histogram
    description: str
    bounds: list | None = None  # a histogram's bucket boundaries
    tags: tuple = SPEC


# The Router's, per request.
METRICS = {
    "specserve_tokens_generated": Spec("counter", "New tokens sent to clients."),
    "specserve_rounds": Spec("counter", "Verification rounds (target forwards)."),
    "specserve_spec_decode_num_drafts": Spec("counter", "Rounds that verified a non-empty draft (vLLM's name)."),
    "specserve_spec_decode_num_draft_tokens": Spec("counter", "Draft tokens proposed (vLLM's name)."),
    "specserve_spec_decode_num_accepted_tokens": Spec("counter", "Draft tokens accepted by the target (vLLM's name)."),
    "specserve_spec_decode_num_accepted_tokens_per_pos": Spec(
        "counter", "Rounds whose draft token at `position` (0-based) was accepted (vLLM's name).", tags=PER_POS),
    "specserve_speculation_cache_hits": Spec("counter", "SSD proposals served from the draft's speculation cache."),
    "specserve_speculation_cache_misses": Spec("counter", "SSD proposals drafted just in time."),
    "specserve_prefix_reused_tokens": Spec("counter", "Prompt tokens served from a session's KV cache."),
    "specserve_spec_decode_draft_length": Spec("gauge", "Mean draft length k of the last finished request."),
    "specserve_cache_hit_rate": Spec("gauge", "SSD speculation cache hit rate of the last finished request."),
    "specserve_ttft_seconds": Spec("histogram", "Time to first token in the target replica, seconds.",
                                   _LATENCY_BOUNDS),
    "specserve_inter_token_latency_seconds": Spec("histogram", "Mean time between output tokens after the first, "
                                                  "per request, seconds.", _ITL_BOUNDS),
}

# Each target replica's, per round of its batching engine.
ENGINE_METRICS = {
    "specserve_batch_size": Spec("histogram", "Rows (sequences) in each round of the target replica's batching "
                                 "engine.", _BATCH_BOUNDS, ENGINE),
    "specserve_batch_rows": Spec("counter", "Rows summed over the batching engine's rounds (over "
                                 "specserve_batch_size_count: the exact mean batch size).", tags=ENGINE),
    "specserve_engine_k": Spec("gauge", "The batching engine's current draft length k (its k policy; a request "
                               "with a fixed k uses its own).", tags=ENGINE),
    "specserve_queue_length": Spec("gauge", "Requests in the target replica waiting for a batching-engine slot.",
                                   tags=ENGINE),
}


def observations(stats: pb.Stats, model: str) -> list[tuple[str, float, dict]]:
    """What one finished generation adds: (metric, value, tags) for counters, gauges and histograms."""
    tags = {"mode": stats.mode or "unknown", "model": model}
    out = [("specserve_tokens_generated", stats.new_tokens, tags), ("specserve_rounds", stats.rounds, tags),
           ("specserve_spec_decode_num_drafts", stats.drafts, tags),
           ("specserve_spec_decode_num_draft_tokens", stats.draft_tokens, tags),
           ("specserve_spec_decode_num_accepted_tokens", stats.accepted_tokens, tags),
           ("specserve_speculation_cache_hits", stats.cache_hits, tags),
           ("specserve_speculation_cache_misses", stats.cache_misses, tags),
           ("specserve_prefix_reused_tokens", stats.prefix_reused, tags),
           ("specserve_ttft_seconds", stats.ttft_s, tags)]
    out += [("specserve_spec_decode_num_accepted_tokens_per_pos", n, {**tags, "position": str(i)})
            for i, n in enumerate(stats.accepted_per_pos)]
    if stats.draft_tokens:
        out.append(("specserve_spec_decode_draft_length", stats.draft_tokens / stats.rounds, tags))
    if stats.cache_hits + stats.cache_misses:
        out.append(("specserve_cache_hit_rate", stats.cache_hits / (stats.cache_hits + stats.cache_misses), tags))
    if stats.new_tokens > 1:
        out.append(("specserve_inter_token_latency_seconds",
                    max(0.0, stats.elapsed_s - stats.ttft_s) / (stats.new_tokens - 1), tags))
    return [(name, v, t) for name, v, t in out if v or METRICS[name].kind != "counter"]


def engine_observations(engine, model: str, rounds_seen: int) -> list[tuple[str, float, dict]]:
    """What a batching engine's latest step adds; the batch size only if a round ran since `rounds_seen`."""
    tags = {"model": model}
    out = [("specserve_engine_k", engine.policy.k, tags),
           ("specserve_queue_length", len(engine.scheduler.waiting), tags)]
    if engine.stats.rounds > rounds_seen:
        out += [("specserve_batch_size", engine.stats.last_batch, tags),
                ("specserve_batch_rows", engine.stats.last_batch, tags)]
    return out


def _build(table: dict[str, Spec]) -> dict:
    return {name: Histogram(name, s.description, boundaries=s.bounds, tag_keys=s.tags) if s.kind == "histogram"
            else (Counter if s.kind == "counter" else Gauge)(name, s.description, tag_keys=s.tags)
            for name, s in table.items()}


def _record(metrics: dict, obs: list[tuple[str, float, dict]]) -> None:
    for name, value, tags in obs:
        m = metrics[name]
        if isinstance(m, Counter):
            m.inc(value, tags)
        elif isinstance(m, Gauge):
            m.set(value, tags)
        else:
            m.observe(value, tags)


class Metrics:
    """The Router's: one call to `done` per finished request."""

    def __init__(self, model: str):
        self.model = model
        self.requests = Counter("specserve_requests", "Requests by method and status code.",
                                tag_keys=("method", "code"))
        self.latency = Histogram("specserve_request_latency_seconds", "Request latency in the router, seconds.",
                                 boundaries=_LATENCY_BOUNDS, tag_keys=("method",))
        self.spec = _build(METRICS)

    def done(self, method: str, code: str, t0: float, stats: pb.Stats | None) -> None:
        """Record one finished request (never fails it: metrics are best effort)."""
        try:
            self.requests.inc(1, {"method": method, "code": code})
            self.latency.observe(time.perf_counter() - t0, {"method": method})
            if stats is not None:
                _record(self.spec, observations(stats, self.model))
        except Exception:  # pragma: no cover
            log.exception("metrics failed")


class EngineMetrics:
    """A target replica's: its engine loop calls this after every step and while idle (~2 us a metric)."""

    def __init__(self, model: str):
        self.model = model
        self.metrics = _build(ENGINE_METRICS)
        self.rounds_seen = 0

    def __call__(self, engine) -> None:
        _record(self.metrics, engine_observations(engine, self.model, self.rounds_seen))
        self.rounds_seen = engine.stats.rounds
