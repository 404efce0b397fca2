"""Engine objects <-> speculation protobuf messages. Pure functions: no gRPC, no threads.

Both sides use these: the draft turns `SpecParams` into `DraftSession` arguments and a session's
`Proposal` into a `DraftMessage`; the target builds `SpecParams` and reads proposals back.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..engine.defaults import K, Q_TOP
from ..engine.sampling import SamplingParams
from ..engine.speculative import KPlan
from ..v1 import speculation_pb2 as pb

__all__ = ["pb", "PROTOCOL", "spec_params", "session_kwargs", "plan_message", "plan_from", "proposal_message",
           "error_message", "proposal_fields", "message_seq", "draft_cache_key", "unbatch", "replies_message"]

PROTOCOL = 3  # InfoReply.protocol: the speculation protocol both sides speak (speculation.proto, "Version")


def spec_params(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, k: int = K,
                fanout: list[int] | None = None, speculate: bool = True, seed: int = 0,
                q_top: int = Q_TOP, stop_prob: float = 0.0,
                max_new_tokens: int | None = None) -> pb.SpecParams:
    """Build a `SpecParams` message (the target side). The draft validates the values."""
    p = pb.SpecParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), k=int(k),
                      fanout=[int(f) for f in (fanout or [])], speculate=bool(speculate), seed=int(seed),
                      q_top=int(q_top), stop_prob=float(stop_prob))
    if max_new_tokens is not None:
        p.max_new_tokens = int(max_new_tokens)
    return p


def session_kwargs(p: pb.SpecParams) -> dict[str, Any]:
    """`SpecParams` -> keyword arguments of `DraftSession` (unset optional fields take defaults).

    Raises ValueError for values no session accepts (SamplingParams checks the warping ones).
    """
    top_p = p.top_p if p.HasField("top_p") else 1.0
    k = p.k if p.HasField("k") else K
    return {
        "sampling": SamplingParams(p.temperature, p.top_k, top_p),
        "k": int(k),
        "fanout": [int(f) for f in p.fanout] or None,
        "speculate": p.speculate if p.HasField("speculate") else True,
        "seed": int(p.seed),
        "q_top": int(p.q_top) if p.HasField("q_top") else Q_TOP,
        "stop_prob": float(p.stop_prob),
        "max_new_tokens": int(p.max_new_tokens) if p.HasField("max_new_tokens") else None,
    }


def plan_message(plan: KPlan | None) -> pb.KPlan | None:
    """The loop's KPlan -> its message (None stays None: the field is left unset)."""
    if plan is None:
        return None
    return pb.KPlan(k=plan.k, if_accepted=plan.if_accepted, if_rejected=plan.if_rejected, miss_k=plan.miss_k)


def plan_from(msg: pb.Start | pb.Outcome) -> KPlan | None:
    """A Start's or an Outcome's `plan` -> KPlan (None when unset); ValueError naming the field."""
    if not msg.HasField("plan"):
        return None
    p = msg.plan
    for name in ("k", "if_accepted", "if_rejected", "miss_k"):
        if getattr(p, name) > 64:
            raise ValueError(f"{type(msg).__name__}.plan.{name} is {getattr(p, name)}: "
                             "ask for at most 64 drafts a round")
    return KPlan(int(p.k), int(p.if_accepted), int(p.if_rejected), int(p.miss_k) if p.HasField("miss_k") else None)


def _rows(x: Any) -> list[list]:
    """A [k, m] tensor, array or list of lists (or None) -> a list of k python lists."""
    if x is None:
        return []
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [r.tolist() if hasattr(r, "tolist") else list(r) for r in x]


def proposal_message(seq: str, prop: Any, draft_s: float = 0.0) -> pb.DraftMessage:
    """An engine `Proposal` (round, token_ids, q_ids, q_probs, cache_hit) -> a DraftMessage."""
    ids, probs = _rows(prop.q_ids), _rows(prop.q_probs)
    if len(ids) != len(probs):
        raise ValueError(f"proposal has {len(ids)} q_ids rows but {len(probs)} q_probs rows")
    q = [pb.SparseDist(ids=i, probs=p) for i, p in zip(ids, probs)]
    return pb.DraftMessage(proposal=pb.Proposal(
        seq=seq, round=int(prop.round), token_ids=[int(t) for t in prop.token_ids], q=q,
        cache_hit=bool(prop.cache_hit), draft_s=float(draft_s), late=bool(getattr(prop, "late", False))))


def proposal_fields(msg: pb.Proposal) -> dict[str, Any]:
    """A Proposal message -> the fields of the engine's `Proposal` (q lists are [] when greedy)."""
    return {
        "round": int(msg.round),
        "token_ids": list(msg.token_ids),
        "q_ids": [list(d.ids) for d in msg.q],
        "q_probs": [list(d.probs) for d in msg.q],
        "cache_hit": bool(msg.cache_hit),
        "late": bool(msg.late),
    }


def error_message(seq: str, code: int, message: str) -> pb.DraftMessage:
    return pb.DraftMessage(error=pb.Error(seq=seq, code=code, message=message))


def message_seq(msg: pb.TargetMessage | pb.DraftMessage) -> str:
    """The `seq` a message is about ("" when its oneof is empty, for a Batch / Replies of many, or a Forget)."""
    kind = msg.WhichOneof("kind")
    return getattr(msg, kind).seq if kind and kind not in ("batch", "replies", "forget") else ""


def draft_cache_key(key: str) -> str:
    """What Start.cache_key / Forget.cache_key carry for a conversation's key: a hash (the draft
    needs a key to match turns, not the session's id)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""


def unbatch(msg: pb.TargetMessage | pb.DraftMessage) -> list:
    """A Batch's messages as single TargetMessages (stops, starts, outcomes), a Replies' as single
    DraftMessages (proposals, errors); any other message as itself."""
    kind = msg.WhichOneof("kind")
    if kind == "batch":
        b = msg.batch
        return ([pb.TargetMessage(stop=m) for m in b.stops] + [pb.TargetMessage(start=m) for m in b.starts]
                + [pb.TargetMessage(outcome=m) for m in b.outcomes])
    if kind == "replies":
        r = msg.replies
        return [pb.DraftMessage(proposal=m) for m in r.proposals] + [pb.DraftMessage(error=m) for m in r.errors]
    return [msg]


def replies_message(replies: list) -> pb.DraftMessage:
    """Single DraftMessages (proposals and errors) -> one DraftMessage.replies."""
    out = pb.Replies()
    for m in replies:
        if m.WhichOneof("kind") == "proposal":
            out.proposals.append(m.proposal)
        elif m.WhichOneof("kind") == "error":
            out.errors.append(m.error)
    return pb.DraftMessage(replies=out)
