"""The Router's HTTP side: the OpenAI-compatible API as a FastAPI app (`@serve.ingress` on Router).

Routes: `GET /health` (no token), `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (both with `stream: true` as SSE). Every other route needs the bearer
token too: the middleware checks it before a handler runs or a body is read, and answers
OpenAI-shaped errors. The handlers turn the body into the gRPC API's request
(`specserve.serving.openai`) and call the same `RouterCore` methods as the gRPC servicer.

Chat completions reuse KV prefixes through the `X-Session-Id` header (docs/architecture.md,
"Design decisions"): absent -> stateless; `new` -> a new session, whose id and token come back in
the `X-Session-Id` / `X-Session-Token` response headers; an id (with `X-Session-Token`) -> that
session's replica, which holds the conversation's KV cache.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from specserve.serving import openai as oa
from specserve.serving.api import ApiError, check_bearer

app = FastAPI(title="specserve", docs_url=None, redoc_url=None, openapi_url=None)
OPEN_PATHS = ("/health",)  # the only routes answered without the bearer token


def _error(e: ApiError, chat: bool = False) -> JSONResponse:
    status, body = oa.error_response(e, chat)
    return JSONResponse(body, status_code=status)


@app.middleware("http")
async def _auth_first(request: Request, call_next):
    """The bearer token before anything else (routing, reading the body) on every closed route."""
    if request.url.path not in OPEN_PATHS:
        router = serve.get_replica_context().servable_object
        try:
            check_bearer(router.auth_token, request.headers.get("authorization"))
        except ApiError as e:
            router.metrics.done("http", e.code, time.perf_counter(), None)
            return _error(e)
    return await call_next(request)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT"}.get(exc.status_code, "INVALID_ARGUMENT")
    status, body = oa.error_response(ApiError(code, f"{request.method} {request.url.path}: {exc.detail} (this "
                                              "server has GET /v1/models, POST /v1/completions, "
                                              "POST /v1/chat/completions, GET /health)"))
    return JSONResponse(body, status_code=exc.status_code)


@app.get("/health")
async def health():
    return {"status": "ok"}


class OpenAIRoutes:
    """Route methods of the Router deployment (it sets model_name, limits, core, metrics)."""

    async def _body(self, request: Request) -> object:
        cap = 8 * self.limits.max_prompt_chars + (1 << 20)  # JSON may spend 6 bytes on a character
        declared = request.headers.get("content-length") or "0"
        if declared.isdigit() and int(declared) > cap:  # refused before reading it
            raise ApiError("RESOURCE_EXHAUSTED", f"body is over {cap} bytes: shorten the prompt")
        raw = await request.body()
        if len(raw) > cap:
            raise ApiError("RESOURCE_EXHAUSTED", f"body is over {cap} bytes: shorten the prompt")
        return oa.parse_json(raw)

    @app.get("/v1/models")
    async def models(self):
        return oa.models_body(self.model_name, self.limits.modes)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, True)

    async def _answer(self, request: Request, chat: bool):
        method, t0, headers = "http_chat" if chat else "http_completions", time.perf_counter(), {}
        try:
            body = await self._body(request)
            r = (oa.parse_chat_completion if chat else oa.parse_completion)(body, self.model_name)
            if chat:
                sid = request.headers.get("x-session-id")
                sid = "" if sid == "new" else sid
                chunks = self.core.chat_messages(r.request, r.messages, sid,
                                                 request.headers.get("x-session-token", ""))
            else:
                chunks = self.core.generate_stream(r.request)
            first = await anext(chunks, None)  # refusals before the first token are HTTP statuses
            if first is None:  # the target always sends a last chunk with the stats
                raise ApiError("UNAVAILABLE", "the target replica sent no reply: retry the request")
        except ApiError as e:
            self.metrics.done(method, e.code, t0, None)
            return _error(e, chat)
        if first.session_id:
            headers["X-Session-Id"] = first.session_id
            if first.session_token:
                headers["X-Session-Token"] = first.session_token
        rid = oa.new_id(chat)
        if r.stream:
            return StreamingResponse(self._sse(r, rid, first, chunks, method, t0), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        got = [first]
        try:
            got += [c async for c in chunks]
        except ApiError as e:
            self.metrics.done(method, e.code, t0, None)
            return _error(e, chat)
        reply = oa.pb.GenerateReply(text="".join(c.text for c in got), token_ids=[t for c in got for t in c.token_ids])
        reply.stats.CopyFrom(got[-1].stats)
        self.metrics.done(method, "OK", t0, reply.stats)
        return JSONResponse(oa.completion_body(r, rid, reply), headers=headers)

    async def _sse(self, r: oa.OpenAIRequest, rid: str, first, chunks: AsyncIterator, method: str,
                   t0: float) -> AsyncIterator[str]:
        code, last = "OK", first
        try:
            yield oa.sse(oa.stream_chunk(r, rid, first, True))
            async for c in chunks:
                last = c
                yield oa.sse(oa.stream_chunk(r, rid, c, False))
            if r.include_usage:
                yield oa.sse(oa.usage_chunk(r, rid, last.stats))
        except ApiError as e:  # mid-stream: the status line is gone; OpenAI clients read an error event
            code = e.code
            yield oa.sse(oa.error_response(e, r.chat)[1])
        finally:  # a client that went away closes this: close the router's stream too (stops the target)
            self.metrics.done(method, code, t0, last.stats if last.HasField("stats") else None)
            await chunks.aclose()
        yield oa.SSE_DONE
