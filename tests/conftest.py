"""Shared fixtures: tiny random models built once per test session (no downloads)."""

import pytest
import torch

from specserve.engine.lm import load_model
from specserve.models.tiny import build_tiny

# Tiny models gain nothing from threads, and two spinning threads on a busy 2-core machine make
# each forward 10x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """OUT_DIR/{target,draft-same,draft-random}, as `specserve models tiny OUT_DIR` writes it."""
    out = tmp_path_factory.mktemp("tiny")
    build_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The three tiny models loaded in float32: {"target": LM, "draft-same": LM, "draft-random": LM}."""
    return {name: load_model(str(tiny_dir / name), dtype="float32") for name in ("target", "draft-same", "draft-random")}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server (free port, temp dir, AOF fsync always); never the machine's 6379."""
    from redis_server import private_redis

    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def draft_clients(tiny):
    """One in-process draft server (real gRPC) per tiny draft, and a DraftClient for each."""
    from specserve.pipeline.draft_server import serve
    from specserve.pipeline.remote_drafter import DraftClient

    servers = {name: serve(tiny[name], port=0) for name in ("draft-same", "draft-random")}
    clients = {name: DraftClient(s.address, timeout=20) for name, s in servers.items()}
    yield clients
    for c in clients.values():
        c.close()
    for s in servers.values():
        s.stop(grace=None)
