"""DraftDeployment: a Ray Serve replica that runs the SSD speculation gRPC server.

Targets ask any draft replica for its `address()` and then talk to it over the gRPC stream
directly (a Serve handle hop costs milliseconds; the stream costs a fraction of one).
"""

from __future__ import annotations

import ray
from ray import serve

from specserve.engine.lm import load_model
from specserve.pipeline.draft_server import serve as serve_speculation
from specserve.serving.replica import rss_mb

from .config import DraftConfig


@serve.deployment(name="DraftDeployment")
class DraftDeployment:
    def __init__(self, config: dict):
        cfg = DraftConfig.model_validate(config)
        self.lm = load_model(cfg.model, dtype=cfg.dtype, threads=cfg.threads, quantize=cfg.quantize, tokenizer=False,
                             device=cfg.device)
        self.server = serve_speculation(self.lm, port=cfg.port, threads=cfg.threads, host=cfg.host,
                                        max_seqs=cfg.max_seqs, max_model_len=cfg.max_model_len)
        host, port = self.server.address.rsplit(":", 1)
        if host in ("0.0.0.0", "::", "[::]"):  # bound to every interface: advertise this node's IP
            host = ray.util.get_node_ip_address()
        self._address = f"{host}:{port}"
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def address(self) -> str:
        """host:port of this replica's speculation server."""
        return self._address

    async def stats(self) -> dict:
        """Streams and sequences open, Starts, Errors, speculation cache hits/misses, RSS."""
        return {"replica": self.replica, "address": self._address, "rss_mb": round(rss_mb(), 1), **self.server.servicer.stats()}

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.stop(grace=0)
