"""The Prometheus metrics: what a request and an engine round add (plain data, no Ray), then for real.

The live test runs one Serve application for the module (tiny models, one target replica with a
local draft, one draft replica) and scrapes Ray's Prometheus endpoint after sd, ssd and ar requests.
"""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray")

from deployments.metrics import ENGINE_METRICS, METRICS, engine_observations, observations  # noqa: E402
from specserve.client import Client  # noqa: E402
from specserve.engine.engine import Engine  # noqa: E402
from specserve.engine.sampling import SamplingParams  # noqa: E402
from specserve.engine.sequence import Request, SpeculationParams  # noqa: E402
from specserve.engine.speculative import Stats  # noqa: E402
from specserve.serving.api import pb, stats_message  # noqa: E402

from serve_helpers import deployment_stats, free_port, serve_app, tiny_config  # noqa: E402

PROMPTS = ["def add(a, b):", "The quick brown fox", "class Stack:", "x = [1, 2, 3]"]


def _by_name(stats: pb.Stats) -> dict:
    return {(name, tags.get("position")): (v, tags) for name, v, tags in observations(stats, "m")}


def test_speculation_metrics_use_vllms_names_with_mode_and_model_labels():
    st = pb.Stats(mode="ssd", new_tokens=11, rounds=4, drafts=3, draft_tokens=12, accepted_tokens=7, cache_hits=3,
                  cache_misses=1, ttft_s=0.5, elapsed_s=1.5, prompt_tokens=5, accepted_per_pos=[3, 3, 1])
    got = _by_name(st)
    assert got["specserve_spec_decode_num_drafts", None][0] == 3  # rounds that drafted, not every round
    assert got["specserve_spec_decode_num_draft_tokens", None][0] == 12
    assert got["specserve_spec_decode_num_accepted_tokens", None][0] == 7
    per_pos = "specserve_spec_decode_num_accepted_tokens_per_pos"
    assert [got[per_pos, str(i)][0] for i in range(3)] == [3, 3, 1] and (per_pos, "3") not in got
    assert got["specserve_spec_decode_draft_length", None][0] == 3.0
    assert got["specserve_cache_hit_rate", None][0] == 0.75
    assert got["specserve_inter_token_latency_seconds", None][0] == pytest.approx(0.1)
    assert all({k: v for k, v in tags.items() if k != "position"} == {"mode": "ssd", "model": "m"}
               for _, tags in got.values())


def test_ar_adds_no_draft_counts_and_every_time_is_in_seconds():
    got = _by_name(pb.Stats(mode="ar", new_tokens=1, rounds=1, ttft_s=0.2, elapsed_s=0.2))
    assert not any(name.startswith("specserve_spec_decode_") for name, _ in got)
    assert ("specserve_inter_token_latency_seconds", None) not in got  # one token: no gap between tokens
    assert got["specserve_ttft_seconds", None][0] == pytest.approx(0.2)
    for name, s in {**METRICS, **ENGINE_METRICS}.items():
        assert name.endswith("_seconds") == ("seconds" in s.description), name


def test_per_position_counts_come_from_the_round_trace_and_reach_the_reply():
    st = Stats(rounds=5, draft_tokens=14, accepted_tokens=6, accepted_per_round=[3, 0, 2, 1, 0],
               drafted_per_round=[4, 4, 4, 2, 0])
    assert st.accepted_per_pos == [3, 2, 1] and st.drafts == 4
    msg = stats_message({**st.to_dict(), "mode": "sd"})
    assert list(msg.accepted_per_pos) == [3, 2, 1] and msg.drafts == 4
    assert Stats().accepted_per_pos == [] and Stats(accepted_per_round=[0, 0]).accepted_per_pos == []


def test_engine_observations_follow_every_round_of_a_real_engine(tiny):
    """Sampled sd on the random draft: partial acceptance, rows joining and leaving the batch."""
    eng = Engine(tiny["target"], tiny["draft-random"], max_num_seqs=3, max_model_len=256, probe=False,
                 stop_prob=0.0)  # the tiny draft doubts every token: no early stop, or every draft is 1 long
    ids = tiny["target"].encode("def add(a, b):")
    seqs = [eng.seqs[eng.add(Request(ids, 12 + 4 * i, SamplingParams(temperature=1.0), seed=i,
                                     spec=SpeculationParams("sd")))] for i in range(4)]
    batches, queue, seen = [], [], 0
    while eng.has_work():
        eng.step()
        for name, value, tags in engine_observations(eng, "m", seen):
            assert tags == {"model": "m"}
            if name == "specserve_batch_size":
                batches.append(value)
            elif name == "specserve_batch_rows":
                assert value == batches[-1]
            elif name == "specserve_engine_k":
                assert 0 <= value <= eng.policy.k_max
            else:
                assert name == "specserve_queue_length"
                queue.append(value)
        seen = eng.stats.rounds
    assert len(batches) == eng.stats.rounds and sum(batches) == eng.stats.row_rounds
    assert min(batches) >= 1 and max(batches) == 3 and max(queue) == 1 and queue[-1] == 0  # a fourth waited
    for s in seqs:
        pos = s.stats.accepted_per_pos
        assert sum(pos) == s.stats.accepted_tokens and all(a >= b for a, b in zip(pos, pos[1:])), pos
    assert any(0 < s.stats.accepted_tokens < s.stats.draft_tokens for s in seqs)  # not all or nothing


def test_the_engine_loop_calls_its_hook_while_idle_and_drops_one_that_raises(tiny):
    """Idle calls keep a replica's gauges fresh (Ray drops a gauge that is not set again for ~20 s)."""
    from specserve.serving.engine_loop import EngineLoop

    calls = []
    loop = EngineLoop(Engine(tiny["target"], None, max_num_seqs=1, max_model_len=64, probe=False), idle_s=0.02,
                      on_step=lambda eng: calls.append(eng.stats.rounds))
    try:
        time.sleep(0.3)
        assert len(calls) >= 3 and set(calls) == {0}  # no work, no round: only the gauges are set again
        loop.on_step = lambda eng: 1 / 0
        time.sleep(0.1)
        assert loop.on_step is None  # logged once, then no longer called
    finally:
        loop.close()


# ---------------------------------------------------------------------------- scraped from Ray


@pytest.fixture(scope="module")
def app(tiny_dir):
    cfg = tiny_config(tiny_dir)
    cfg["draft"]["model"] = str(tiny_dir / "draft-random")  # sampled: partial acceptance, per position
    cfg["target"]["stop_prob"] = 0.0  # the tiny draft doubts every token: without this every draft is 1 long
    port = free_port()
    with serve_app(cfg, metrics_port=port) as address:
        yield address, f"http://127.0.0.1:{port}/metrics"


def _scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    """{sample name: [(labels, value)]} of the specserve_ series on Ray's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name.startswith("ray_specserve_"):
                out.setdefault(s.name[len("ray_"):], []).append((s.labels, s.value))
    return out


def _value(got: dict, name: str, **labels) -> float:
    """The sum of a sample's series whose labels include `labels` (0.0 when there is none)."""
    return sum(v for lab, v in got.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_scraped_metrics_after_sd_ssd_and_ar_requests(app):
    address, url = app
    with Client(address, timeout=120) as c, ThreadPoolExecutor(len(PROMPTS)) as pool:
        sd = list(pool.map(lambda i: c.generate(PROMPTS[i], max_tokens=22, mode="sd", k=3, temperature=1.0,
                                                seed=i).stats, range(len(PROMPTS))))  # at once: shared rounds
        ssd = c.generate(PROMPTS[0], max_tokens=12, mode="ssd").stats
        c.generate(PROMPTS[1], max_tokens=8, mode="ar")
    engine = deployment_stats("TargetDeployment")[0]["engine"]  # idle now: its counts are final
    assert all(s.mode == "sd" and s.drafts > 0 for s in sd) and ssd.mode == "ssd"
    width = max(len(s.accepted_per_pos) for s in sd)
    want_pos = [sum(s.accepted_per_pos[i] for s in sd if i < len(s.accepted_per_pos)) for i in range(width)]
    want = {"accepted": sum(s.accepted_tokens for s in sd), "drafts": sum(s.drafts for s in sd),
            "draft_tokens": sum(s.draft_tokens for s in sd), "rounds": engine["rounds"]}
    assert want["accepted"] > 0, want

    sd_tags = {"mode": "sd", "model": "target"}
    got, t_end = {}, time.monotonic() + 60
    while time.monotonic() < t_end:  # Ray exports every 0.5 s (serve_app's metrics_port)
        got = _scrape(url)
        if (_value(got, "specserve_spec_decode_num_accepted_tokens_total", **sd_tags) == want["accepted"]
                and _value(got, "specserve_batch_size_count") == want["rounds"]
                and any(lab.get("mode") == "ssd" for lab, _ in got.get("specserve_cache_hit_rate", []))
                and all({lab["mode"] for lab, _ in got.get(name, [])} == {"ar", "sd", "ssd"}
                        for name in ("specserve_inter_token_latency_seconds_count", "specserve_ttft_seconds_count"))):
            # the ar request's stats are recorded as its stream closes, so they may be a scrape behind
            break
        time.sleep(0.5)
    per_pos = "specserve_spec_decode_num_accepted_tokens_per_pos_total"
    pos = [_value(got, per_pos, position=str(i), **sd_tags) for i in range(width + 1)]
    assert pos == want_pos + [0.0], (pos, want_pos)
    assert sum(pos) == _value(got, "specserve_spec_decode_num_accepted_tokens_total", **sd_tags) == want["accepted"]
    assert all(a >= b for a, b in zip(pos, pos[1:])) and pos[0] > pos[width - 1], pos
    assert _value(got, "specserve_spec_decode_num_drafts_total", **sd_tags) == want["drafts"]
    assert _value(got, "specserve_spec_decode_num_draft_tokens_total", **sd_tags) == want["draft_tokens"]

    # the engine's own, per replica: every round's batch size, k within the policy's range, the queue
    assert _value(got, "specserve_batch_size_count") == want["rounds"] > 0
    # Ray rebuilds a histogram's _sum from bucket midpoints; the rows counter is exact
    assert _value(got, "specserve_batch_rows_total") == engine["row_rounds"] >= want["rounds"]
    assert _value(got, "specserve_batch_size_bucket", le="8.0") == want["rounds"]  # max_num_seqs is 8
    (k_labels, k), = got["specserve_engine_k"]
    assert k == engine["k"] and 0 <= k <= engine["k_max"]
    assert k_labels["model"] == "target" and k_labels["replica"] and k_labels["deployment"] == "TargetDeployment"
    assert _value(got, "specserve_queue_length") == 0 == engine["waiting"]

    # the rest of the list, with their units and labels
    ssd_rate = _value(got, "specserve_cache_hit_rate", mode="ssd", model="target")
    assert ssd_rate == pytest.approx(ssd.cache_hit_rate, abs=1e-6) and 0 <= ssd_rate <= 1
    for name in ("specserve_inter_token_latency_seconds_count", "specserve_ttft_seconds_count"):
        assert {lab["mode"] for lab, _ in got[name]} == {"ar", "sd", "ssd"}, name
        assert all(lab["model"] == "target" for lab, _ in got[name]), name
