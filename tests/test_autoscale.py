"""Serve's autoscaling of the target pool, for real: a burst adds a replica, quiet takes it away.

Tiny models on local Ray (2 CPUs, fractional num_cpus), requests through the public gRPC API.
The target deployment scales between 1 and 2 replicas with target_ongoing_requests 1 and short
up/down-scale delays (the AppConfig fields the RayService's serveConfigV2 carries too); there is no
draft deployment, so only the target pool scales. To make a burst of seconds count, Serve's
metrics interval and look-back window (autoscaling_config keys AppConfig does not carry) are
shortened for this test only.
"""

from __future__ import annotations

import threading
import time

import pytest

from specserve.client import Client

from serve_helpers import serve_app

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

APP = "autoscale"
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 300
FAST_METRICS = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0}


@pytest.fixture(scope="module")
def app(tiny_dir):
    from deployments.config import Replicas

    cfg = {
        "target": {"model": str(tiny_dir / "target"), "threads": 1, "local_draft": False, "max_num_seqs": 4,
                   "replicas": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                "max_ongoing_requests": 4, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0,
                                "num_cpus": 0.5}},
        "draft": None,
        "router": {"num_cpus": 0.1},
        "limits": {"max_tokens": MAX_TOKENS},
    }
    with pytest.MonkeyPatch.context() as mp:
        options = Replicas.options
        mp.setattr(Replicas, "options", lambda self: _fast_metrics(options(self)))
        with serve_app(cfg, APP) as address:
            yield address


def _fast_metrics(opts: dict) -> dict:
    opts["autoscaling_config"].update(FAST_METRICS)
    return opts


def _target_replicas() -> dict[str, int]:
    dep = serve.status().applications[APP].deployments["TargetDeployment"]
    return {str(getattr(k, "value", k)): n for k, n in dep.replica_states.items() if n}


def _wait_for(pred, timeout: float, what: str, seen: list | None = None) -> float:
    """Poll serve.status() until pred(target replica states); `seen` collects (seconds, states) changes."""
    seen = [] if seen is None else seen
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        state = _target_replicas()
        if not seen or seen[-1][1] != state:
            seen.append((round(time.monotonic() - t0, 1), state))
        if pred(state):
            return time.monotonic() - t0
        time.sleep(0.25)
    pytest.fail(f"{what} within {timeout} s; target replicas went {seen}")


def test_a_burst_adds_a_target_replica_and_quiet_removes_it(app):
    _wait_for(lambda s: s == {"RUNNING": 1}, 30, "one running target replica at start")
    with Client(app, timeout=120) as c:
        first = [t for ch in c.stream(PROMPT, max_tokens=MAX_TOKENS, mode="ar") for t in ch.token_ids]
    assert len(first) == MAX_TOKENS

    stop, lock = threading.Event(), threading.Lock()
    outputs: list[list[int]] = []
    errors: list[BaseException] = []
    replicas: set[str] = set()

    def burst():
        with Client(app, timeout=120) as c:
            while not stop.is_set():
                try:
                    chunks = list(c.stream(PROMPT, max_tokens=MAX_TOKENS, mode="ar"))
                except Exception as e:  # any failed request fails the test
                    with lock:
                        errors.append(e)
                    return
                with lock:
                    outputs.append([t for ch in chunks for t in ch.token_ids])
                    replicas.add(chunks[-1].stats.replica)

    threads = [threading.Thread(target=burst, daemon=True) for _ in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    seen: list = []
    try:
        up_s = _wait_for(lambda s: s.get("RUNNING", 0) == 2, 45, "Serve did not add a second replica", seen)
        deadline = time.monotonic() + 15  # keep the burst on until the new replica has served
        while time.monotonic() < deadline and len(replicas) < 2 and not errors:
            time.sleep(0.25)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    burst_s = time.monotonic() - t0
    assert not errors, errors
    assert outputs and all(o == first for o in outputs), "a request's output differs from the first one's"
    assert len(replicas) == 2, f"only {replicas} served the burst"
    assert max(sum(s.values()) for _, s in seen) == 2  # never more than max_replicas
    down_s = _wait_for(lambda s: s == {"RUNNING": 1}, 45, "Serve did not go back to one replica")
    print(f"\nburst: target replicas {seen}; {len(outputs)} requests in {burst_s:.1f} s; "
          f"two running {up_s:.1f} s into the burst, one again {down_s:.1f} s after it")
