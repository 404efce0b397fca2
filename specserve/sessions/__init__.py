"""Chat sessions: the history of a conversation, kept between requests.

`store.py` holds the contract (types, errors, the SessionStore interface and its turn protocol),
`memory.py` and `redis.py` the two stores; `open_store()` picks one. Everything a caller needs is
importable from here: `from specserve.sessions import open_store, SessionNotFound`.
"""

from __future__ import annotations

import os

from .memory import MemorySessionStore
from .redis import RedisSessionStore
from .store import (SESSION_ID, Session, SessionBusy, SessionError, SessionNotFound, SessionStore,
                    StoreUnavailable, Turn)

__all__ = ["SessionError", "SessionNotFound", "SessionBusy", "StoreUnavailable", "Turn", "Session",
           "SessionStore", "MemorySessionStore", "RedisSessionStore", "open_store", "SESSION_ID"]


def open_store(redis_url: str | None = None, ttl_s: float = 86400.0) -> SessionStore:
    """RedisSessionStore for redis_url (or $REDIS_URL); without either, a MemorySessionStore."""
    url = redis_url or os.environ.get("REDIS_URL")
    if url:
        return RedisSessionStore(url, ttl_s=ttl_s)
    return MemorySessionStore(ttl_s=ttl_s)
