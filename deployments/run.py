"""`specserve serve`: local Ray, the Serve application, the public gRPC port; Ctrl-C stops it all."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from .config import AppConfig

APP_NAME = "specserve"


def start(cfg: AppConfig, grpc_port: int = 9000, http_port: int = 8000, host: str = "127.0.0.1",
          app_name: str = APP_NAME) -> str:
    """Start local Ray (or join RAY_ADDRESS), Serve with the gRPC proxy, and the app. Returns host:port."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from .app import GRPC_SERVICERS, build_app

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
    serve.run(build_app(cfg), name=app_name, route_prefix="/")
    return f"{host}:{grpc_port}"


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def run(cfg: AppConfig, grpc_port: int = 9000, http_port: int = 8000, host: str = "127.0.0.1",
        ask: str | None = None, stay: bool = True) -> int:
    """Serve until Ctrl-C/SIGTERM. With `ask`, first send it through the public API and print the reply."""
    t0 = time.perf_counter()
    print(f"starting specserve: target {cfg.target.model}, draft {cfg.draft.model if cfg.draft else 'none'}, "
          f"sessions {'redis' if cfg.resolved_redis_url() else 'in-memory'} (Ray + model loading take a while)",
          file=sys.stderr, flush=True)
    address = start(cfg, grpc_port, http_port, host)
    print(f"specserve ready in {time.perf_counter() - t0:.0f} s: gRPC {address} (specserve.v1.SpecServe), "
          f"OpenAI-compatible HTTP http://{host}:{http_port}/v1", file=sys.stderr, flush=True)
    try:
        if ask:
            _ask(address, ask)
        if not stay:
            return 0
        stopped = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        print(f"serving; try `specserve chat --address {address}`; Ctrl-C stops", file=sys.stderr, flush=True)
        while not stopped.wait(0.5):
            pass
        print("shutting down (in-flight requests finish first)", file=sys.stderr, flush=True)
        return 0
    finally:
        stop()


def _ask(address: str, prompt: str) -> None:
    from specserve.client import Client

    print(f"> {prompt}", flush=True)
    with Client(address) as c:
        stats = None
        for chunk in c.stream(prompt, chat=True):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            if chunk.HasField("stats"):
                stats = chunk.stats
    print(flush=True)
    if stats is not None:
        print(f"[{stats.mode}: {stats.new_tokens} tokens in {stats.elapsed_s:.1f} s = {stats.tokens_per_s:.2f} tok/s, "
              f"{stats.rounds} rounds, acceptance {stats.acceptance_rate:.2f}, cache hit rate "
              f"{stats.cache_hit_rate:.2f}, replica {stats.replica}]", file=sys.stderr, flush=True)
