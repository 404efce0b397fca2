"""TargetDeployment: a Ray Serve replica that owns the target model and runs the verify loop.

`generate(params)` streams chunk dicts. Requests join the replica's batching engine
(`target.max_num_seqs` sequences share every forward; `target.max_queue_len` more wait, beyond
that RESOURCE_EXHAUSTED); an ssd row takes its drafts from the draft replica over the replica's
one speculation stream. A request sent with `multiplexed_model_id=session_id` is a session's
turn: Serve's model multiplexing routes a session back to the replica that already holds its KV
prefix (a parked engine slot; at most `target.session_cache_size` sessions per replica, least
recently used dropped first); any other replica re-prefills from the history the router sends.
`forget_session(session_id)` (the router calls it, routed the same way, when a session is deleted
or expired) frees the session's parked slot and its per-sequence cache on this replica.
A request longer than `target.max_model_len` runs per sequence in a thread pool. Either way a
cancelled request stops after its current round. After each round of its engine (and twice a
second while it idles) the replica records its batch size, k and queue length
(deployments/metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from ray import serve

from specserve.engine.engine import Engine
from specserve.engine.lm import load_model
from specserve.serving.api import GenParams
from specserve.serving.replica import SessionCache, TargetReplica, rss_mb

from .config import DraftConfig, TargetConfig
from .metrics import EngineMetrics

log = logging.getLogger("ray.serve")


def _session_loader(sessions: "weakref.WeakValueDictionary[str, SessionCache]"):
    """What Serve's model multiplexing calls for a session id this replica does not hold: a new
    SessionCache (key = the session id), recorded in `sessions` too, weakly (the multiplexing LRU
    owns it), so that `forget_session` finds it without loading one (that could evict another)."""

    async def _new_session_cache(session_id: str) -> SessionCache:
        session = sessions[session_id] = SessionCache(key=session_id)
        return session

    return _new_session_cache


@serve.deployment(name="TargetDeployment")
class TargetDeployment:
    def __init__(self, config: dict, draft_config: dict | None = None, draft=None):
        cfg = TargetConfig.model_validate(config)
        target = load_model(cfg.model, dtype=cfg.dtype, threads=cfg.threads, device=cfg.device)
        local = None
        if draft_config is not None and cfg.local_draft:
            d = DraftConfig.model_validate(draft_config)
            local = load_model(d.model, dtype=d.dtype, threads=cfg.threads, device=d.device,
                               quantize=d.quantize, tokenizer=False)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.draft = draft
        engine = Engine(target, local, max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                        max_queue_len=cfg.max_queue_len, max_prefill_tokens=cfg.max_prefill_tokens,
                        stop_prob=cfg.stop_prob)
        log.info("target replica %s: batching engine %s", self.replica, engine.capacity())
        self.replica_core = TargetReplica(target, local, cfg.draft_timeout_s, self.replica, engine,
                                          on_step=EngineMetrics(cfg.served_model_name()))
        self.pool = ThreadPoolExecutor(max_workers=cfg.replicas.max_ongoing_requests + 1,
                                       thread_name_prefix="target")
        self.sessions: weakref.WeakValueDictionary[str, SessionCache] = weakref.WeakValueDictionary()
        self.session_cache = serve.multiplexed(max_num_models_per_replica=cfg.session_cache_size)(
            _session_loader(self.sessions))
        self.timeout = cfg.draft_timeout_s

    async def _ensure_draft(self) -> None:
        """Link this replica to a draft replica (once, and again after the link broke)."""
        if self.draft is None or self.replica_core.has_draft:
            return
        try:
            address = await asyncio.wait_for(self.draft.address.remote(), self.timeout)
            await asyncio.get_running_loop().run_in_executor(self.pool, self.replica_core.connect_draft, address)
        except Exception as exc:  # ssd requests run as ar until a draft answers, and say why
            self.replica_core.draft_error = f"no draft replica answered: {type(exc).__name__}: {exc}"
            log.warning(self.replica_core.draft_error)

    async def generate(self, params: GenParams) -> AsyncIterator[dict]:
        sid = serve.get_multiplexed_model_id()
        session = await self.session_cache(sid) if sid else None
        if params.mode == "ssd":
            await self._ensure_draft()
        async for chunk in self.replica_core.generate(params, session, self.pool):
            yield chunk

    async def forget_session(self, session_id: str) -> bool:
        """A session was deleted or expired: free its parked engine slot and its per-sequence KV
        cache here. True if this replica held either. Never loads a session cache: its (now empty)
        entry in Serve's LRU ages out with the others."""
        session = self.sessions.get(session_id) or SessionCache(key=session_id)  # the engine key is the id
        return await self.replica_core.forget_session(session)

    async def stats(self) -> dict:
        """This replica: its id, the sequences streaming now, whether it holds a draft link, its RSS."""
        core = self.replica_core
        return {"replica": self.replica, "active": core.active, "draft": core.has_draft, "rss_mb": round(rss_mb(), 1),
                "engine": core.loop.engine.stats.to_dict(core.loop.engine)}

    def __del__(self):
        core = getattr(self, "replica_core", None)
        if core is not None:
            core.close()
