"""The target side of the speculation pipeline: many sequences over ONE gRPC stream to a draft.

`DraftClient(address)` opens one bidirectional stream. A background thread reads the draft's
replies and routes each to its sequence's queue; `start`, `outcome` and `stop` may be called
from many threads at once, one thread per sequence. Every call has a deadline: a late reply, a
dead draft or a broken stream raises `DraftUnavailable` (the target then decodes on its own),
an `Error` reply raises its subclass `DraftError`. After the stream breaks, the next `start`
opens a new one (sequences of the old stream are gone: their calls keep raising).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from ..engine import defaults
from ..engine.sampling import SamplingParams
from ..engine.speculative import Drafter, DraftUnavailable, KPlan
from ..engine.ssd import Proposal
from ..v1 import speculation_pb2_grpc as pb_grpc
from .wire import PROTOCOL, draft_cache_key, message_seq, pb, plan_message, proposal_fields, spec_params, unbatch

__all__ = ["DraftClient", "DraftInfo", "RemoteProposal", "RemoteDrafter", "DraftUnavailable", "DraftError",
           "CHANNEL_OPTIONS"]

log = logging.getLogger(__name__)

# Ping an idle connection so a vanished draft host is noticed even between calls.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class DraftError(DraftUnavailable):
    """The draft answered a sequence's message with an Error (code: its name, e.g. 'STALE_ROUND')."""

    def __init__(self, seq: str, code: str, message: str):
        super().__init__(f"draft error {code} for sequence {seq!r}: {message}")
        self.seq, self.code, self.detail = seq, code, message


@dataclass
class RemoteProposal(Proposal):
    """The engine's Proposal (q_ids/q_probs as lists, None when greedy) plus the draft's time."""

    draft_s: float = 0.0


@dataclass(frozen=True)
class DraftInfo:
    model: str
    vocab_size: int
    version: str
    dtype: str
    quantization: str | None
    eos_ids: tuple[int, ...]
    protocol: int = 1  # the speculation protocol it speaks (wire.PROTOCOL; 1 before the field existed)


_BROKEN = object()
_END = object()


class _Stream:
    """One open Stream call: the outgoing queue, the reply reader and the per-seq queues."""

    def __init__(self, stub: pb_grpc.SpeculationStub, name: str):
        self.out: queue.Queue = queue.Queue()
        self.queues: dict[str, queue.Queue] = {}
        self.lock = threading.Lock()
        self.broken: str | None = None
        self.call = stub.Stream(self._requests())
        self.reader = threading.Thread(target=self._read, daemon=True, name=name)
        self.reader.start()

    def _requests(self):
        while True:
            msg = self.out.get()
            if msg is _END:
                return
            yield msg

    def _read(self) -> None:
        reason = "the draft closed the stream"
        try:
            for batch in self.call:
                for msg in unbatch(batch):
                    seq = message_seq(msg)
                    with self.lock:
                        q = self.queues.get(seq)
                    if q is not None:
                        q.put(msg)
                    elif msg.WhichOneof("kind") == "error":
                        log.warning("draft error for no open sequence %r: %s", seq, msg.error.message)
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # pragma: no cover - defensive: never leave waiters hanging
            reason = f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.broken = reason
            waiting = list(self.queues.values())
        for q in waiting:
            q.put(_BROKEN)

    def send(self, msg: pb.TargetMessage) -> None:
        self.out.put(msg)

    def close(self) -> None:
        self.out.put(_END)
        self.call.cancel()


class DraftClient:
    """Multiplexes sequences over one speculation stream to the draft at `address`.

    timeout: the default deadline in seconds of every call (start includes the draft's prefill).
    """

    _ids = itertools.count()

    def __init__(self, address: str, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.SpeculationStub(self._channel)
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._seqs: dict[str, _Stream] = {}  # open sequence -> the stream it lives on
        self._closed = False

    # ------------------------------------------------------------------ API

    def info(self, timeout: float | None = None) -> DraftInfo:
        """What the draft serves (check `vocab_size` against the target's before streaming)."""
        if self._closed:
            raise DraftUnavailable(f"the DraftClient to {self.address} is closed")
        try:
            r = self._stub.Info(pb.InfoRequest(), timeout=self._t(timeout))
        except grpc.RpcError as exc:
            raise DraftUnavailable(f"draft at {self.address} did not answer Info: "
                                   f"{exc.code().name}: {exc.details()}") from None
        except ValueError as exc:  # the channel was closed meanwhile
            raise DraftUnavailable(f"draft at {self.address}: {exc}") from None
        return DraftInfo(r.model, r.vocab_size, r.version, r.dtype, r.quantization or None, tuple(r.eos_ids),
                         r.protocol or 1)

    def alive(self, timeout: float = 2.0) -> bool:
        """Whether the draft answers Info within `timeout` (a busy draft does; a dead one does not)."""
        try:
            self.info(timeout)
            return True
        except DraftUnavailable:
            return False

    def check_vocab(self, vocab_size: int, timeout: float | None = None) -> DraftInfo:
        """Info, raising ValueError when the draft's vocabulary differs from `vocab_size` or it speaks
        another speculation protocol."""
        info = self.info(timeout)
        if info.protocol != PROTOCOL:
            raise ValueError(f"draft at {self.address} ({info.model}, specserve {info.version}) speaks speculation "
                             f"protocol {info.protocol} but this target speaks {PROTOCOL}: run the same specserve "
                             "version on both")
        if info.vocab_size != vocab_size:
            raise ValueError(f"draft at {self.address} ({info.model}) has a vocabulary of {info.vocab_size} "
                             f"tokens but the target has {vocab_size}: use a draft of the same model family")
        return info

    def start(self, seq: str, prompt_ids: list[int], params: pb.SpecParams | dict | None = None,
              timeout: float | None = None, plan: KPlan | None = None, cache_key: str = "") -> RemoteProposal:
        """Open sequence `seq` with its committed tokens; return the round-0 proposal.

        params: a SpecParams message, a dict of `wire.spec_params` arguments, or None (defaults).
        plan: round 0's KPlan (None: params.k throughout). cache_key: the conversation it continues
        (Start.cache_key: the draft prefills only past what it kept for that key).
        """
        stream, msg = self._open(seq, prompt_ids, params, plan, cache_key)
        stream.send(pb.TargetMessage(start=msg))
        return self._wait(stream, seq, 0, self._t(timeout))

    def exchange(self, starts: list[tuple] = (), outcomes: list[tuple] = (),
                 timeout: float | None = None) -> dict[str, "RemoteProposal | DraftUnavailable"]:
        """Many sequences in ONE message (a Batch) and one reply: {seq: its proposal, or the
        DraftUnavailable its call would have raised}.

        starts: (seq, prompt_ids, params, plan[, cache_key]) as `start`'s arguments; outcomes: (seq,
        round, accepted, token, plan) as `outcome`'s. Every sequence shares the one deadline.
        """
        out: dict[str, RemoteProposal | DraftUnavailable] = {}
        batch, waits, stream = pb.Batch(), [], None
        for seq, prompt_ids, params, plan, *key in starts:
            try:
                stream, msg = self._open(seq, prompt_ids, params, plan, *key)
            except (DraftUnavailable, ValueError) as e:
                out[seq] = e if isinstance(e, DraftUnavailable) else DraftUnavailable(str(e))
                continue
            batch.starts.append(msg)
            waits.append((stream, seq, 0))
        for seq, round, accepted, token, plan in outcomes:
            st = self._seqs.get(seq)
            if st is None:
                out[seq] = DraftUnavailable(f"sequence {seq!r} is not open on the DraftClient to {self.address}")
                continue
            stream = st
            batch.outcomes.append(pb.Outcome(seq=seq, round=int(round), accepted=int(accepted), token=int(token),
                                             plan=plan_message(plan)))
            waits.append((st, seq, int(round) + 1))
        if stream is not None:
            stream.send(pb.TargetMessage(batch=batch))
        deadline = time.monotonic() + self._t(timeout)
        for st, seq, rnd in waits:
            try:
                out[seq] = self._wait(st, seq, rnd, max(deadline - time.monotonic(), 0.0))
            except DraftUnavailable as e:
                out[seq] = e
        return out

    def _open(self, seq: str, prompt_ids, params, plan, cache_key: str = "") -> tuple["_Stream", pb.Start]:
        """Register a new sequence on the current stream (a new one if it broke): (stream, its Start)."""
        if isinstance(params, dict):
            params = spec_params(**params)
        with self._lock:
            if self._closed:
                raise DraftUnavailable("the DraftClient is closed")
            if seq in self._seqs:
                raise ValueError(f"sequence {seq!r} is already open: stop it first or use a new id")
            stream = self._stream
            if stream is None or stream.broken is not None:
                if stream is not None:
                    stream.close()
                stream = self._stream = _Stream(self._stub, f"draft-client-{next(self._ids)}")
            self._seqs[seq] = stream
        with stream.lock:
            stream.queues[seq] = queue.Queue()
        return stream, pb.Start(seq=seq, prompt_ids=[int(t) for t in prompt_ids], params=params,
                                plan=plan_message(plan), cache_key=cache_key or "")

    def outcome(self, seq: str, round: int, accepted: int, token: int, timeout: float | None = None,
                plan: KPlan | None = None, speculate: bool | None = None) -> RemoteProposal:
        """Report round `round`'s verification (`accepted` drafts, then `token`); return round + 1.

        plan: that proposal's KPlan (None: the sequence's k); speculate: whether the draft should
        pre-draft the round after it (None: as before).
        """
        stream = self._seqs.get(seq)
        if stream is None:
            if self._closed:  # closed under a running sequence (its draft went away): finish alone
                raise DraftUnavailable(f"the DraftClient to {self.address} was closed")
            raise ValueError(f"sequence {seq!r} is not open on this client: start it first")
        stream.send(pb.TargetMessage(outcome=pb.Outcome(seq=seq, round=int(round), accepted=int(accepted),
                                                        token=int(token), plan=plan_message(plan),
                                                        speculate=speculate)))
        return self._wait(stream, seq, int(round) + 1, self._t(timeout))

    def stop(self, seq: str) -> None:
        """Close sequence `seq` on the draft (best effort; never raises, unknown ids are ignored)."""
        with self._lock:
            stream = self._seqs.pop(seq, None)
        if stream is None:
            return
        with stream.lock:
            stream.queues.pop(seq, None)
        if stream.broken is None:
            stream.send(pb.TargetMessage(stop=pb.Stop(seq=seq)))

    def forget(self, cache_key: str) -> None:
        """A conversation is gone: the draft drops the KV it keeps for `cache_key` (as its Starts
        carried it: `wire.draft_cache_key` of the session's key). Best effort, no reply; a broken
        or no stream keeps nothing (its draft-side slots went with it)."""
        with self._lock:
            stream = self._stream
        if stream is not None and stream.broken is None and cache_key:
            stream.send(pb.TargetMessage(forget=pb.Forget(cache_key=cache_key)))

    def close(self) -> None:
        """End the stream and the channel; later calls raise DraftUnavailable."""
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
            self._seqs.clear()
        if stream is not None:
            stream.close()
        self._channel.close()

    def __enter__(self) -> "DraftClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _wait(self, stream: _Stream, seq: str, round: int, timeout: float) -> RemoteProposal:
        with stream.lock:
            q = stream.queues.get(seq)
            broken = stream.broken
        if q is None:
            raise ValueError(f"sequence {seq!r} is not open on this client: start it first")
        if broken is not None:
            raise DraftUnavailable(f"the speculation stream to {self.address} broke: {broken}")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise queue.Empty
                item = q.get(timeout=left)
            except queue.Empty:
                raise DraftUnavailable(f"no proposal for sequence {seq!r} round {round} from the draft at "
                                       f"{self.address} within {timeout:.3g} s") from None
            if item is _BROKEN:
                raise DraftUnavailable(f"the speculation stream to {self.address} broke: {stream.broken}")
            if item.WhichOneof("kind") == "error":
                e = item.error
                raise DraftError(seq, pb.Error.Code.Name(e.code), e.message)
            if item.proposal.round != round:  # a late answer to a call that already timed out
                continue
            return RemoteProposal(**proposal_fields(item.proposal), draft_s=item.proposal.draft_s)


class RemoteDrafter(Drafter):
    """One sequence of the engine's loop, drafted by a remote SSD worker behind a DraftClient.

    The loop owns k: every request for a proposal (the Start, then every outcome) carries the
    loop's KPlan, and the worker drafts exactly that (its branches to the plan's next lengths),
    so the loop never cuts a proposal and a cut is never mistaken for a rejection. `k` here is
    only the worker's default for a message without a plan; fan-out and speculation stay the
    worker's. `stop_prob` is sd's early-stop rule on the draft side (a proposal ends after a
    token the draft gives less than this probability; 0 always drafts k): on the real pair it
    lifts acceptance from 0.67 to 0.80 and the cache hit rate from 0.59 to 0.74 (docs/benchmarks.md, "SSD on this CPU").
    `on_outcome` reports the outcome and waits for the next proposal: a cache hit answers at
    once, a miss after a just-in-time draft. Every wait has a deadline; a late or broken draft
    (or one that proposes more than asked) raises DraftUnavailable and the loop finishes the
    sequence alone.
    """

    def __init__(self, client: DraftClient, prompt_ids: list[int], vocab_size: int, *,
                 sampling: SamplingParams | None = None, k: int | None = None, fanout: list[int] | None = None,
                 speculate: bool = True, seed: int | None = None, max_new_tokens: int | None = None,
                 timeout: float | None = None, stop_prob: float = defaults.STOP_PROB, cache_key: str | None = None):
        import uuid

        sp = sampling or SamplingParams()
        self.client, self.prompt, self.V = client, [int(t) for t in prompt_ids], vocab_size
        self.params = spec_params(sp.temperature, sp.top_k, sp.top_p, k=k or defaults.K, fanout=fanout,
                                  speculate=speculate, seed=seed or 0, max_new_tokens=max_new_tokens,
                                  stop_prob=stop_prob)
        self.seq = uuid.uuid4().hex
        self.cache_key = draft_cache_key(cache_key or "")  # the conversation this sequence continues (hashed)
        self.timeout = timeout
        self.prop: RemoteProposal | None = None
        self._failed: DraftUnavailable | None = None  # a batched Start's failure, raised by the next propose
        self.hits = self.misses = self.late_hits = 0

    def propose(self, seq, plan):
        if self._failed is not None:
            e, self._failed = self._failed, None
            raise e
        if self.prop is None:  # started with the committed tokens now (more than the prompt after k = 0 rounds)
            self._take(self.client.start(self.seq, seq, self.params, timeout=self.timeout, plan=plan,
                                         cache_key=self.cache_key), plan)
        d = list(self.prop.token_ids)
        if not self.prop.q_ids:
            return d, None
        q = torch.zeros(len(d), self.V)  # dense rows of the sparse proposals q'
        for i, (ids, probs) in enumerate(zip(self.prop.q_ids, self.prop.q_probs)):
            q[i, torch.tensor(ids, dtype=torch.long)] = torch.tensor(probs, dtype=torch.float32)
        return d, q

    @property
    def waiting_start(self) -> bool:
        return self.prop is None

    def on_outcome(self, accepted, token, committed, plan):
        prop = self.client.outcome(self.seq, self.prop.round, accepted, token, timeout=self.timeout, plan=plan)
        self._answered(prop, plan)

    def _answered(self, prop: RemoteProposal, plan: KPlan) -> None:
        self._take(prop, plan)
        self.hits += prop.cache_hit
        self.late_hits += prop.cache_hit and prop.late
        self.misses += not prop.cache_hit
        self.last_hit = bool(prop.cache_hit)

    @staticmethod
    def _exchange(items: list[tuple], kind: str, message, answer) -> list[Exception | None]:
        """One Batch per DraftClient for the drafters of `items` (each item's first element):
        `message(item)` is its entry of `DraftClient.exchange`'s `kind` ("starts" or "outcomes"),
        `answer(item, proposal)` takes its reply. Per item None, or the DraftUnavailable it got."""
        out: list[Exception | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for n, it in enumerate(items):
            groups.setdefault(id(it[0].client), []).append(n)
        for group in groups.values():
            client = items[group[0]][0].client
            timeout = max(items[n][0].timeout or client.timeout for n in group)
            res = client.exchange(**{kind: [message(items[n]) for n in group]}, timeout=timeout)
            for n in group:
                r = res[items[n][0].seq]
                try:
                    if isinstance(r, Exception):
                        raise r
                    answer(items[n], r)
                except DraftUnavailable as e:
                    out[n] = e
        return out

    @staticmethod
    def start_all(items):
        """The Starts of drafters sharing a DraftClient in one Batch each; a failure is raised by
        that drafter's next `propose`."""
        waiting = [it for it in items if it[0].prop is None]
        failed = RemoteDrafter._exchange(waiting, "starts",
                                         lambda it: (it[0].seq, it[1], it[0].params, it[2], it[0].cache_key),
                                         lambda it, prop: it[0]._take(prop, it[2]))
        for (d, _, _), e in zip(waiting, failed):
            if e is not None:
                d._failed = e

    @staticmethod
    def outcome_all(items):
        """The outcomes of drafters sharing a DraftClient in one Batch each (one reply); per item None
        or its DraftUnavailable."""
        return RemoteDrafter._exchange(items, "outcomes", lambda it: (it[0].seq, it[0].prop.round, it[1], it[2], it[4]),
                                       lambda it, prop: it[0]._answered(prop, it[4]))

    def _take(self, prop: RemoteProposal, plan: KPlan) -> None:
        if len(prop.token_ids) > plan.k:
            raise DraftUnavailable(f"the draft at {self.client.address} proposed {len(prop.token_ids)} tokens for "
                                   f"round {prop.round} when asked for at most {plan.k}: it does not follow the "
                                   "target's k (an older draft worker? run the same specserve version on both)")
        self.prop = prop

    def close(self):
        self.client.stop(self.seq)
