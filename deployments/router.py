"""Router: the ingress deployment behind Ray Serve's gRPC proxy (the user-defined servicer) and HTTP proxy.

Its methods carry the names of `specserve.v1.SpecServe`'s RPCs; each is a thin wrapper over
`specserve.serving.router.RouterCore` that turns an `ApiError` into the gRPC status and records
Prometheus metrics (deployments/metrics.py). Sessions are routed to the target replica holding their
KV prefix with Serve's model multiplexing (`multiplexed_model_id=session_id`): their turns, and the
`forget_session` call that frees that KV when the session is deleted or expired.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

import grpc
from ray import serve

from specserve.serving.api import ApiError, GenParams, Limits, check_bearer, pb
from specserve.serving.router import RouterCore
from specserve.sessions import open_store

from .config import AppConfig
from .health import HealthRoutes
from .http import OpenAIRoutes
from .http import app as http_app
from .metrics import Metrics

def _stats(msg) -> pb.Stats | None:
    """The stats a reply or a stream's last chunk carries, if any."""
    return msg.stats if msg is not None and msg.HasField("stats") else None


class _TargetHandle:
    """RouterCore's target over the TargetDeployment handle; a session's calls carry
    `multiplexed_model_id=session_id`, so they reach the replica holding its KV (best effort)."""

    def __init__(self, handle):
        self.handle = handle

    def __call__(self, params: GenParams, session_id: str) -> AsyncIterator[dict]:
        return self.handle.options(stream=True, multiplexed_model_id=session_id).generate.remote(params)

    async def forget_session(self, session_id: str) -> bool:
        return await self.handle.options(multiplexed_model_id=session_id).forget_session.remote(session_id)


def _fail(context, e: ApiError) -> None:
    if context is not None:
        context.set_code(getattr(grpc.StatusCode, e.code))
        context.set_details(e.message)


@serve.deployment(name="Router")
@serve.ingress(http_app)
class Router(OpenAIRoutes, HealthRoutes):
    """gRPC: the methods below (Serve's gRPC proxy calls them by name). HTTP: the OpenAI API (deployments/http.py)."""

    def __init__(self, target, config: dict):
        cfg = AppConfig.model_validate(config)
        self.model_name = cfg.served_model_name()
        self.needed = ("TargetDeployment",) + (("DraftDeployment",) if cfg.draft is not None else ())
        lim = cfg.limits
        self.limits = Limits(max_tokens=lim.max_tokens, default_max_tokens=lim.default_max_tokens,
                             max_prompt_chars=lim.max_prompt_chars, k_max=lim.k_max, modes=cfg.modes,
                             default_mode=cfg.default_mode)
        self.target = target
        self.store = open_store(cfg.resolved_redis_url(), cfg.session_ttl_s)
        self.core = RouterCore(self.store, _TargetHandle(target), self.limits, retries=cfg.retry.attempts,
                               backoff_s=cfg.retry.backoff_s, max_backoff_s=cfg.retry.max_backoff_s)
        self.metrics = Metrics(self.model_name)
        self.auth_token = cfg.resolved_auth_token()

    def _check_auth(self, grpc_context) -> None:
        md = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        check_bearer(self.auth_token, md.get("authorization"))

    async def _unary(self, method: str, call, empty, grpc_context):
        t0, code, out = time.perf_counter(), "OK", None
        try:
            self._check_auth(grpc_context)
            out = await call
            return out
        except ApiError as e:
            code = e.code
            _fail(grpc_context, e)
            return empty
        finally:
            self.metrics.done(method, code, t0, _stats(out) if method == "Generate" else None)

    async def _stream(self, method: str, chunks, grpc_context):
        t0, code, last = time.perf_counter(), "OK", None
        try:
            self._check_auth(grpc_context)
            async for msg in chunks:
                last = msg
                yield msg
        except ApiError as e:
            code = e.code
            _fail(grpc_context, e)
            raise  # Serve sends the status set on the context (and logs the refusal)
        finally:
            self.metrics.done(method, code, t0, _stats(last))

    # ------------------------------------------------------------------ specserve.v1.SpecServe

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateReply:
        return await self._unary("Generate", self.core.generate(request), pb.GenerateReply(), grpc_context)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None):
        async for msg in self._stream("GenerateStream", self.core.generate_stream(request), grpc_context):
            yield msg

    async def Chat(self, request: pb.ChatRequest, grpc_context=None):
        async for msg in self._stream("Chat", self.core.chat(request), grpc_context):
            yield msg

    async def GetSession(self, request: pb.GetSessionRequest, grpc_context=None) -> pb.Session:
        return await self._unary("GetSession", self.core.get_session(request), pb.Session(), grpc_context)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, grpc_context=None) -> pb.DeleteSessionReply:
        return await self._unary("DeleteSession", self.core.delete_session(request), pb.DeleteSessionReply(),
                                 grpc_context)
