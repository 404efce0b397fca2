"""What one finished request adds to the Router's Prometheus metrics (no Ray needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from deployments.metrics import METRICS, observations  # noqa: E402
from specserve.serving.api import pb  # noqa: E402


def _by_name(stats: pb.Stats) -> dict:
    return {name: (v, tags) for name, v, tags in observations(stats, "m")}


def test_speculation_metrics_use_vllms_names_with_mode_and_model_labels():
    st = pb.Stats(mode="ssd", new_tokens=11, rounds=4, draft_tokens=12, accepted_tokens=7, cache_hits=3,
                  cache_misses=1, ttft_s=0.5, elapsed_s=1.5, prompt_tokens=5)
    got = _by_name(st)
    assert got["specserve_spec_decode_num_drafts"][0] == 4
    assert got["specserve_spec_decode_num_draft_tokens"][0] == 12
    assert got["specserve_spec_decode_num_accepted_tokens"][0] == 7
    assert got["specserve_spec_decode_draft_length"][0] == 3.0
    assert got["specserve_cache_hit_rate"][0] == 0.75
    assert got["specserve_inter_token_latency_seconds"][0] == pytest.approx(0.1)
    assert all(tags == {"mode": "ssd", "model": "m"} for _, tags in got.values())


def test_ar_adds_no_draft_counts_and_every_time_is_in_seconds():
    got = _by_name(pb.Stats(mode="ar", new_tokens=1, rounds=1, ttft_s=0.2, elapsed_s=0.2))
    assert "specserve_spec_decode_num_drafts" not in got and "specserve_spec_decode_draft_length" not in got
    assert "specserve_inter_token_latency_seconds" not in got  # one token: no gap between tokens
    assert got["specserve_ttft_seconds"][0] == pytest.approx(0.2)
    assert all(name.endswith("_seconds") for name, (kind, _, _) in METRICS.items() if kind == "histogram")
