"""Start and stop a real Ray Serve application for a test module (Ray + Serve take ~20 s)."""

from __future__ import annotations

import contextlib
import socket
import time

APP = "specserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(tiny_dir, target_replicas: dict | None = None, **top) -> dict:
    """An AppConfig dict for the tiny pair: target + draft-same (ssd) on small CPU shares, `top` on top."""
    draft = {"model": str(tiny_dir / "draft-same"), "quantize": "none", "host": "127.0.0.1"}
    return {"target": {"model": str(tiny_dir / "target"), "threads": 1, "draft_timeout_s": 10.0,
                       "replicas": {"num_cpus": 0.3, **(target_replicas or {})}},
            "draft": {**draft, "threads": 1, "replicas": {"num_cpus": 0.3}}, "router": {"num_cpus": 0.1}, **top}


@contextlib.contextmanager
def serve_app(cfg: dict, name: str = APP, http_port: int | None = None, metrics_port: int | None = None):
    """Local Ray (2 CPUs), Serve with the gRPC proxy on a free port (HTTP on `http_port` or a free one),
    the app; yields the gRPC host:port. With `metrics_port`, Ray's Prometheus endpoint is
    http://127.0.0.1:{metrics_port}/metrics, exported about every second (Ray's floor)."""
    metrics = {} if metrics_port is None else {"_metrics_export_port": metrics_port,
                                               "_system_config": {"metrics_report_interval_ms": 500}}
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from deployments.app import GRPC_SERVICERS, build_app

    port = free_port()
    for attempt in range(3):  # a raylet now and then fails to come up on a busy 2-core machine
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **metrics)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(3)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port or free_port()},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICERS))
        serve.run(build_app(cfg), name=name, route_prefix="/")
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_actor(deployment: str, replica: str):
    """The Ray actor of a Serve replica, by its deployment and replica id (as stats report it)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if deployment in a["name"] and a["name"].endswith(replica)]
    assert len(names) == 1, f"no single actor for {deployment} replica {replica}: {names}"
    return ray.get_actor(names[0], namespace="serve")


def deployment_stats(deployment: str, replicas: int = 1, app: str = APP, tries: int = 40) -> list[dict]:
    """stats() of every replica of a deployment (asked until `replicas` distinct ones answered)."""
    from ray import serve

    h = serve.get_deployment_handle(deployment, app)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        s = h.stats.remote().result()
        seen[s.get("replica") or s.get("address")] = s
        if len(seen) >= replicas:
            break
    return list(seen.values())
