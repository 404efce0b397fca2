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
