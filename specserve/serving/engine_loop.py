"""A target replica's engine loop: one thread steps the batching engine, requests stream back.

    loop = EngineLoop(engine, on_step=hook)          # starts the loop thread
    async for chunk, stats in loop.stream(request):  # from any asyncio event loop; stats on the last
        ...
    await asyncio.wrap_future(loop.drop_parked(key))  # a deleted session's parked slot, freed
    loop.close()

Requests enter as `add` (through a thread-safe inbox the loop drains between rounds, so the
engine is only ever touched by its own thread) and their chunks come back through a per-request
asyncio queue. `drop_parked(key)` goes through the same inbox: `Engine.drop_parked` runs between
two rounds, and the returned future says whether a parked slot was freed (it fails once the loop
is closed). A consumer that stops early (a cancelled or disconnected client) aborts its
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
from concurrent.futures import Future
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
        # ("add", Request, _Waiter) | ("abort", id) | ("drop", cache key, Future)
        self._inbox: collections.deque = collections.deque()
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

    def drop_parked(self, key: str) -> Future:
        """Forget a cache key (a deleted session's) between rounds: `Engine.drop_parked` on the loop
        thread. The future's result: whether a parked slot was freed; RuntimeError once closed."""
        done: Future = Future()
        if self._closed:
            done.set_exception(RuntimeError("the engine loop is closed"))
            return done
        self._inbox.append(("drop", key, done))
        self._wake.set()
        if self._closed and not self._thread.is_alive():  # nobody will drain it any more
            self._refuse_inbox()
        return done

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
            if msg[0] == "drop":  # done even when its caller stopped waiting (a cancelled future)
                _, key, done = msg
                try:
                    freed, error = self.engine.drop_parked(key), None
                except Exception as e:  # a bug: its caller gets it, the loop goes on
                    freed, error = False, e
                if not done.set_running_or_notify_cancel():
                    continue
                if error is not None:
                    done.set_exception(error)
                else:
                    done.set_result(freed)
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
        self._refuse_inbox()

    def _refuse_inbox(self) -> None:
        """After the loop ended: what is still in the inbox fails (nothing waits for an answer forever)."""
        e = RuntimeError("the engine loop is closed")
        while self._inbox:
            try:
                msg = self._inbox.popleft()
            except IndexError:  # another thread took the last one
                return
            if msg[0] == "add":
                msg[2].put(e)
            elif msg[0] == "drop" and msg[2].set_running_or_notify_cancel():
                msg[2].set_exception(e)

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
