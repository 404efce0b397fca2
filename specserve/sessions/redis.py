"""Sessions in Redis, shared by every router replica; each session expires ttl_s after its last write.

Keys of session ID (all expire together, ttl_s after the last write):
  {prefix}ID                HASH  created, updated (unix ms), replica
  {prefix}ID:turns          LIST  one JSON object per finished turn {role, content, token_ids, complete}
  {prefix}ID:partial        HASH  the turn in progress: turn (token), deadline (unix ms), lease (ms),
                                  user (the user turn's JSON), text (assistant text so far)
  {prefix}ID:partial:ids    LIST  the turn in progress: committed token ids
Every change is one Lua script, so it is atomic and uses the Redis server's clock (TIME).
The Lua scripts live in lua/*.lua beside this file (package data); each is run with
lua/prelude.lua in front of it. This module knows nothing of models or servers.
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from functools import cache
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

from .store import (Session, SessionNotFound, SessionStore, StoreUnavailable, Turn, _busy, _check_id,
                    _check_positive, _exists, _lost, _new_id, _with_partial)

__all__ = ["RedisSessionStore"]


@cache
def _script(name: str) -> str:
    """lua/prelude.lua + lua/<name>.lua, the text of one registered script."""
    lua = resources.files(__package__) / "lua"
    return (lua / "prelude.lua").read_text() + (lua / f"{name}.lua").read_text()


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
        self._create = reg(_script("create"))
        self._get = reg(_script("get"))
        self._begin = reg(_script("begin"))
        self._append = reg(_script("append"))
        self._end = reg(_script("end"))
        self._set_replica = reg(_script("set_replica"))

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
