"""A target replica's engine loop: one thread steps the batching engine, requests stream back.

    loop = EngineLoop(engine, on_step=hook)          # starts the loop thread
    async for chunk, stats in loop.stream(request):  # from any asyncio event loop; stats on the last
        ...
    loop.close()

Requests enter as `add` (through a thread-safe inbox the loop drains between rounds, so the
engine is only ever touched by its own thread) and their chunks come back through a per-request
asyncio queue. A consumer that stops early (a cancelled or disconnected client) aborts its
request: the engine frees the slot at the next round boundary. A request the engine refuses
(a bad prompt, a full queue) raises from `stream` before any chunk. `on_step(engine)` runs on the
loop thread after each step's chunks are out, and every `idle_s` while idle (a replica's metrics
read the engine there and stay fresh); if it raises, it is logged and not called again: it never
fails a request.

This module knows threads and asyncio; it does not know Ray, gRPC, sessions or the public API.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import AsyncIterator, Callable

from ..engine.engine import Engine
from ..engine.sequence import Request
from ..engine.speculative import Chunk, Stats

__all__ = ["EngineLoop"]

log = logging.getLogger(__name__)


class _Waiter:
    """Where one request's chunks go: an asyncio queue on the event loop that asked."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.seq = None  # the engine's Sequence once admitted (its stats outlive the engine's record)

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # its event loop has closed: nobody is listening any more
            pass


class EngineLoop:
    """Owns an `Engine` and the one thread that steps it."""

    def __init__(self, engine: Engine, idle_s: float = 0.5, on_step: Callable[[Engine], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self._inbox: collections.deque = collections.deque()  # ("add", Request, _Waiter) | ("abort", id)
        self._waiters: dict[str, _Waiter] = {}
        self._wake = threading.Event()
        self._closed = False
        self._idle_s = idle_s
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        """Requests admitted or waiting, as the loop last saw them."""
        return len(self._waiters)

    # ------------------------------------------------------------------ the event loop's side

    async def stream(self, request: Request) -> AsyncIterator[tuple[Chunk, Stats | None]]:
        """(chunk, None) per round, the last with the request's Stats. Raises what `Engine.add` raises."""
        if self._closed:
            raise RuntimeError("the engine loop is closed")
        waiter = _Waiter(asyncio.get_running_loop())
        self._inbox.append(("add", request, waiter))
        self._wake.set()
        rid, done = None, False
        try:
            rid = await waiter.queue.get()  # the id, or the exception add raised
            if isinstance(rid, BaseException):
                raise rid
            while True:
                item = await waiter.queue.get()
                if isinstance(item, BaseException):
                    raise item
                done = item[1] is not None
                yield item
                if done:
                    return
        finally:
            if rid is not None and not isinstance(rid, BaseException) and not done:
                self.abort(rid)  # the consumer went away: free the slot at the next round

    # ------------------------------------------------------------------ the loop thread

    def _drain(self) -> None:
        while self._inbox:
            msg = self._inbox.popleft()
            if msg[0] == "abort":
                self.engine.abort(msg[1])
                continue
            _, request, waiter = msg
            try:
                rid = self.engine.add(request)
            except Exception as e:  # a bad request or a full queue: its caller raises it
                waiter.put(e)
                continue
            waiter.seq = self.engine.seqs[rid]
            self._waiters[rid] = waiter
            waiter.put(rid)

    def _run(self) -> None:
        while not self._closed:
            self._wake.clear()  # before draining: a request added after the drain sets it again
            self._drain()
            if not self.engine.has_work():
                self._wake.wait(self._idle_s)
                self._after_step()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug or a failed forward: every request in flight fails with it
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for rid, chunk in events:
                self._deliver(rid, chunk)
            self._after_step()
        self._fail_all(RuntimeError("the engine loop was closed"))

    def _after_step(self) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(self.engine)
        except Exception:
            log.exception("on_step failed; it is not called again")
            self.on_step = None

    def _deliver(self, rid: str, chunk: Chunk) -> None:
        waiter = self._waiters.get(rid)
        if waiter is None:
            return
        if chunk.finish_reason == "abort":  # its consumer is gone (that is why it was aborted)
            del self._waiters[rid]
            return
        waiter.put((chunk, waiter.seq.stats if chunk.finish_reason else None))
        if chunk.finish_reason:
            del self._waiters[rid]

    def _fail_all(self, e: BaseException) -> None:
        for rid in list(self._waiters):
            self.engine.abort(rid)
            self._waiters.pop(rid).put(e)
        t_end = time.monotonic() + 5
        while self.engine.has_work() and time.monotonic() < t_end:  # let the aborts free the slots
            try:
                self.engine.step()
            except Exception:
                break
