"""Chat sessions: the history of a conversation, kept between requests.

A session is a list of turns (system, user, assistant). A turn of generation goes:

  begin_turn(id, user message)  -> turn token; the session is locked (leased) to this turn
  append(id, token, ids, text)  -> committed token ids and their text join the assistant turn
  end_turn(id, token, complete) -> the assistant turn joins the history, the lock is released

Only one turn of a session runs at a time. A turn whose lease runs out (its server died, or it
stopped appending) loses the session: the next begin_turn takes over, and the lost turn keeps
what it committed, marked incomplete. A turn cut short with nothing committed leaves no trace,
so the history never ends in a user message that got no answer.

This module holds the contract: the types (Turn, Session), the errors and the SessionStore
interface. Two stores implement it: `memory.py` (one process, the default) and `redis.py`
(shared by all replicas); `specserve.sessions.open_store()` picks one.

It stores text turns and committed token ids. It knows nothing of models, tokenizers,
Ray or gRPC: the server decides what a token is and what to do with the history.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

__all__ = ["SessionError", "SessionNotFound", "SessionBusy", "StoreUnavailable", "Turn", "Session",
           "SessionStore", "SESSION_ID"]

# Session ids become parts of Redis keys: no ':' (a key separator), no spaces, bounded length.
# The one owner of the rule: the API's request validation uses it too.
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


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
    if not isinstance(sid, str) or not SESSION_ID.match(sid):
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
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise SessionError(f"invalid session id {session_id!r}: use 1-128 letters, digits, '-' or '_'")
    return session_id


def _exists(sid: str) -> SessionError:
    return SessionError(f"session {sid!r} already exists: pick another id, or leave it empty for a fresh one")


def _check_positive(name: str, v: float) -> float:
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return float(v)
