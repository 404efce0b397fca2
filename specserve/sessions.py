"""Chat sessions: the history of a conversation, kept between requests.

A session is a list of turns (system, user, assistant). A turn of generation goes:

  begin_turn(id, user message)  -> turn token; the session is locked (leased) to this turn
  append(id, token, ids, text)  -> committed token ids and their text join the assistant turn
  end_turn(id, token, complete) -> the assistant turn joins the history, the lock is released

Only one turn of a session runs at a time. A turn whose lease runs out (its server died, or it
stopped appending) loses the session: the next begin_turn takes over, and the lost turn keeps
what it committed, marked incomplete. A turn cut short with nothing committed leaves no trace,
so the history never ends in a user message that got no answer.

Two stores implement the same contract: MemorySessionStore (one process, the default) and
RedisSessionStore (shared by all replicas, survives restarts with Redis persistence, every
session expires ttl_s after its last write). open_store() picks one.

This module stores text turns and committed token ids. It knows nothing of models, tokenizers,
Ray or gRPC: the server decides what a token is and what to do with the history.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "SessionError",
    "SessionNotFound",
    "SessionBusy",
    "StoreUnavailable",
    "Turn",
    "Session",
    "SessionStore",
    "MemorySessionStore",
    "RedisSessionStore",
    "open_store",
]

# Session ids become parts of Redis keys: no ':' (a key separator), no spaces, bounded length.
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


# -----------------------------------------------------------------------------
# errors


class SessionError(Exception):
    """Any session error; the subclasses say which."""


class SessionNotFound(SessionError):
    def __init__(self, sid: str):
        super().__init__(
            f"session {sid!r} not found: it expired, was deleted, or never existed; start a new one (empty session_id)"
        )
        self.session_id = sid


class SessionBusy(SessionError):
    """Another turn of the session is in progress, or this turn lost its lease."""


class StoreUnavailable(SessionError):
    """The session store (Redis) cannot be reached."""


def _busy(sid: str) -> SessionBusy:
    return SessionBusy(
        f"session {sid!r} is busy: another turn is in progress; retry when it has finished "
        "(a turn that stops responding loses the session when its lease expires)"
    )


def _lost(sid: str, turn: str) -> SessionBusy:
    return SessionBusy(
        f"session {sid!r}: turn {turn!r} does not hold the session (wrong turn token, its lease expired, "
        "or it has ended); nothing was stored: stop this turn and start a new one"
    )


def _check_id(sid: str) -> None:
    """Ids that cannot exist (wrong type or characters) are simply not found."""
    if not isinstance(sid, str) or not _ID_RE.match(sid):
        raise SessionNotFound(sid)


# -----------------------------------------------------------------------------
# data


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str
    token_ids: list[int] = field(default_factory=list)  # assistant turns: the committed token ids
    complete: bool = True  # False: an assistant turn cut short (only the committed tokens are kept)

    def to_json(self) -> str:
        return json.dumps(
            {"role": self.role, "content": self.content, "token_ids": self.token_ids, "complete": self.complete},
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, s: str) -> Turn:
        d = json.loads(s)
        ids = d.get("token_ids")
        return cls(d["role"], d["content"], list(ids) if isinstance(ids, list) else [], bool(d.get("complete", True)))


@dataclass
class Session:
    id: str
    turns: list[Turn]
    replica: str = ""  # the target replica that served the last turn (affinity hint)
    created: float = 0.0  # unix seconds
    updated: float = 0.0
    busy: bool = False  # a turn is in progress

    def messages(self) -> list[dict]:
        """[{"role", "content"}] of all turns (including an in-progress one), for a chat template."""
        return [{"role": t.role, "content": t.content} for t in self.turns]


def _with_partial(turns: list[Turn], user: Turn, text: str, ids: list[int], live: bool) -> tuple[list[Turn], bool]:
    """The history with a started turn on top: (turns, busy).

    A live turn shows its user message and its assistant turn so far (busy). A turn whose lease
    expired shows as it will be kept: cut short with its committed tokens, or gone if it has none.
    """
    if live or ids:
        turns = turns + [user, Turn("assistant", text, list(ids), complete=False)]
    return turns, live


# -----------------------------------------------------------------------------
# the contract


class SessionStore:
    """Where sessions live. All methods are coroutines; all changes to one session are atomic.

    Every write (create, begin_turn, append, end_turn, set_replica) renews the session's expiry:
    a session expires ttl_s seconds after its last write.
    """

    ttl_s: float

    async def create(self, system: str | None = None, session_id: str | None = None) -> Session:
        """A new session; a non-empty system prompt becomes turn 0 (role "system").

        session_id None picks a fresh uuid4 hex; a given id that exists raises SessionError.
        """
        raise NotImplementedError

    async def get(self, session_id: str) -> Session:
        """The session, including a turn in progress (busy=True). SessionNotFound if there is none."""
        raise NotImplementedError

    async def delete(self, session_id: str) -> bool:
        """Remove the session; True if it existed."""
        raise NotImplementedError

    async def begin_turn(self, session_id: str, user_message: str, lease_s: float = 300.0) -> str:
        """Lock the session to a new turn: append the user message and an empty assistant turn.

        Returns the turn token that append/end_turn must present. SessionNotFound if the session
        does not exist, SessionBusy if another turn holds it and its lease (renewed by each
        append) has not expired.
        """
        raise NotImplementedError

    async def append(self, session_id: str, turn: str, token_ids: list[int], text: str) -> None:
        """Add committed tokens and their text to the turn's assistant message; renews the lease.

        SessionBusy if `turn` does not hold the session (wrong token, lease expired, turn ended).
        """
        raise NotImplementedError

    async def end_turn(self, session_id: str, turn: str, complete: bool = True) -> Session:
        """Finish the turn and release the session; returns the session after the change.

        complete=False marks the assistant turn as cut short; if it committed no tokens, the turn
        leaves no trace (its user message is dropped too). SessionBusy as for append.
        """
        raise NotImplementedError

    async def set_replica(self, session_id: str, replica: str) -> None:
        """Remember which target replica served the session (an affinity hint)."""
        raise NotImplementedError

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""
        raise NotImplementedError

    async def server_key(self) -> bytes:
        """A random secret shared by everyone using this store (created on first use, kept).

        Routers sign session tokens with it, so every router replica, and a restarted one,
        accepts the tokens the others gave out.
        """
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        raise NotImplementedError


def _new_id(session_id: str | None) -> str:
    if session_id is None:
        return uuid.uuid4().hex
    if not isinstance(session_id, str) or not _ID_RE.match(session_id):
        raise SessionError(f"invalid session id {session_id!r}: use 1-128 letters, digits, '-' or '_'")
    return session_id


def _exists(sid: str) -> SessionError:
    return SessionError(f"session {sid!r} already exists: pick another id, or leave it empty for a fresh one")


def _check_positive(name: str, v: float) -> float:
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return float(v)


# -----------------------------------------------------------------------------
# in memory


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


# -----------------------------------------------------------------------------
# Redis
#
# Keys of session ID (all expire together, ttl_s after the last write):
#   {prefix}ID                HASH  created, updated (unix ms), replica
#   {prefix}ID:turns          LIST  one JSON object per finished turn {role, content, token_ids, complete}
#   {prefix}ID:partial        HASH  the turn in progress: turn (token), deadline (unix ms), lease (ms),
#                                   user (the user turn's JSON), text (assistant text so far)
#   {prefix}ID:partial:ids    LIST  the turn in progress: committed token ids
# Every change is one Lua script, so it is atomic and uses the Redis server's clock (TIME).

_LUA_PRELUDE = """
local meta, turns, partial, ids = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function ms(x) return string.format('%.0f', x) end
-- a write: stamp the session and renew the expiry of all its keys
local function touch()
  redis.call('HSET', meta, 'updated', ms(now))
  for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ttl) end
end
-- the turn in progress joins the history; cut short with no tokens, it leaves no trace
local function finish(complete)
  local list = redis.call('LRANGE', ids, 0, -1)
  if complete or #list > 0 then
    local text = redis.call('HGET', partial, 'text') or ''
    local a = '{"role":"assistant","content":' .. cjson.encode(text) .. ',"token_ids":['
      .. table.concat(list, ',') .. '],"complete":' .. (complete and 'true' or 'false') .. '}'
    redis.call('RPUSH', turns, redis.call('HGET', partial, 'user'), a)
  end
  redis.call('DEL', partial, ids)
end
-- ARGV[2] holds the session and its lease has not expired
local function holds()
  local p = redis.call('HMGET', partial, 'turn', 'deadline')
  return p[1] == ARGV[2] and tonumber(p[2]) > now
end
local function snapshot()
  local m = redis.call('HMGET', meta, 'created', 'updated', 'replica')
  return {'OK', m[1] or '0', m[2] or '0', m[3] or '', redis.call('LRANGE', turns, 0, -1)}
end
"""

# ARGV: ttl_ms, system turn JSON or ''
_LUA_CREATE = """
if redis.call('EXISTS', meta) == 1 then return {'EXISTS'} end
redis.call('DEL', turns, partial, ids)
redis.call('HSET', meta, 'created', ms(now), 'replica', '')
if ARGV[2] ~= '' then redis.call('RPUSH', turns, ARGV[2]) end
touch()
return snapshot()
"""

# ARGV: ttl_ms (unused). Read only: returns meta, turns, partial, ids and the server time.
_LUA_GET = """
if redis.call('EXISTS', meta) == 0 then return {'NOTFOUND'} end
local s = snapshot()
local p = redis.call('HMGET', partial, 'deadline', 'user', 'text')
return {'OK', s[2], s[3], s[4], s[5], {p[1] or '', p[2] or '', p[3] or ''},
        redis.call('LRANGE', ids, 0, -1), ms(now)}
"""

# ARGV: ttl_ms, turn token, lease_ms, user turn JSON
_LUA_BEGIN = """
if redis.call('EXISTS', meta) == 0 then return 'NOTFOUND' end
if redis.call('EXISTS', partial) == 1 then
  if tonumber(redis.call('HGET', partial, 'deadline') or '0') > now then return 'BUSY' end
  finish(false)
end
redis.call('HSET', partial, 'turn', ARGV[2], 'deadline', ms(now + tonumber(ARGV[3])),
           'lease', ARGV[3], 'user', ARGV[4], 'text', '')
touch()
return 'OK'
"""

# ARGV: ttl_ms, turn token, text, token ids...
_LUA_APPEND = """
if redis.call('EXISTS', meta) == 0 then return 'NOTFOUND' end
if not holds() then return 'BUSY' end
for i = 4, #ARGV, 1000 do
  redis.call('RPUSH', ids, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local text = redis.call('HGET', partial, 'text') or ''
local lease = tonumber(redis.call('HGET', partial, 'lease'))
redis.call('HSET', partial, 'text', text .. ARGV[3], 'deadline', ms(now + lease))
touch()
return 'OK'
"""

# ARGV: ttl_ms, turn token, complete ('1' or '0')
_LUA_END = """
if redis.call('EXISTS', meta) == 0 then return {'NOTFOUND'} end
if not holds() then return {'BUSY'} end
finish(ARGV[3] == '1')
touch()
return snapshot()
"""

# ARGV: ttl_ms, replica
_LUA_SET_REPLICA = """
if redis.call('EXISTS', meta) == 0 then return 'NOTFOUND' end
redis.call('HSET', meta, 'replica', ARGV[2])
touch()
return 'OK'
"""


def _redact(url: str) -> str:
    """The URL with its password replaced by ***."""
    try:
        u = urlsplit(url)
        if u.password is None:
            return url
        host = u.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if u.port is not None:
            host += f":{u.port}"
        return urlunsplit(u._replace(netloc=f"{u.username or ''}:***@{host}"))
    except ValueError:
        return "<unparsable redis url>"


class RedisSessionStore(SessionStore):
    """Sessions in Redis, shared by all replicas; each session expires ttl_s after its last write.

    Commands are not retried: a scripted write that reached Redis before the connection broke
    would be applied twice (an append would commit its tokens twice). Connection failures raise
    StoreUnavailable at once; a later call reconnects.
    """

    def __init__(self, url: str, ttl_s: float = 86400.0, prefix: str = "specserve:session:"):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.ttl_s = _check_positive("ttl_s", ttl_s)
        self.url = url
        self.prefix = prefix
        self._safe_url = _redact(url)
        self._r = aioredis.from_url(
            url,
            decode_responses=True,
            # RESP2: with RESP3 (the default since redis-py 8), redis-py 8.1 keeps handing out pooled
            # connections the server has closed, so every call after a Redis restart would fail
            # once per pooled connection (redis/redis-py#4252).
            protocol=2,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=5.0,
            socket_timeout=10.0,
        )
        reg = self._r.register_script
        self._create = reg(_LUA_PRELUDE + _LUA_CREATE)
        self._get = reg(_LUA_PRELUDE + _LUA_GET)
        self._begin = reg(_LUA_PRELUDE + _LUA_BEGIN)
        self._append = reg(_LUA_PRELUDE + _LUA_APPEND)
        self._end = reg(_LUA_PRELUDE + _LUA_END)
        self._set_replica = reg(_LUA_PRELUDE + _LUA_SET_REPLICA)

    def keys(self, session_id: str) -> list[str]:
        """The Redis keys of a session: meta, turns, partial, partial ids."""
        k = self.prefix + session_id
        return [k, k + ":turns", k + ":partial", k + ":partial:ids"]

    @contextmanager
    def _reachable(self):
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(
                f"session store unavailable: cannot reach Redis at {self._safe_url} ({type(e).__name__}: {e}); "
                "the session API is unavailable until Redis is back"
            ) from e

    async def _run(self, script, sid: str, *args):
        with self._reachable():
            return await script(keys=self.keys(sid), args=[max(1, int(self.ttl_s * 1000)), *args])

    def _session(self, sid: str, created: str, updated: str, replica: str, turns: list[str]) -> Session:
        return Session(
            sid, [Turn.from_json(t) for t in turns], replica, int(created) / 1000.0, int(updated) / 1000.0, False
        )

    async def create(self, system: str | None = None, session_id: str | None = None) -> Session:
        sid = _new_id(session_id)
        res = await self._run(self._create, sid, Turn("system", system).to_json() if system else "")
        if res[0] == "EXISTS":
            raise _exists(sid)
        return self._session(sid, *res[1:5])

    async def get(self, session_id: str) -> Session:
        _check_id(session_id)
        res = await self._run(self._get, session_id)
        if res[0] == "NOTFOUND":
            raise SessionNotFound(session_id)
        _, created, updated, replica, turns, (deadline, user, text), ids, now = res
        s = self._session(session_id, created, updated, replica, turns)
        if user:
            live = int(deadline) > int(now)
            s.turns, s.busy = _with_partial(s.turns, Turn.from_json(user), text, [int(i) for i in ids], live)
        return s

    async def delete(self, session_id: str) -> bool:
        try:
            _check_id(session_id)
        except SessionNotFound:
            return False
        with self._reachable():
            return await self._r.delete(*self.keys(session_id)) > 0

    async def begin_turn(self, session_id: str, user_message: str, lease_s: float = 300.0) -> str:
        _check_id(session_id)
        lease_ms = max(1, int(_check_positive("lease_s", lease_s) * 1000))
        turn = secrets.token_hex(16)
        res = await self._run(self._begin, session_id, turn, lease_ms, Turn("user", user_message).to_json())
        if res == "NOTFOUND":
            raise SessionNotFound(session_id)
        if res == "BUSY":
            raise _busy(session_id)
        return turn

    async def append(self, session_id: str, turn: str, token_ids: list[int], text: str) -> None:
        _check_id(session_id)
        ids = [int(t) for t in token_ids]
        res = await self._run(self._append, session_id, turn, text, *ids)
        if res == "NOTFOUND":
            raise SessionNotFound(session_id)
        if res == "BUSY":
            raise _lost(session_id, turn)

    async def end_turn(self, session_id: str, turn: str, complete: bool = True) -> Session:
        _check_id(session_id)
        res = await self._run(self._end, session_id, turn, "1" if complete else "0")
        if res[0] == "NOTFOUND":
            raise SessionNotFound(session_id)
        if res[0] == "BUSY":
            raise _lost(session_id, turn)
        return self._session(session_id, *res[1:5])

    async def set_replica(self, session_id: str, replica: str) -> None:
        _check_id(session_id)
        if await self._run(self._set_replica, session_id, replica) == "NOTFOUND":
            raise SessionNotFound(session_id)

    async def ping(self) -> None:
        with self._reachable():
            await self._r.ping()

    async def server_key(self) -> bytes:
        # Not a session key: ids cannot contain ':' and this one has no trailing ':<id>'.
        key = self.prefix.rstrip(":") + "-server-key"
        with self._reachable():
            await self._r.set(key, secrets.token_hex(32), nx=True)
            return bytes.fromhex(await self._r.get(key))

    async def close(self) -> None:
        await self._r.aclose()


def open_store(redis_url: str | None = None, ttl_s: float = 86400.0) -> SessionStore:
    """RedisSessionStore for redis_url (or $REDIS_URL); without either, a MemorySessionStore."""
    url = redis_url or os.environ.get("REDIS_URL")
    if url:
        return RedisSessionStore(url, ttl_s=ttl_s)
    return MemorySessionStore(ttl_s=ttl_s)
