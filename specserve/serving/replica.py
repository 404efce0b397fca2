"""A target replica's work, without Ray: run validated generations on one target model.

`TargetReplica.generate(params, session, pool)` is an async iterator of chunk dicts, one per
round ({token_ids, text, finish_reason}, the last with the stats). A request runs one of two ways:

* **batched** (every mode, when the replica has an `Engine`; an ssd row drafts through its own
  `RemoteDrafter` on the replica's one draft stream): it joins the engine loop
  (engine_loop.py), where every running sequence shares each draft and target forward; a full
  engine queue is RESOURCE_EXHAUSTED, a cancelled consumer frees its slot. A chat session's turn
  carries the session's key: its slot stays parked with the conversation's KV when the turn ends,
  and the next turn keeps the common prefix (engine.py, "Prefix reuse").
* **on its own** (`stream`, on a thread of `pool`, through `engine.single.generate`: the same
  engine with one slot sized to the request): every request when the replica has no engine, and
  requests longer than the engine's `max_model_len` (a session's KV prefix then lives in the
  session's own cache):
    1. encode    -- text, chat message or a session's whole history -> prompt token ids
    2. reuse     -- a session's KV cache keeps the longest common prefix with the new prompt
    3. draft     -- ar: none; sd: the draft in this process; ssd: a RemoteDrafter on the shared
                    DraftClient stream (no draft reachable -> the request runs as ar, and says so)
    4. generate  -- `engine.single.generate`: the same engine, one slot sized to the request;
                    the last chunk carries the stats
    5. keep      -- the session cache is left holding prompt + output (for the next turn)

`forget_session(session)` drops what the replica keeps for a session that is gone (deleted or
expired): its parked engine slot (freed between two rounds by the engine loop) and its own KV cache.

A request with `resume_ids` (the router resuming a generation whose replica failed) continues
from prompt + those committed output tokens either way: they are prefilled as context and count
in the budget, the stop strings and the stats' `new_tokens`; the text goes on from `resume_text`.

Per-sequence requests stream from their own threads with their own caches; every path shares the
read-only models, and one DraftClient multiplexes the ssd sequences on one gRPC stream.
This module does not know Ray, the public gRPC API or where sessions are stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from ..engine.engine import Engine
from ..engine.lm import LM, KVCache
from ..engine.sampling import SamplingParams, resume_seed
from ..engine.scheduler import QueueFull as EngineQueueFull
from ..engine.sequence import Request, SpeculationParams
from ..engine.single import generate
from ..engine.speculative import SpecConfig, Stats
from ..pipeline.drafters import make_drafter
from ..pipeline.remote_drafter import DraftClient
from ..pipeline.wire import draft_cache_key
from .api import ApiError, GenParams, QueueFull
from .engine_loop import EngineLoop

__all__ = ["TargetReplica", "SessionCache", "stream_in_pool", "rss_mb"]

log = logging.getLogger(__name__)


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux /proc; 0.0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class SessionCache:
    """A chat session on this replica: its key in the batching engine (where batched turns park
    their slot) and, for per-sequence turns (longer than the engine's max_model_len, or a replica
    without an engine), its own target KV cache and the token ids it holds (ids[:kv.length])."""

    key: str = field(default_factory=lambda: f"session-{uuid.uuid4().hex}")
    kv: KVCache | None = None
    ids: list[int] = field(default_factory=list)

    def prefix_for(self, lm: LM, prompt_ids: list[int]) -> KVCache:
        """The cache cropped to its longest common prefix with `prompt_ids` (a strict prefix)."""
        if self.kv is None:
            self.kv, self.ids = lm.new_cache(), []
        n, limit = 0, min(len(self.ids), self.kv.length, len(prompt_ids) - 1)
        while n < limit and self.ids[n] == prompt_ids[n]:
            n += 1
        self.kv.crop(n)
        self.ids = self.ids[:n]
        return self.kv


class TargetReplica:
    """The target model of one replica, with an optional in-process draft and a draft link.

    The link is made by `connect_draft(address)`; while there is none, ssd requests run as ar and
    their stats say `draft_error` (set it to why the last attempt to link failed). With an
    `engine` (built over the same target and local draft), requests of every mode are batched;
    `on_step(engine)` runs after each of its steps and while it idles (EngineLoop).
    """

    def __init__(self, target: LM, local_draft: LM | None = None, draft_timeout: float = 10.0,
                 replica: str = "", engine: Engine | None = None, on_step: Callable[[Engine], None] | None = None):
        self.target, self.local_draft = target, local_draft
        self.draft_timeout, self.replica = draft_timeout, replica
        self.draft_error = "this replica has no draft deployment"
        self._client: DraftClient | None = None
        self._lock = threading.Lock()
        self._streaming = 0  # per-sequence requests running now
        self.loop = EngineLoop(engine, on_step=on_step) if engine is not None else None

    @property
    def active(self) -> int:
        """Requests running or queued now, both ways (tests watch cancellation through this)."""
        return self._streaming + (self.loop.active if self.loop is not None else 0)

    async def forget_session(self, session: SessionCache) -> bool:
        """Drop what this replica keeps for a deleted (or expired) session: its parked engine slot,
        freed between two rounds on the loop thread (a turn of it still running frees its slot when
        it ends), its per-sequence KV cache, and (a message to the draft worker) the draft's parked
        slot of its ssd turns. True if the replica itself held something."""
        had_kv = session.kv is not None
        session.kv, session.ids = None, []  # a per-sequence turn running now keeps its own reference
        with self._lock:
            client = self._client
        if client is not None:  # the draft worker's parked slot of the conversation (ssd turns)
            client.forget(draft_cache_key(session.key))
        dropped = False
        if self.loop is not None:
            dropped = await asyncio.wrap_future(self.loop.drop_parked(session.key))
        return dropped or had_kv

    # ------------------------------------------------------------------ draft link

    def connect_draft(self, address: str) -> None:
        """Use the draft worker at `address` for ssd (replaces a previous link)."""
        client = DraftClient(address, timeout=self.draft_timeout)
        client.check_vocab(self.target.vocab_size)  # ValueError: another model family
        with self._lock:
            old, self._client = self._client, client
        if old is not None:
            old.close()

    @property
    def has_draft(self) -> bool:
        """Whether ssd requests have a draft link now."""
        return self._client is not None

    def drop_draft(self, client: DraftClient | None = None) -> None:
        """Forget the draft link (its worker died): the next ssd request asks for an address again.

        With `client`, only if that is still the link (another request may have replaced it).
        """
        with self._lock:
            if client is not None and self._client is not client:
                return
            old, self._client = self._client, None
        if old is not None:
            old.close()

    # ------------------------------------------------------------------ generation

    def encode(self, p: GenParams) -> list[int]:
        """1. The prompt token ids of a request (ApiError when it does not fit the context window)."""
        tok = self.target.tokenizer
        if p.messages:
            ids = list(tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False))
        elif p.prompt_ids:
            ids = list(p.prompt_ids)
            bad = [t for t in ids if t >= self.target.vocab_size]
            if bad:
                raise ApiError("INVALID_ARGUMENT", f"prompt_ids holds {bad[0]}, outside the vocabulary "
                                                   f"[0, {self.target.vocab_size}): send ids of this model's tokenizer")
        else:
            ids = self.target.encode(p.prompt, chat=p.chat)
        if not ids:
            raise ApiError("INVALID_ARGUMENT", "prompt encodes to no tokens: give some text")
        if len(ids) >= self.target.max_len:
            what = "the session's history" if p.messages else "prompt"
            raise ApiError("INVALID_ARGUMENT", f"{what} is {len(ids)} tokens but the model's context window is "
                                               f"{self.target.max_len}: shorten it (or start a new session)")
        return ids

    def _check_mode(self, p: GenParams) -> None:
        if p.mode == "sd" and self.local_draft is None:
            raise ApiError("FAILED_PRECONDITION", "speculation.mode sd needs a draft inside the target "
                                                  "replica (target.local_draft in the config): use ssd or ar")

    def _stats(self, st: Stats, mode: str, fallback: str = "") -> dict:
        d = st.to_dict()
        d.update(mode=mode, replica=self.replica, fallback=st.fallback or fallback)
        return d

    @staticmethod
    def _message(chunk, stats: dict | None) -> dict:
        msg = {"token_ids": chunk.token_ids, "text": chunk.text, "finish_reason": chunk.finish_reason}
        if stats is not None:
            msg["stats"] = stats
        return msg

    async def generate(self, p: GenParams, session: SessionCache | None, pool: Executor) -> AsyncIterator[dict]:
        """Run one generation, batched when it can be (see the module docstring)."""
        self._check_mode(p)
        ids = None
        if self.loop is not None:
            ids = self.encode(p)
            if len(ids) + p.max_tokens > self.loop.engine.max_model_len:  # too long to batch: on its own
                async for msg in stream_in_pool(self.stream(p, session, ids), pool):
                    yield msg
                return
        if ids is None:
            async for msg in stream_in_pool(self.stream(p, session), pool):
                yield msg
            return
        sp = SamplingParams(p.temperature, p.top_k, p.top_p)
        mode, fallback, client = self._mode_and_link(p)
        # sd rows draft with the engine's draft model; an ssd row brings a RemoteDrafter on the one stream
        key = session.key if session is not None else None
        drafter = self._drafter(p, mode, ids, sp, client, key) if mode == "ssd" else None
        req = Request(ids, p.max_tokens, sp, p.seed, p.stop, SpeculationParams(mode, p.k),
                      cache_key=key, drafter=drafter,
                      resume_ids=list(p.resume_ids), resume_text=p.resume_text)
        last = None
        try:
            async for chunk, st in self.loop.stream(req):
                last = st or last
                yield self._message(chunk, self._stats(st, mode, fallback) if st is not None else None)
        except EngineQueueFull as e:
            raise QueueFull(f"{e}: the target replica is at capacity") from None
        except ValueError as e:  # the engine's own checks
            raise ApiError("INVALID_ARGUMENT", str(e)) from None
        finally:
            if drafter is not None and last is not None and last.fallback:
                pool.submit(self._drop_if_dead, client)  # off the event loop: a dead draft takes seconds

    def stream(self, p: GenParams, session: SessionCache | None = None,
               ids: list[int] | None = None) -> Iterator[dict]:
        """Run one generation on its own; yield {token_ids, text, finish_reason, stats (last chunk only)}.

        `ids`: the prompt already encoded by the caller (else it is encoded here).
        """
        self._check_mode(p)
        ids = self.encode(p) if ids is None else ids
        sp = SamplingParams(p.temperature, p.top_k, p.top_p)
        st = Stats()
        mode, fallback, client = self._mode_and_link(p)
        spec = SpecConfig(mode=mode, k=p.k)
        context = ids + list(p.resume_ids)  # a resumed generation: its committed output is context too
        draft = self._drafter(p, mode, ids, sp, client, session.key if session is not None else None)  # 3. drafter
        kv = session.prefix_for(self.target, context) if session is not None else None  # 2. reuse
        out: list[int] = []
        with self._lock:
            self._streaming += 1
        try:
            for chunk in generate(self.target, draft, ids, p.max_tokens, sp, spec, p.seed, p.stop, st, kv,  # 4.
                                  p.resume_ids, p.resume_text):
                out += chunk.token_ids
                yield self._message(chunk, self._stats(st, mode, fallback) if chunk.finish_reason else None)
        except ValueError as e:  # the engine's own checks (a bad token id, ...)
            raise ApiError("INVALID_ARGUMENT", str(e)) from None
        finally:
            with self._lock:
                self._streaming -= 1
            if st.fallback and client is not None:
                self._drop_if_dead(client)
            if session is not None and kv is not None:  # 5. keep prompt + output for the next turn
                full = context + out
                kv.crop(min(kv.length, len(full)))
                session.ids = full[:kv.length]

    def _mode_and_link(self, p: GenParams) -> tuple[str, str, DraftClient | None]:
        """(the mode the request runs in, why it is not the one asked for, the draft link now):
        ssd without a reachable draft runs as ar and says why."""
        with self._lock:
            client = self._client
        if p.mode == "ssd" and client is None:
            return "ar", self.draft_error, None
        return p.mode, "", client

    def _drafter(self, p: GenParams, mode: str, ids: list[int], sp: SamplingParams, client: DraftClient | None,
                 cache_key: str | None = None):
        """`make_drafter` for a request; a resumed generation's committed output is context too; a chat
        session's key lets the draft worker keep the conversation's KV between turns."""
        return make_drafter(mode, ids + list(p.resume_ids), self.target.vocab_size, sp, SpecConfig(mode=mode, k=p.k),
                            draft=self.local_draft, client=client, fanout=p.fanout or None, speculate=p.speculate,
                            seed=resume_seed(p.seed, len(p.resume_ids)), max_new_tokens=p.max_tokens - len(p.resume_ids),
                            timeout=self.draft_timeout, cache_key=cache_key)

    def _drop_if_dead(self, client: DraftClient) -> None:
        """After a fallback: forget the link if the draft is gone (not merely slow), so that the
        next ssd request asks for a new address."""
        if not client.alive():
            self.drop_draft(client)

    def close(self) -> None:
        self.drop_draft()
        if self.loop is not None:
            self.loop.close()


def _close_after(step: Future, it: Iterator) -> None:
    """Close a generator once its running step is done (a generator cannot close mid-step)."""
    try:
        step.result()
    except BaseException:
        pass
    it.close()


async def stream_in_pool(it: Iterator[dict], pool: Executor) -> AsyncIterator[dict]:
    """Step a blocking generator in `pool`, one item per step, without blocking the event loop.

    When the consumer stops early (a cancelled request), the generator is closed after its
    current step, which runs its `finally` blocks (the engine closes the drafter: the draft
    worker frees the sequence too).
    """
    step: Future | None = None
    try:
        while True:
            step = pool.submit(next, it, None)
            item = await asyncio.wrap_future(step)
            if item is None:
                return
            yield item
    finally:
        if step is not None and not step.done():
            pool.submit(_close_after, step, it)
        else:
            it.close()
