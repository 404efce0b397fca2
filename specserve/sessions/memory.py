"""Sessions in a dict of this process: the embedded default (one replica, tests). Lost on restart.

The same contract as every SessionStore (see store.py), with leases on this process's clock.
This module knows nothing of Redis, models or servers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from .store import (Session, SessionNotFound, SessionStore, Turn, _busy, _check_id, _check_positive, _exists,
                    _lost, _new_id, _with_partial)

__all__ = ["MemorySessionStore"]

@dataclass
class _Partial:
    turn: str  # the turn token
    deadline: float  # lease end, unix seconds
    lease_s: float
    user: Turn
    ids: list[int] = field(default_factory=list)
    text: str = ""


@dataclass
class _Record:
    created: float
    updated: float
    turns: list[Turn]
    replica: str = ""
    partial: _Partial | None = None


class MemorySessionStore(SessionStore):
    """Sessions in a dict of this process: for one replica and tests. Lost on restart.

    One asyncio.Lock makes every change atomic; expiry is checked lazily on access.
    """

    def __init__(self, ttl_s: float = 86400.0):
        self.ttl_s = _check_positive("ttl_s", ttl_s)
        self._lock = asyncio.Lock()
        self._data: dict[str, _Record] = {}
        self._swept = time.time()
        self._key = secrets.token_bytes(32)

    def _live(self, sid: str, now: float) -> _Record:
        _check_id(sid)
        rec = self._data.get(sid)
        if rec is None or now >= rec.updated + self.ttl_s:
            self._data.pop(sid, None)
            raise SessionNotFound(sid)
        return rec

    def _sweep(self, now: float) -> None:
        """Drop expired sessions now and then, so unvisited ones do not pile up."""
        if now - self._swept < min(60.0, self.ttl_s):
            return
        self._swept = now
        for sid in [s for s, r in self._data.items() if now >= r.updated + self.ttl_s]:
            del self._data[sid]

    @staticmethod
    def _settle(rec: _Record, now: float) -> None:
        """A turn whose lease expired is over: keep what it committed (see _with_partial)."""
        p = rec.partial
        if p is not None and now >= p.deadline:
            rec.turns, _ = _with_partial(rec.turns, p.user, p.text, p.ids, live=False)
            rec.partial = None

    def _holder(self, sid: str, turn: str, now: float) -> tuple[_Record, _Partial]:
        rec = self._live(sid, now)
        p = rec.partial
        if p is None or p.turn != turn or now >= p.deadline:
            raise _lost(sid, turn)
        return rec, p

    @staticmethod
    def _view(sid: str, rec: _Record) -> Session:
        turns, busy = list(rec.turns), False
        if rec.partial is not None:
            p = rec.partial
            turns, busy = _with_partial(turns, p.user, p.text, p.ids, live=True)
        copies = [Turn(t.role, t.content, list(t.token_ids), t.complete) for t in turns]
        return Session(sid, copies, rec.replica, rec.created, rec.updated, busy)

    async def create(self, system: str | None = None, session_id: str | None = None) -> Session:
        sid = _new_id(session_id)
        async with self._lock:
            now = time.time()
            self._sweep(now)
            rec = self._data.get(sid)
            if rec is not None and now < rec.updated + self.ttl_s:
                raise _exists(sid)
            turns = [Turn("system", system)] if system else []
            rec = self._data[sid] = _Record(created=now, updated=now, turns=turns)
            return self._view(sid, rec)

    async def get(self, session_id: str) -> Session:
        async with self._lock:
            now = time.time()
            rec = self._live(session_id, now)
            self._settle(rec, now)
            return self._view(session_id, rec)

    async def delete(self, session_id: str) -> bool:
        async with self._lock:
            try:
                self._live(session_id, time.time())
            except SessionNotFound:
                return False
            del self._data[session_id]
            return True

    async def begin_turn(self, session_id: str, user_message: str, lease_s: float = 300.0) -> str:
        lease_s = _check_positive("lease_s", lease_s)
        async with self._lock:
            now = time.time()
            rec = self._live(session_id, now)
            self._settle(rec, now)
            if rec.partial is not None:
                raise _busy(session_id)
            turn = secrets.token_hex(16)
            rec.partial = _Partial(turn, now + lease_s, lease_s, Turn("user", user_message))
            rec.updated = now
            return turn

    async def append(self, session_id: str, turn: str, token_ids: list[int], text: str) -> None:
        ids = [int(t) for t in token_ids]
        async with self._lock:
            now = time.time()
            rec, p = self._holder(session_id, turn, now)
            p.ids.extend(ids)
            p.text += text
            p.deadline = now + p.lease_s
            rec.updated = now

    async def end_turn(self, session_id: str, turn: str, complete: bool = True) -> Session:
        async with self._lock:
            now = time.time()
            rec, p = self._holder(session_id, turn, now)
            if complete or p.ids:
                rec.turns = rec.turns + [p.user, Turn("assistant", p.text, p.ids, complete=bool(complete))]
            rec.partial = None
            rec.updated = now
            return self._view(session_id, rec)

    async def server_key(self) -> bytes:
        return self._key

    async def set_replica(self, session_id: str, replica: str) -> None:
        async with self._lock:
            now = time.time()
            rec = self._live(session_id, now)
            rec.replica = replica
            rec.updated = now

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
