"""The draft side of the speculation pipeline.

Three layers, each thin over the one below (grpc's route_guide style):

* `DraftService` -- plain Python. Owns the draft `LM` and the open sequences of ONE stream
  (seq -> `specserve.engine.ssd.DraftSession`, sharing one `AcceptanceModel` that fits the
  fan-out). `handle(TargetMessage) -> [DraftMessage]` applies one message; `speculate_step(seq)`
  runs one forward of the session's speculation after its proposal went out. Anything a message
  gets wrong becomes an `Error` for that sequence, never an exception.
* `serve_stream(service, inbox)` -- the per-stream loop, a generator of DraftMessages. It answers
  waiting messages first; when none is waiting it runs one step of speculation for the oldest
  sequence whose proposal is out, then looks at the inbox again. So speculation runs between
  "proposal sent" and "outcome received" and yields to every arriving message within one draft
  step: an outcome of another sequence is answered from its cache at once, and the outcome of
  the sequence being speculated finishes its own branch (a late hit) or drafts just-in-time.
* `SpeculationServicer` / `serve` / `run_draft_worker` -- gRPC: per stream, a reader thread moves
  incoming messages into the inbox, a worker thread runs `serve_stream` and hands its replies to
  the response generator (so speculation starts as soon as a proposal is queued for sending).
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Iterable, Iterator

import grpc

from ..engine.defaults import DRAFT_MAX_LEN, DRAFT_SLOTS, FANOUT_BUDGET
from ..engine.lm import LM, load_model, set_threads
from ..engine.draft_scheduler import DraftScheduler, SlotSession
from ..engine.runner import native_supported
from ..engine.speculative import KPlan
from ..engine.ssd import AcceptanceModel, DraftSession, StaleRound
from ..v1 import speculation_pb2_grpc as pb_grpc
from .wire import (PROTOCOL, error_message, message_seq, pb, plan_from, proposal_message, replies_message,
                   session_kwargs, unbatch)

__all__ = ["DraftService", "BatchDraftService", "Inbox", "serve_stream", "serve_batched", "SpeculationServicer", "serve", "run_draft_worker",
           "SERVER_OPTIONS"]

log = logging.getLogger(__name__)

E = pb.Error  # E.INVALID_ARGUMENT, E.STALE_ROUND, E.UNKNOWN_SEQUENCE, E.INTERNAL

# Let clients keep idle connections alive with pings (see remote_drafter.CHANNEL_OPTIONS).
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def _version() -> str:
    """specserve's version (also when `specserve` resolved as a namespace package)."""
    import importlib.metadata

    import specserve

    try:
        return getattr(specserve, "__version__", None) or importlib.metadata.version("specserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def info_reply(lm: LM) -> pb.InfoReply:
    return pb.InfoReply(model=lm.name, vocab_size=lm.vocab_size, version=_version(), dtype=lm.dtype,
                        quantization=lm.quantization or "", eos_ids=sorted(lm.eos_ids), protocol=PROTOCOL)


ANSWERS = ("hit", "late", "miss")  # how an outcome was answered: a finished branch, a branch in progress, JIT
COUNTERS = ("started", "errors", "hits", "late_hits", "misses", "spec_steps", "spec_interrupted", "speculations",
            "branches", "reused_tokens",
            *(f"{kind}_answers" for kind in ANSWERS), *(f"{kind}_answer_s" for kind in ANSWERS))  # summed over streams


SESSION_COUNTERS = ("hits", "late_hits", "misses", "speculations", "branches")  # kept by each session
CLOSED_HINT = "the sequence is closed: Start it again or decode without the draft"


class _StreamService:
    """What both draft services share: the counters of a stream, its stats, its Errors, and the
    checks of Start and Outcome. A subclass owns `sessions` (seq -> session), `spec_steps` and
    `_close(seq)` (free one sequence; its session or None)."""

    sessions: dict
    spec_steps: int
    spec_interrupted = 0  # speculation forwards abandoned for a message (the batched service's)
    reused_tokens = 0  # prompt tokens a Start did not prefill (a parked slot of its cache_key held them)
    parked = 0  # slots kept for conversations (Start.cache_key) whose sequence ended

    def __init__(self, lm: LM):
        self.lm = lm
        self.started = 0
        self.errors = 0
        self._closed = dict.fromkeys(SESSION_COUNTERS, 0)  # the counters of sessions already closed
        self.answers = dict.fromkeys(ANSWERS, 0)  # outcomes answered, by kind
        self.answer_s = dict.fromkeys(ANSWERS, 0.0)  # ... and their seconds from arrival to reply

    def answered(self, prop: pb.Proposal, seconds: float) -> None:
        """Record how long an outcome waited for its reply (arrival to reply)."""
        kind = "miss" if not prop.cache_hit else "late" if prop.late else "hit"
        self.answers[kind] += 1
        self.answer_s[kind] += seconds

    def close(self) -> None:
        """Free every open sequence (the stream ended)."""
        for seq in list(self.sessions):
            self._drop(seq)

    def _count(self, name: str) -> int:
        return self._closed[name] + sum(getattr(s, name) for s in list(self.sessions.values()))

    @property
    def hits(self) -> int:
        return self._count("hits")

    @property
    def late_hits(self) -> int:
        return self._count("late_hits")

    @property
    def misses(self) -> int:
        return self._count("misses")

    def stats(self) -> dict:
        out = {"open": len(self.sessions), "started": self.started, "errors": self.errors,
               "spec_steps": self.spec_steps, "spec_interrupted": self.spec_interrupted,
               "reused_tokens": self.reused_tokens, "parked": self.parked,
               **{name: self._count(name) for name in self._closed}}
        for kind in ANSWERS:
            out[f"{kind}_answers"], out[f"{kind}_answer_s"] = self.answers[kind], self.answer_s[kind]
        return out

    def _open(self, m: pb.Start, open_session) -> tuple[object, KPlan] | pb.DraftMessage:
        """Check a Start and open its session with `open_session(prompt_ids, **params)`:
        (session, the target's plan), or the Error to send."""
        if not m.seq:
            return self._error("", E.INVALID_ARGUMENT, "Start.seq is empty: give every sequence an id")
        if m.seq in self.sessions:
            return self._error(m.seq, E.INVALID_ARGUMENT,
                               f"sequence {m.seq!r} is already open on this stream: Stop it first or use a new id")
        try:
            kwargs = session_kwargs(m.params)
        except ValueError as exc:
            return self._error(m.seq, E.INVALID_ARGUMENT, f"bad SpecParams: {exc}")
        try:
            plan = plan_from(m)
            session = open_session(list(m.prompt_ids), **kwargs)  # validates prompt, k, ...
        except ValueError as exc:
            return self._error(m.seq, E.INVALID_ARGUMENT, str(exc))
        self.started += 1
        return session, plan

    def _apply_outcome(self, m: pb.Outcome, apply):
        """Check an Outcome and give it to its session, `apply(session, round, accepted, token, plan)`:
        what that returns, or the Error to send."""
        session = self.sessions.get(m.seq)
        if session is None:
            return self._error(m.seq, E.UNKNOWN_SEQUENCE,
                               f"no open sequence {m.seq!r} on this stream (never started, stopped, or closed "
                               "after an error): send Start first")
        try:
            out = apply(session, int(m.round), int(m.accepted), int(m.token), plan_from(m))  # validates them
        except StaleRound as exc:
            return self._error(m.seq, E.STALE_ROUND, str(exc))
        except ValueError as exc:
            return self._error(m.seq, E.INVALID_ARGUMENT, str(exc))
        if m.HasField("speculate"):  # the target's choice for the round after this proposal
            session.speculating = m.speculate
        return out

    def _failed(self, seq: str, what: str, exc: Exception) -> pb.DraftMessage:
        """A bug or a failed forward on `seq`: close it (the stream goes on) and say so."""
        self._drop(seq)
        return self._error(seq, E.INTERNAL, f"{what} failed: {type(exc).__name__}: {exc}; {CLOSED_HINT}")

    def _drop(self, seq: str) -> None:
        session = self._close(seq)
        if session is not None:
            for name in self._closed:
                self._closed[name] += getattr(session, name)

    def _close(self, seq: str):
        raise NotImplementedError

    def _error(self, seq: str, code: int, message: str) -> pb.DraftMessage:
        self.errors += 1
        return error_message(seq, code, message)


class DraftService(_StreamService):
    """The open sequences of one speculation stream, driven one message at a time."""

    def __init__(self, lm: LM, fanout_budget: int = FANOUT_BUDGET):
        super().__init__(lm)
        self.fanout_budget = fanout_budget  # the most branches a round's speculation drafts
        self.sessions: dict[str, DraftSession] = {}
        self.acceptance = AcceptanceModel()  # one target/draft pair per stream: its sequences share the fit
        self.spec_steps = 0

    # ------------------------------------------------------------------ messages

    def handle(self, msg: pb.TargetMessage) -> list[pb.DraftMessage]:
        """Apply one message; return what to send back (a Proposal, an Error, or nothing)."""
        kind = msg.WhichOneof("kind")
        seq = message_seq(msg)
        try:
            if kind == "start":
                return [self._start(msg.start)]
            if kind == "outcome":
                return [self._outcome(msg.outcome)]
            if kind == "stop":
                self._drop(seq)
                return []
            if kind == "forget":  # this service keeps nothing between sequences
                return []
            if kind == "batch":
                return [replies_message([r for m in unbatch(msg) for r in self.handle(m)])]
            return [self._error("", E.INVALID_ARGUMENT, "empty TargetMessage: set one of start, outcome, stop, forget, batch")]
        except Exception as exc:  # a bug or a failed forward: close this sequence, keep the stream
            log.exception("draft failed on %s for sequence %r", kind, seq)
            return [self._failed(seq, "draft", exc)]

    def speculate_step(self, seq: str) -> tuple[list[pb.DraftMessage], bool]:
        """One forward of `seq`'s speculation (after its proposal was sent): (replies, more to do).

        replies is [] or [Error INTERNAL] (the sequence is then closed).
        """
        session = self.sessions.get(seq)
        if session is None:
            return [], False
        try:
            more = session.speculate_step()
            self.spec_steps += 1
            return [], more
        except Exception as exc:
            log.exception("speculation failed for sequence %r", seq)
            return [self._failed(seq, "speculation", exc)], False

    def speculate(self, seq: str) -> list[pb.DraftMessage]:
        """All of `seq`'s speculation at once. Returns [] or [Error INTERNAL]."""
        while True:
            out, more = self.speculate_step(seq)
            if out or not more:
                return out

    # ------------------------------------------------------------------ internals

    def _start(self, m: pb.Start) -> pb.DraftMessage:
        t0 = time.perf_counter()
        opened = self._open(m, lambda ids, **kw: DraftSession(self.lm, ids, acceptance=self.acceptance,
                                                               fanout_budget=self.fanout_budget, **kw))
        if isinstance(opened, pb.DraftMessage):
            return opened
        session, plan = opened
        self.sessions[m.seq] = session
        return proposal_message(m.seq, session.first_proposal(plan), time.perf_counter() - t0)

    def _outcome(self, m: pb.Outcome) -> pb.DraftMessage:
        t0 = time.perf_counter()
        prop = self._apply_outcome(m, DraftSession.on_outcome)
        if isinstance(prop, pb.DraftMessage):
            return prop
        return proposal_message(m.seq, prop, time.perf_counter() - t0)

    def _close(self, seq: str) -> DraftSession | None:
        return self.sessions.pop(seq, None)


class BatchDraftService(_StreamService):
    """The open sequences of one speculation stream on a `DraftScheduler` (native draft models).

    `handle_many(messages)` applies messages that arrived together, drafting every miss in the
    same batched forwards, and returns each message's replies (a Batch gets one Replies);
    `speculate_step()` runs one forward of speculation for every sequence with a proposal out.
    Anything a message gets wrong becomes an `Error` for that sequence, never an exception.
    """

    def __init__(self, lm: LM, fanout_budget: int = FANOUT_BUDGET, max_seqs: int = DRAFT_SLOTS,
                 max_model_len: int | None = DRAFT_MAX_LEN):
        super().__init__(lm)
        self.scheduler = DraftScheduler(lm, max_seqs=max_seqs, max_model_len=max_model_len,
                                        fanout_budget=fanout_budget)
        self.acceptance = self.scheduler.acceptance

    @property
    def sessions(self) -> dict:
        return self.scheduler.sessions

    def handle(self, msg: pb.TargetMessage) -> list[pb.DraftMessage]:
        """One message (for callers that have only one)."""
        return self.handle_many([(time.perf_counter(), msg)])[0]

    def handle_many(self, msgs: list[tuple[float, pb.TargetMessage]]) -> list[list[pb.DraftMessage]]:
        """Apply (arrival time, message) pairs that arrived together; the replies of each, in order.

        Every proposal asked for is drafted before any reply is built, all in one lockstep run
        (a second message for a sequence already asked of in this call runs after the first)."""
        plans: list[tuple[str, list[tuple[str, float, pb.DraftMessage | None]]]] = []  # (kind, [(seq, arrived, reply)])
        jobs: dict[str, object] = {}
        kinds: dict[str, str] = {}
        for arrived, msg in msgs:
            kind = msg.WhichOneof("kind")
            entries = []
            for m in unbatch(msg):
                seq = message_seq(m)
                if seq in jobs:  # two messages for one sequence: finish the first one's first
                    self._run(jobs, kinds, plans)
                entries.append(self._apply(m, seq, arrived, jobs, kinds))
            plans.append((kind, entries))
        self._run(jobs, kinds, plans)
        out = []
        for kind, entries in plans:
            replies = [r for _, _, r in entries if r is not None]
            out.append([replies_message(replies)] if kind == "batch" else replies)
        return out

    def speculating(self) -> bool:
        return self.scheduler.speculating()

    def gives_way_to(self, msgs: list[pb.TargetMessage]) -> bool:
        """Whether the speculation step in progress should be abandoned for these waiting messages:
        yes when any waits, unless one of them is an outcome whose branch that very step is drafting on."""
        if not msgs:
            return False
        for msg in msgs:
            for m in unbatch(msg):
                o = m.outcome if m.WhichOneof("kind") == "outcome" else None
                if o is not None and self.scheduler.step_extends(o.seq, o.round, o.accepted, o.token):
                    return False
        return True

    def speculate_step(self, interrupt=None) -> list[pb.DraftMessage]:
        """One forward of speculation for every sequence that has some (abandoned between layers
        once `interrupt()` answers True); Errors of those that failed."""
        out = []
        for seq, exc in self.scheduler.speculate_step(interrupt).items():
            log.error("speculation failed for sequence %r: %s", seq, exc)
            out.append(self._failed(seq, "speculation", exc))
        return out

    @property
    def spec_steps(self) -> int:
        return self.scheduler.spec_steps

    @property
    def spec_interrupted(self) -> int:
        return self.scheduler.spec_interrupted

    @property
    def reused_tokens(self) -> int:
        return self.scheduler.reused_tokens

    @property
    def parked(self) -> int:
        return len(self.scheduler.parked)

    # ------------------------------------------------------------------ internals

    def _apply(self, m: pb.TargetMessage, seq: str, arrived: float, jobs: dict, kinds: dict):
        """Validate and apply one message: (seq, arrived, reply or None while its proposal is drafted)."""
        kind = m.WhichOneof("kind")
        try:
            if kind == "stop":
                self._drop(seq)
                return seq, arrived, None
            if kind == "forget":
                self.scheduler.forget(m.forget.cache_key)
                return seq, arrived, None
            if kind == "start":
                reply = self._start(m.start, jobs)
            elif kind == "outcome":
                reply = self._outcome(m.outcome, jobs)
            else:
                reply = self._error("", E.INVALID_ARGUMENT, "empty TargetMessage: set one of start, outcome, stop, forget, batch")
        except Exception as exc:  # a bug: close this sequence, keep the stream
            log.exception("draft failed on %s for sequence %r", kind, seq)
            jobs.pop(seq, None)
            reply = self._failed(seq, "draft", exc)
        if reply is None:
            kinds[seq] = kind
        return seq, arrived, reply

    def _start(self, m: pb.Start, jobs: dict) -> pb.DraftMessage | None:
        opened = self._open(m, lambda ids, **kw: self.scheduler.open(m.seq, ids, cache_key=m.cache_key or None, **kw))
        if isinstance(opened, pb.DraftMessage):
            return opened
        session, plan = opened
        jobs[m.seq] = session.first_program(plan)
        return None

    def _outcome(self, m: pb.Outcome, jobs: dict) -> pb.DraftMessage | None:
        job = self._apply_outcome(m, SlotSession.outcome_program)
        if isinstance(job, pb.DraftMessage):
            return job
        jobs[m.seq] = job
        return None

    def _run(self, jobs: dict, kinds: dict, plans: list) -> None:
        """Draft every pending proposal together; fill in the replies waiting for them."""
        if not jobs:
            return
        results = self.scheduler.answer(dict(jobs))
        now = time.perf_counter()
        done = {}
        for seq, res in results.items():
            if isinstance(res, Exception):
                log.error("draft failed for sequence %r: %s", seq, res)
                self._drop(seq)
                code = E.INVALID_ARGUMENT if isinstance(res, ValueError) else E.INTERNAL
                done[seq] = self._error(seq, code, f"draft failed: {res}; {CLOSED_HINT}")
            else:
                done[seq] = res
        for _, entries in plans:
            for n, (seq, arrived, reply) in enumerate(entries):
                if reply is None and seq in done:
                    res = done[seq]
                    if isinstance(res, pb.DraftMessage):
                        entries[n] = (seq, arrived, res)
                        continue
                    msg = proposal_message(seq, res, now - arrived)
                    if kinds.get(seq) == "outcome":
                        self.answered(msg.proposal, now - arrived)
                    entries[n] = (seq, arrived, msg)
        for seq in done:
            jobs.pop(seq, None)
            kinds.pop(seq, None)

    def _close(self, seq: str):
        return self.scheduler.close(seq)


# ---------------------------------------------------------------------- the stream loop

class Inbox:
    """Incoming messages of one stream; `close()` ends it after the messages already in.

    Each message is stamped when it arrives: after `get`, `arrived` is the perf_counter time at
    which the returned message was put in (the answer latency counts from there).
    """

    CLOSED = object()

    def __init__(self):
        self._q: queue.Queue = queue.Queue()
        self.arrived = 0.0

    def put(self, msg: pb.TargetMessage) -> None:
        self._q.put((time.perf_counter(), msg))

    def close(self) -> None:
        self._q.put((time.perf_counter(), Inbox.CLOSED))

    def peek(self) -> list[pb.TargetMessage]:
        """The messages waiting, oldest first, left in place."""
        with self._q.mutex:
            return [msg for _, msg in self._q.queue if msg is not Inbox.CLOSED]

    def get(self, block: bool) -> pb.TargetMessage | None | object:
        """The next message; None when not blocking and nothing is waiting; Inbox.CLOSED at the end."""
        try:
            self.arrived, msg = self._q.get(block=block)
        except queue.Empty:
            return None
        return msg


def serve_stream(service: DraftService, inbox: Inbox) -> Iterator[pb.DraftMessage]:
    """Yield the replies to the inbox's messages, speculating one step at a time while none is waiting.

    Sequences whose proposal is out are speculated for oldest first, one forward per turn, and
    the inbox is read again after every forward: a message waits for at most one draft step.
    A sequence's own outcome ends its speculation (the session serves it from the branch being
    drafted, or drafts just-in-time), and its new proposal queues it again at the back.
    Every proposal's `draft_s` is the time from its request's arrival to the reply.
    """
    pending: dict[str, None] = {}  # ordered set: proposals sent whose speculation is not finished
    try:
        while True:
            msg = inbox.get(block=not pending)
            if msg is Inbox.CLOSED:
                return
            if msg is None:  # nothing waiting: one step for the oldest sent proposal
                seq = next(iter(pending))
                out, more = service.speculate_step(seq)
                if not more:
                    del pending[seq]
                yield from out
                continue
            arrived, batch, replies = inbox.arrived, msg.WhichOneof("kind") == "batch", []
            for m in unbatch(msg):  # a Batch's messages one by one, answered by one Replies
                seq = message_seq(m)
                for out in service.handle(m):
                    if out.WhichOneof("kind") == "proposal":
                        out.proposal.draft_s = time.perf_counter() - arrived
                        if m.WhichOneof("kind") == "outcome":
                            service.answered(out.proposal, out.proposal.draft_s)
                        pending.pop(seq, None)
                        pending[seq] = None  # speculate for the new proposal, after the older ones
                    if batch:
                        replies.append(out)
                    else:
                        yield out
                if seq not in service.sessions:  # stopped or closed after an error
                    pending.pop(seq, None)
            if batch:
                yield replies_message(replies)
    finally:
        service.close()


def serve_batched(service: BatchDraftService, inbox: Inbox) -> Iterator[pb.DraftMessage]:
    """`serve_stream` for a `BatchDraftService`: every message waiting is applied together (one
    batched answer), then one forward of speculation for every sequence with a proposal out, and
    the inbox is read again. A speculation forward is abandoned between two layers as soon as a
    message arrives (and run again after it), so a message waits for at most one layer; unless it
    is an outcome whose branch that forward is drafting on (`gives_way_to`): the forward then
    finishes, which costs less than drawing the cut branch on just-in-time."""
    try:
        while True:
            msg = inbox.get(block=not service.speculating())
            if msg is Inbox.CLOSED:
                return
            if msg is None:
                yield from service.speculate_step(lambda: service.gives_way_to(inbox.peek()))
                continue
            batch, closed = [(inbox.arrived, msg)], False
            while (more := inbox.get(block=False)) is not None:
                if more is Inbox.CLOSED:
                    closed = True
                    break
                batch.append((inbox.arrived, more))
            for replies in service.handle_many(batch):
                yield from replies
            if closed:
                return
    finally:
        service.close()


def _pump(requests: Iterable[pb.TargetMessage], inbox: Inbox) -> None:
    """Reader thread: move the request stream into the inbox, then close it."""
    try:
        for msg in requests:
            inbox.put(msg)
    except Exception as exc:  # cancelled or broken stream: the loop ends after what is in
        log.debug("speculation stream reader ended: %s", exc)
    finally:
        inbox.close()


_DONE = object()


class SpeculationServicer(pb_grpc.SpeculationServicer):
    """gRPC glue: per Stream call one service and its loop (its own thread): a `BatchDraftService`
    and `serve_batched` for a native draft model (Llama / Qwen2 families; `batched=False` turns it
    off), else a `DraftService` and `serve_stream`. max_seqs / max_model_len: the batched service's
    slots per stream and the longest sequence a slot holds."""

    def __init__(self, lm: LM, fanout_budget: int = FANOUT_BUDGET, max_seqs: int = DRAFT_SLOTS,
                 max_model_len: int | None = DRAFT_MAX_LEN, batched: bool | None = None):
        if fanout_budget < 0:
            raise ValueError(f"fanout_budget must be >= 0 (0 = no branches), got {fanout_budget}")
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
        why = native_supported(lm.model)
        if batched and why:
            raise ValueError(f"the batched draft service needs the native decoder: {why}")
        self.batched = why is None if batched is None else batched
        self.lm, self.fanout_budget, self.max_seqs, self.max_model_len = lm, fanout_budget, max_seqs, max_model_len
        self.streams = 0  # Stream calls so far
        self._live: set[DraftService] = set()
        self._done = dict.fromkeys(COUNTERS, 0)
        self._fit: dict | None = None
        self._lock = threading.Lock()

    def Info(self, request: pb.InfoRequest, context) -> pb.InfoReply:
        return info_reply(self.lm)

    def Stream(self, request_iterator, context) -> Iterator[pb.DraftMessage]:
        service = (BatchDraftService(self.lm, self.fanout_budget, self.max_seqs, self.max_model_len) if self.batched
                   else DraftService(self.lm, self.fanout_budget))
        with self._lock:
            self.streams += 1
            self._live.add(service)
            n = self.streams
        inbox, outbox = Inbox(), queue.Queue()
        context.add_callback(inbox.close)  # the RPC ended (cancelled, deadline, client gone)
        threading.Thread(target=_pump, args=(request_iterator, inbox), daemon=True,
                         name=f"speculation-reader-{n}").start()
        threading.Thread(target=self._work, args=(service, inbox, outbox), daemon=True,
                         name=f"speculation-worker-{n}").start()
        while (msg := outbox.get()) is not _DONE:
            yield msg

    def _work(self, service: "DraftService | BatchDraftService", inbox: Inbox, outbox: queue.Queue) -> None:
        """Worker thread of one stream: run `serve_stream`, hand each reply to the response generator.

        Handing over (not yielding to gRPC) lets speculation start the moment a proposal is
        queued instead of after gRPC has finished sending it, when the outcome may be back.
        """
        try:
            loop = serve_batched if isinstance(service, BatchDraftService) else serve_stream
            for msg in loop(service, inbox):
                outbox.put(msg)
        except Exception:  # pragma: no cover - handle/speculate turn failures into Errors
            log.exception("speculation stream worker failed")
        finally:
            outbox.put(_DONE)
            with self._lock:
                self._live.discard(service)
                stats = service.stats()
                for key in self._done:
                    self._done[key] += stats[key]
                self._fit = service.acceptance.stats()

    def stats(self) -> dict:
        """Counters over all streams: open streams and sequences, Starts, Errors, cache hits (finished and
        late) and misses, speculation steps, and the mean answer latency of each kind (`hit_answer_ms`, ...:
        an outcome's arrival to its reply)."""
        with self._lock:
            live = [s.stats() for s in self._live]
            out = {"streams": self.streams, "streams_open": len(live), "sequences_open": sum(s["open"] for s in live),
                   "parked": sum(s["parked"] for s in live)}  # slots kept for conversations, on open streams
            for key, done in self._done.items():
                out[key] = done + sum(s[key] for s in live)
        for kind in ANSWERS:
            n = out[f"{kind}_answers"]
            out[f"{kind}_answer_ms"] = round(1000 * out[f"{kind}_answer_s"] / n, 3) if n else None
        out["branches_per_speculation"] = round(out["branches"] / out["speculations"], 2) if out["speculations"] else None
        out["fit"] = self._fit  # the fan-out's acceptance model, of the stream that ended last
        return out


# ---------------------------------------------------------------------- serving

def serve(lm: LM, port: int = 0, threads: int | None = None, host: str = "127.0.0.1",
          max_streams: int = 16, fanout_budget: int = FANOUT_BUDGET, max_seqs: int = DRAFT_SLOTS,
          max_model_len: int | None = DRAFT_MAX_LEN, batched: bool | None = None) -> grpc.Server:
    """Start the speculation gRPC server for `lm` on host:port (0 = a free port).

    threads: torch intra-op threads of this process (None = leave as is). Each open stream holds
    one of `max_streams` server threads. fanout_budget: the most speculation branches a round
    drafts per sequence. max_seqs, max_model_len, batched: `SpeculationServicer`'s (the batched
    service's slots per stream, its longest sequence). The started server gets two attributes: `address`
    ("host:port", the port actually bound) and `servicer` (its `stats()` counts streams,
    sequences and speculation cache hits).
    """
    set_threads(threads)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_streams + 2,
                                                    thread_name_prefix="speculation"),
                         options=SERVER_OPTIONS)
    servicer = SpeculationServicer(lm, fanout_budget, max_seqs=max_seqs, max_model_len=max_model_len, batched=batched)
    pb_grpc.add_SpeculationServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the speculation server to {host}:{port}")
    server.start()
    server.address = f"{host}:{bound}"
    server.servicer = servicer
    return server


def run_draft_worker(model: str, port: int = 0, threads: int | None = None, dtype: str = "float32",
                     quantize: str | None = None, host: str = "127.0.0.1", max_streams: int = 16,
                     fanout_budget: int = FANOUT_BUDGET, max_seqs: int = DRAFT_SLOTS,
                     max_model_len: int | None = DRAFT_MAX_LEN) -> int:
    """`specserve draft-worker`: load the draft, serve it, print `LISTENING host:port`, block.

    Runs until SIGINT/SIGTERM (or the server stops); returns the exit code 0.
    """
    lm = load_model(model, dtype=dtype, threads=threads, quantize=quantize, tokenizer=False)
    server = serve(lm, port=port, threads=threads, host=host, max_streams=max_streams, fanout_budget=fanout_budget,
                   max_seqs=max_seqs, max_model_len=max_model_len)
    print(f"draft {lm.name}: vocab {lm.vocab_size}, {lm.dtype}"
          f"{', ' + lm.quantization if lm.quantization else ''}, loaded in {lm.load_s:.1f} s",
          file=sys.stderr, flush=True)
    print(f"LISTENING {server.address}", flush=True)
    stopped = threading.Event()

    def _stop(signum, frame):
        stopped.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop)
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        server.stop(grace=1.0).wait()
        print(f"draft worker stats: {json.dumps(server.servicer.stats())}", file=sys.stderr, flush=True)
    return 0
