"""The public API's requests and replies: validation and conversion, as plain functions.

`parse_generate` / `parse_chat` turn a request message into a `GenParams` (or raise `ApiError`
naming the field and the fix); `stats_message`, `chunk_message`, `session_message` build replies.
This module knows the protobuf messages and the server's limits; it does not know gRPC, Ray,
models or sessions storage, so every rule here is tested without a server.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field
from typing import Any

from ..engine import defaults
from ..sessions.store import SESSION_ID
from ..v1 import serving_pb2 as pb

__all__ = ["pb", "ApiError", "QueueFull", "Limits", "GenParams", "parse_generate", "parse_chat", "check_session_id",
           "check_bearer", "session_token", "check_session_token",
           "stats_message", "chunk_message", "reply_message", "session_message", "MODE_NAMES"]

MODE_NAMES = {pb.MODE_AR: "ar", pb.MODE_SD: "sd", pb.MODE_SSD: "ssd"}


class ApiError(Exception):
    """A request the server refuses. `code` is a grpc.StatusCode name, e.g. "INVALID_ARGUMENT"."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):  # survives pickling across Ray actors with its code
        return (ApiError, (self.code, self.message))


class QueueFull(ApiError):
    """RESOURCE_EXHAUSTED because the target's queue is full (retry later; HTTP 429), not a too-large request."""

    def __init__(self, message: str):
        super().__init__("RESOURCE_EXHAUSTED", message)

    def __reduce__(self):
        return (QueueFull, (self.message,))


def _invalid(message: str) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message)


@dataclass
class Limits:
    """What the server accepts; the router validates every request against these."""

    max_tokens: int = 1024  # the most new tokens one request may ask for
    default_max_tokens: int = 128  # used when a request leaves max_tokens unset
    max_prompt_chars: int = 200_000  # longer text is refused before tokenizing (RESOURCE_EXHAUSTED)
    max_stop: int = 8  # stop strings per request
    max_stop_chars: int = 128  # characters per stop string
    k_max: int = 16  # the largest draft length a request may ask for
    modes: tuple[str, ...] = ("ar", "sd", "ssd")  # the modes this deployment can run
    default_mode: str = "ssd"


@dataclass
class GenParams:
    """One validated generation, as the target replica runs it (picklable, no protobuf)."""

    prompt: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    chat: bool = False  # wrap `prompt` as a user message in the chat template
    messages: list[dict] = field(default_factory=list)  # Chat: the whole history, templated by the target
    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    mode: str = "ssd"
    k: int | None = None
    fanout: list[int] = field(default_factory=list)
    speculate: bool = True
    # A resumed generation (set by the router only, after a replica failed mid-stream): the output
    # tokens the client already received and their text. The target continues from prompt + these;
    # max_tokens still counts the whole generation.
    resume_ids: list[int] = field(default_factory=list)
    resume_text: str = ""


# ---------------------------------------------------------------------------- requests


def _number(name: str, x: float, lo: float, hi: float, lo_open: bool = False) -> float:
    x = float(x)
    if math.isnan(x) or math.isinf(x) or x < lo or x > hi or (lo_open and x == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _invalid(f"{name} is {x!r}: it must be a number in {interval}")
    return x


def _common(p: GenParams, req: Any, limits: Limits) -> GenParams:
    """The fields Generate and Chat share: max_tokens, sampling, stop, speculation."""
    if req.HasField("max_tokens"):
        if req.max_tokens < 1:
            raise _invalid(f"max_tokens is {req.max_tokens}: ask for at least 1 token (or leave it unset "
                           f"for the default {limits.default_max_tokens})")
        if req.max_tokens > limits.max_tokens:
            raise _invalid(f"max_tokens is {req.max_tokens}, over this server's limit of {limits.max_tokens}: "
                           f"ask for at most {limits.max_tokens}")
        p.max_tokens = int(req.max_tokens)
    else:
        p.max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    s = req.sampling
    if s.HasField("temperature"):
        p.temperature = _number("sampling.temperature", s.temperature, 0.0, 100.0)
    if s.HasField("top_k"):
        if s.top_k < 0:
            raise _invalid(f"sampling.top_k is {s.top_k}: use 0 (off) or a positive number of tokens")
        p.top_k = int(s.top_k)
    if s.HasField("top_p"):
        p.top_p = _number("sampling.top_p", s.top_p, 0.0, 1.0, lo_open=True)
    if s.HasField("seed"):
        p.seed = int(s.seed) % (1 << 63)
    if len(req.stop) > limits.max_stop:
        raise _invalid(f"stop has {len(req.stop)} strings: give at most {limits.max_stop}")
    for i, st in enumerate(req.stop):
        if not st:
            raise _invalid(f"stop[{i}] is empty: remove it or give a non-empty string")
        if len(st) > limits.max_stop_chars:
            raise _invalid(f"stop[{i}] is {len(st)} characters: keep stop strings to {limits.max_stop_chars}")
    p.stop = list(req.stop)
    sp = req.speculation
    if sp.mode == pb.MODE_UNSPECIFIED:
        p.mode = limits.default_mode
    elif sp.mode in MODE_NAMES:
        p.mode = MODE_NAMES[sp.mode]
    else:
        raise _invalid(f"speculation.mode {sp.mode} is unknown: use MODE_AR, MODE_SD or MODE_SSD "
                       "(or leave it unset for the server's default)")
    if p.mode not in limits.modes:
        raise ApiError("FAILED_PRECONDITION", f"speculation.mode {p.mode} is not available on this server "
                                              f"(it runs {', '.join(limits.modes)}): choose one of those")
    if sp.HasField("k"):
        if not 1 <= sp.k <= limits.k_max:
            raise _invalid(f"speculation.k is {sp.k}: draft between 1 and {limits.k_max} tokens per round "
                           "(or leave it unset for the default)")
        p.k = int(sp.k)
    if sp.fanout:
        k = p.k or defaults.K
        if len(sp.fanout) > k + 1 or any(f < 0 for f in sp.fanout) or sum(sp.fanout) > 256:
            raise _invalid(f"speculation.fanout {list(sp.fanout)} is invalid: give at most k+1 = {k + 1} "
                           "non-negative branch counts (positions 0..k) summing to at most 256")
        p.fanout = [int(f) for f in sp.fanout]
    p.speculate = not sp.no_speculation
    return p


def parse_generate(req: pb.GenerateRequest, limits: Limits) -> GenParams:
    """Validate a GenerateRequest (Generate, GenerateStream); raise ApiError naming the field."""
    if req.prompt and req.prompt_ids:
        raise _invalid("both prompt and prompt_ids are set: give the prompt as text or as token ids, not both")
    if not req.prompt and not req.prompt_ids:
        raise _invalid("prompt is empty: set prompt (text) or prompt_ids (token ids)")
    if len(req.prompt) > limits.max_prompt_chars:
        raise ApiError("RESOURCE_EXHAUSTED", f"prompt is {len(req.prompt)} characters, over this server's "
                                             f"limit of {limits.max_prompt_chars}: shorten it")
    if req.chat and req.prompt_ids:
        raise _invalid("chat needs prompt (text): the chat template applies to text, not to prompt_ids")
    if any(t < 0 for t in req.prompt_ids):
        raise _invalid("prompt_ids holds a negative id: token ids are in [0, vocabulary size)")
    p = GenParams(prompt=req.prompt, prompt_ids=list(req.prompt_ids), chat=req.chat)
    return _common(p, req, limits)


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise _invalid(f"session_id {session_id[:40]!r} is malformed: use the id a Chat reply gave "
                       "(1-128 of A-Z a-z 0-9 _ -), or leave it empty to start a new session")
    return session_id


def parse_chat(req: pb.ChatRequest, limits: Limits) -> GenParams:
    """Validate a ChatRequest (the session itself is checked by the store); `messages` stays empty."""
    if req.session_id:
        check_session_id(req.session_id)
    if not req.message.strip():
        raise _invalid("message is empty: say something")
    if len(req.message) + len(req.system) > limits.max_prompt_chars:
        raise ApiError("RESOURCE_EXHAUSTED", f"message is {len(req.message) + len(req.system)} characters, over "
                                             f"this server's limit of {limits.max_prompt_chars}: shorten it")
    return _common(GenParams(), req, limits)


# ---------------------------------------------------------------------------- access


def check_bearer(expected: str | None, authorization: str | None) -> None:
    """The server's bearer token (None: no auth) against a request's `authorization` value."""
    if not expected:
        return
    if not authorization or not hmac.compare_digest(authorization.strip().encode(), f"Bearer {expected}".encode()):
        raise ApiError("UNAUTHENTICATED", "this server needs a bearer token: send the metadata "
                                          "'authorization: Bearer <token>' (Client(..., token=...))")


def session_token(key: bytes, session_id: str) -> str:
    """The token that opens session `session_id` (an HMAC of its id under the server's key)."""
    return hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()[:32]


def check_session_token(key: bytes, session_id: str, token: str) -> None:
    if not token or not hmac.compare_digest(token.encode(), session_token(key, session_id).encode()):
        raise ApiError("PERMISSION_DENIED", f"session {session_id!r} needs its session_token: send the one the "
                                            "session's first Chat reply carried (specserve.client.Client keeps it)")


# ---------------------------------------------------------------------------- replies

_STAT_FIELDS = ("prompt_tokens", "new_tokens", "rounds", "draft_tokens", "accepted_tokens", "acceptance_rate",
                "cache_hits", "cache_misses", "cache_hit_rate", "ttft_s", "tokens_per_s", "elapsed_s",
                "prefix_reused", "finish_reason", "mode", "fallback", "replica", "drafts", "accepted_per_pos",
                "resumed")


def stats_message(stats: dict) -> pb.Stats:
    """An engine Stats.to_dict() (plus mode, replica) -> Stats; unknown keys are ignored."""
    return pb.Stats(**{k: stats[k] for k in _STAT_FIELDS if stats.get(k) is not None})


def chunk_message(chunk: dict, session_id: str = "", session_token: str = "") -> pb.GenerateChunk:
    """A target chunk {token_ids, text, stats?} -> GenerateChunk."""
    msg = pb.GenerateChunk(token_ids=chunk["token_ids"], text=chunk["text"], session_id=session_id,
                           session_token=session_token)
    if chunk.get("stats"):
        msg.stats.CopyFrom(stats_message(chunk["stats"]))
    return msg


def reply_message(chunks: list[dict]) -> pb.GenerateReply:
    """All chunks of one generation -> the unary GenerateReply."""
    ids = [t for c in chunks for t in c["token_ids"]]
    msg = pb.GenerateReply(text="".join(c["text"] for c in chunks), token_ids=ids)
    if chunks and chunks[-1].get("stats"):
        msg.stats.CopyFrom(stats_message(chunks[-1]["stats"]))
    return msg


def session_message(session: Any) -> pb.Session:
    """A sessions.Session -> Session."""
    return pb.Session(
        session_id=session.id, replica=session.replica, created_unix_s=session.created,
        updated_unix_s=session.updated, busy=session.busy,
        turns=[pb.Turn(role=t.role, content=t.content, complete=t.complete, tokens=len(t.token_ids))
               for t in session.turns])
