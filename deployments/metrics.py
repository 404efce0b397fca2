"""The Router's Prometheus metrics (`ray.serve.metrics`; Ray's exporter prefixes every name `ray_`).

Speculation metrics carry `mode` and `model` labels and vLLM's names where they mean the same
thing (`spec_decode_num_drafts`, `_num_draft_tokens`, `_num_accepted_tokens`); times are in
seconds and their names end in `_seconds`. `observations(stats, model)` says what one finished
request adds, as plain data, so it is tested without Ray. Queue lengths are Serve's own
(`ray_serve_deployment_queued_queries`, `ray_serve_replica_processing_queries`).
"""

from __future__ import annotations

import logging
import time

from ray.serve.metrics import Counter, Gauge, Histogram

from specserve.serving.api import pb

log = logging.getLogger("ray.serve")

_LATENCY_BOUNDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_ITL_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
SPEC = ("mode", "model")

# name -> (kind, description, boundaries for histograms)
METRICS = {
    "specserve_tokens_generated": ("counter", "New tokens sent to clients.", None),
    "specserve_rounds": ("counter", "Verification rounds (target forwards).", None),
    "specserve_spec_decode_num_drafts": ("counter", "Rounds that verified a draft proposal (vLLM's name).", None),
    "specserve_spec_decode_num_draft_tokens": ("counter", "Draft tokens proposed (vLLM's name).", None),
    "specserve_spec_decode_num_accepted_tokens": ("counter", "Draft tokens accepted by the target (vLLM's name).",
                                                  None),
    "specserve_speculation_cache_hits": ("counter", "SSD proposals served from the draft's speculation cache.", None),
    "specserve_speculation_cache_misses": ("counter", "SSD proposals drafted just in time.", None),
    "specserve_prefix_reused_tokens": ("counter", "Prompt tokens served from a session's KV cache.", None),
    "specserve_spec_decode_draft_length": ("gauge", "Mean draft length k of the last finished request.", None),
    "specserve_cache_hit_rate": ("gauge", "SSD speculation cache hit rate of the last finished request.", None),
    "specserve_ttft_seconds": ("histogram", "Time to first token in the target replica, seconds.", _LATENCY_BOUNDS),
    "specserve_inter_token_latency_seconds": ("histogram", "Mean time between output tokens after the first, "
                                                           "per request, seconds.", _ITL_BOUNDS),
}


def observations(stats: pb.Stats, model: str) -> list[tuple[str, float, dict]]:
    """What one finished generation adds: (metric, value, tags) for counters, gauges and histograms."""
    tags = {"mode": stats.mode or "unknown", "model": model}
    out = [("specserve_tokens_generated", stats.new_tokens, tags), ("specserve_rounds", stats.rounds, tags),
           ("specserve_spec_decode_num_draft_tokens", stats.draft_tokens, tags),
           ("specserve_spec_decode_num_accepted_tokens", stats.accepted_tokens, tags),
           ("specserve_speculation_cache_hits", stats.cache_hits, tags),
           ("specserve_speculation_cache_misses", stats.cache_misses, tags),
           ("specserve_prefix_reused_tokens", stats.prefix_reused, tags),
           ("specserve_ttft_seconds", stats.ttft_s, tags)]
    if stats.draft_tokens:
        out += [("specserve_spec_decode_num_drafts", stats.rounds, tags),
                ("specserve_spec_decode_draft_length", stats.draft_tokens / stats.rounds, tags)]
    if stats.cache_hits + stats.cache_misses:
        out.append(("specserve_cache_hit_rate", stats.cache_hits / (stats.cache_hits + stats.cache_misses), tags))
    if stats.new_tokens > 1:
        out.append(("specserve_inter_token_latency_seconds",
                    max(0.0, stats.elapsed_s - stats.ttft_s) / (stats.new_tokens - 1), tags))
    return [(name, v, t) for name, v, t in out if v or METRICS[name][0] != "counter"]


class Metrics:
    def __init__(self, model: str):
        self.model = model
        self.requests = Counter("specserve_requests", "Requests by method and status code.",
                                tag_keys=("method", "code"))
        self.latency = Histogram("specserve_request_latency_seconds", "Request latency in the router, seconds.",
                                 boundaries=_LATENCY_BOUNDS, tag_keys=("method",))
        self.spec = {}
        for name, (kind, desc, bounds) in METRICS.items():
            if kind == "histogram":
                self.spec[name] = Histogram(name, desc, boundaries=bounds, tag_keys=SPEC)
            else:
                self.spec[name] = (Counter if kind == "counter" else Gauge)(name, desc, tag_keys=SPEC)

    def done(self, method: str, code: str, t0: float, stats: pb.Stats | None) -> None:
        """Record one finished request (never fails it: metrics are best effort)."""
        try:
            self.requests.inc(1, {"method": method, "code": code})
            self.latency.observe(time.perf_counter() - t0, {"method": method})
            for name, value, tags in observations(stats, self.model) if stats is not None else ():
                m = self.spec[name]
                if isinstance(m, Counter):
                    m.inc(value, tags)
                elif isinstance(m, Gauge):
                    m.set(value, tags)
                else:
                    m.observe(value, tags)
        except Exception:  # pragma: no cover
            log.exception("metrics failed")
