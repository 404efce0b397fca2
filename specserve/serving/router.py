"""The router's work, without Ray: the public API's five calls over a target and a session store.

`RouterCore(store, target, limits)` answers Generate / GenerateStream / Chat / GetSession /
DeleteSession with protobuf replies or an `ApiError` (status code name + message). `target` is
any async callable `(GenParams, session_id) -> async iterator of chunk dicts` -- in the server a
Ray Serve handle call that routes a session to the replica holding its KV prefix, in tests a
`TargetReplica` in this process. It may also have `async forget_session(session_id)`: called,
routed like the session's turns, when the store has deleted the session (DeleteSession) or says it
is gone (expired), so the replica frees the session's parked KV slot now rather than when evicted.
It is best effort: a target without it, or one that fails or takes over `forget_timeout_s`, is
logged and the call goes on.

A Chat turn, step by step:
  1. validate the request and the session's token; no session_id -> create a session (with the
     system prompt) and give its token out with every chunk of this turn
  2. begin the turn: the store appends the user message and locks the session (a second turn
     at the same time fails with FAILED_PRECONDITION, so a history never interleaves)
  3. the target templates the whole history, reusing its cached prefix, and streams rounds
  4. each round's committed tokens go to the store before the client sees them
  5. end the turn (complete, or cut short keeping exactly the committed tokens), remember the replica

Every call that generates goes through `_stream`, which survives a target replica's failure
(docs/architecture.md, "Failure handling"): before the first chunk the request is sent again;
after it, the rest is *resumed* on another replica from the prompt + the token ids the client
already has (`GenParams.resume_ids`, the text with them), so the stream goes on with no error, no
repeated and no missing token. Consecutive failures are retried with exponential backoff, a few
times, then the call ends UNAVAILABLE saying what was tried; a cancelled call is never resumed.

This module does not know Ray, gRPC transport or models.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import AsyncIterator, Callable

from ..sessions import SessionBusy, SessionError, SessionNotFound, SessionStore, StoreUnavailable
from .api import (ApiError, GenParams, Limits, QueueFull, check_session_id, check_session_token, chunk_message,
                  parse_chat, parse_generate, pb, reply_message, session_message, session_token)

__all__ = ["RouterCore", "TargetCall", "store_error", "target_error"]

log = logging.getLogger(__name__)

TargetCall = Callable[[GenParams, str], AsyncIterator[dict]]


def store_error(e: SessionError) -> ApiError:
    """A session store failure -> the status a client sees."""
    if isinstance(e, SessionNotFound):
        return ApiError("NOT_FOUND", str(e))
    if isinstance(e, SessionBusy):
        return ApiError("FAILED_PRECONDITION", f"{e} (wait for the other turn to finish, then retry)")
    if isinstance(e, StoreUnavailable):
        return ApiError("UNAVAILABLE", str(e))
    return ApiError("INVALID_ARGUMENT", str(e))


def target_error(e: BaseException) -> ApiError:
    """Anything the target raised -> ApiError (its own, or UNAVAILABLE: a replica died; retry)."""
    cause = getattr(e, "cause", None)  # Ray wraps a replica's exception; keep its code
    err = e if isinstance(e, ApiError) else cause if isinstance(cause, ApiError) else None
    if err is not None:  # the target refuses work for lack of room: its queue is full (429 over HTTP)
        return QueueFull(err.message) if err.code == "RESOURCE_EXHAUSTED" else err
    if type(e).__name__ == "BackPressureError":  # Serve: the deployment's max_queued_requests is reached
        return QueueFull(f"the target's queue is full ({e}): retry later, or add target replicas")
    if type(e).__name__ == "RequestCancelledError":  # Serve: the call was cancelled (the client went away)
        return ApiError("CANCELLED", "the request was cancelled before the target finished it")
    log.warning("target failed: %s: %s", type(e).__name__, e)
    return ApiError("UNAVAILABLE", f"the target replica failed ({type(e).__name__}): retry the request; "
                                   "a chat session keeps every token committed before the failure")


class RouterCore:
    """retries: how many consecutive failures of the target (its replica died, was restarting or
    broke its stream) a request survives: each is followed by a wait (backoff_s, doubled every
    time, at most max_backoff_s) and the request sent again, or resumed from its committed tokens
    once chunks went out. A chunk from the new replica resets the count."""

    def __init__(self, store: SessionStore, target: TargetCall, limits: Limits | None = None,
                 lease_s: float = 600.0, retries: int = 6, backoff_s: float = 0.25, max_backoff_s: float = 4.0,
                 forget_timeout_s: float = 5.0):
        self.store, self.target, self.limits, self.lease_s = store, target, limits or Limits(), lease_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.forget_timeout_s = forget_timeout_s
        self._key: bytes | None = None

    async def _session_key(self) -> bytes:
        if self._key is None:
            self._key = await self.store.server_key()
        return self._key

    async def _authorize(self, session_id: str, token: str) -> str:
        check_session_id(session_id)
        check_session_token(await self._session_key(), session_id, token)
        return session_id

    async def _forget(self, sid: str) -> None:
        """Best effort: the target frees what it keeps for a session that is gone (module docstring)."""
        forget = getattr(self.target, "forget_session", None)
        if forget is None:  # a target that keeps nothing per session (or an old one): LRU eviction frees it
            return
        try:
            await asyncio.wait_for(forget(sid), self.forget_timeout_s)
        except Exception as e:
            log.warning("session %r is gone but the target did not free its KV (it stays until evicted): %s: %s",
                        sid, type(e).__name__, e)

    async def _stream(self, p: GenParams, sid: str) -> AsyncIterator[dict]:
        """The target's chunks of one generation, across target failures (see the module docstring).

        The client gets each chunk once: `sent` holds what it has, and a failed replica's rest is asked
        of the next one as a continuation of exactly that. Only UNAVAILABLE failures are retried (and,
        once resuming, a full queue); the target's refusals of the request itself are raised at once.
        """
        sent: list[int] = []
        texts: list[str] = []
        chunks = resumed = failures = 0
        chunks_before = 0  # chunks sent before the current attempt began (its stats count only its rounds)
        t0, t_first, tried = time.perf_counter(), 0.0, ""
        while True:
            q = p if not sent else dataclasses.replace(p, resume_ids=list(sent), resume_text="".join(texts))
            finished = False
            try:
                async for chunk in self.target(q, sid):
                    failures = 0
                    sent += chunk["token_ids"]
                    texts.append(chunk["text"])
                    chunks += 1
                    t_first = t_first or time.perf_counter()
                    finished = bool(chunk.get("finish_reason"))
                    if resumed and chunk.get("stats"):
                        chunk = dict(chunk, stats=self._resumed_stats(chunk["stats"], resumed, chunks_before, t0,
                                                                      t_first))
                    yield chunk
                return
            except Exception as e:
                if finished:  # the last chunk went out: the generation is whole, only its stream's end broke
                    log.warning("target failed after the last chunk (ignored): %s: %s", type(e).__name__, e)
                    return
                err = target_error(e)
                if not (err.code == "UNAVAILABLE" or (sent and isinstance(err, QueueFull))):
                    raise err from None
                failures += 1
                tried = f"{type(e).__name__}: {str(e)[:200]}"
                if failures > self.retries:
                    raise self._gave_up(failures, len(sent), time.perf_counter() - t0, tried) from None
                if sent and failures == 1:
                    resumed += 1
                chunks_before = chunks
                delay = min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)
                log.warning("target failed %s (failure %d of at most %d), %s in %.2f s: %s",
                            f"after {len(sent)} tokens" if sent else "before its first chunk", failures,
                            self.retries, "resuming" if sent else "retrying", delay, tried)
                await asyncio.sleep(delay)

    def _gave_up(self, failures: int, sent: int, elapsed: float, last: str) -> ApiError:
        what = (f"resumed the generation after the {sent} tokens already sent" if sent
                else "sent the request again")
        return ApiError("UNAVAILABLE", f"no target replica could finish the request: {failures} failures in a row "
                                       f"over {elapsed:.1f} s (the router {what}, {self.retries} times, with backoff; "
                                       f"last: {last}); retry the request later and check the target deployment "
                                       "(`serve status`); a chat session keeps every token committed before the failure")

    @staticmethod
    def _resumed_stats(stats: dict, resumed: int, chunks_before: int, t0: float, t_first: float) -> dict:
        """The last replica's stats, made the whole request's (each earlier chunk was one round)."""
        elapsed = time.perf_counter() - t0
        return dict(stats, resumed=resumed, rounds=stats.get("rounds", 0) + chunks_before,
                    ttft_s=round(t_first - t0, 4), elapsed_s=round(elapsed, 4),
                    tokens_per_s=round(stats.get("new_tokens", 0) / elapsed, 3) if elapsed > 0 else 0.0)

    # ------------------------------------------------------------------ stateless

    async def generate_stream(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        async for chunk in self._stream(parse_generate(req, self.limits), ""):
            yield chunk_message(chunk)

    async def generate(self, req: pb.GenerateRequest) -> pb.GenerateReply:
        return reply_message([chunk async for chunk in self._stream(parse_generate(req, self.limits), "")])

    # ------------------------------------------------------------------ sessions

    async def chat(self, req: pb.ChatRequest) -> AsyncIterator[pb.GenerateChunk]:
        p = parse_chat(req, self.limits)  # 1.
        sid, new_token = await self._open(req.session_id, req.session_token, req.system)
        async for msg in self._turn(p, sid, new_token, req.message, None):
            yield msg

    async def chat_messages(self, req: pb.GenerateRequest, messages: list[dict], session_id: str | None = None,
                            session_token: str = "") -> AsyncIterator[pb.GenerateChunk]:
        """A whole conversation from the client (OpenAI chat completions), validated as Generate is.

        session_id None: stateless, no KV reuse. "" : a new session (its id and token in every chunk).
        An id: that session's turn, routed to the replica holding its KV prefix; the client's
        `messages` are templated as sent, the store keeps the user message and the reply.
        """
        p = parse_generate(req, self.limits)
        p.prompt, p.chat, p.messages = "", False, list(messages)
        if session_id is None:
            async for chunk in self._stream(p, ""):
                yield chunk_message(chunk)
            return
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        sid, new_token = await self._open(session_id, session_token, system)
        async for msg in self._turn(p, sid, new_token, messages[-1]["content"], p.messages):
            yield msg

    async def _open(self, session_id: str, token: str, system: str) -> tuple[str, str]:
        """The session of a turn: an existing one (its token checked) or a new one (id, new token)."""
        try:
            if session_id:
                return await self._authorize(session_id, token), ""
            sid = (await self.store.create(system=system or None)).id
            return sid, session_token(await self._session_key(), sid)
        except SessionError as e:
            raise store_error(e) from None

    async def _turn(self, p: GenParams, sid: str, new_token: str, message: str,
                    messages: list[dict] | None) -> AsyncIterator[pb.GenerateChunk]:
        try:
            turn = await self.store.begin_turn(sid, message, self.lease_s)  # 2.
            session = await self.store.get(sid)
        except SessionError as e:
            if isinstance(e, SessionNotFound):  # expired (or deleted): the target may still hold its KV
                await self._forget(sid)
            raise store_error(e) from None
        if messages is None:
            turns = session.turns[:-1] if session.busy and session.turns[-1].role == "assistant" else session.turns
            p.messages = [{"role": t.role, "content": t.content} for t in turns]
        complete, replica = False, ""
        try:
            async for chunk in self._stream(p, sid):  # 3.
                if chunk["token_ids"]:
                    await self.store.append(sid, turn, chunk["token_ids"], chunk["text"])  # 4.
                if chunk.get("stats"):
                    replica = chunk["stats"].get("replica", "")
                yield chunk_message(chunk, sid, new_token)
            complete = True
        except SessionError as e:  # target failures come out of _stream as ApiError already
            raise store_error(e) from None
        finally:  # 5. also when the client went away (cancellation): shield the bookkeeping
            await asyncio.shield(self._end_turn(sid, turn, complete, replica))

    async def _end_turn(self, sid: str, turn: str, complete: bool, replica: str) -> None:
        try:
            await self.store.end_turn(sid, turn, complete)
            if replica:
                await self.store.set_replica(sid, replica)
        except SessionError as e:
            log.warning("could not end turn of session %r: %s", sid, e)
            if isinstance(e, SessionNotFound):  # deleted or expired during the turn: this turn parked its KV
                await self._forget(sid)

    async def get_session(self, req: pb.GetSessionRequest) -> pb.Session:
        sid = ""
        try:
            sid = await self._authorize(req.session_id, req.session_token)
            return session_message(await self.store.get(sid))
        except SessionError as e:
            if sid and isinstance(e, SessionNotFound):  # expired: the target may still hold its KV
                await self._forget(sid)
            raise store_error(e) from None

    async def delete_session(self, req: pb.DeleteSessionRequest) -> pb.DeleteSessionReply:
        """The store deletes the session; then the target frees its KV (best effort, see _forget).

        Also when the store had no such session (it expired): a replica may still hold its KV."""
        try:
            sid = await self._authorize(req.session_id, req.session_token)
            deleted = await self.store.delete(sid)
        except SessionError as e:
            raise store_error(e) from None
        await self._forget(sid)
        return pb.DeleteSessionReply(deleted=deleted)
