"""A session that is gone frees its KV on the target, without Ray: RouterCore over an in-process
TargetReplica whose engine loop drops the session's parked slot between rounds.

DeleteSession (and a store that says a session expired) calls the target's `forget_session`,
routed like the session's turns; it is best effort: a failing, hanging or missing one never
fails the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from specserve.engine.engine import Engine
from specserve.serving.api import ApiError, GenParams, pb
from specserve.serving.engine_loop import EngineLoop
from specserve.serving.replica import SessionCache, TargetReplica
from specserve.serving.router import RouterCore
from specserve.sessions import MemorySessionStore

AR = pb.SpeculationParams(mode=pb.MODE_AR)


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


@pytest.fixture
def replica(tiny):
    """Two slots, so a parked slot is never dropped for room while a test watches it."""
    engine = Engine(tiny["target"], None, max_num_seqs=2, max_model_len=512, max_queue_len=4, probe=False)
    w = TargetReplica(tiny["target"], None, replica="r0", engine=engine)
    yield w
    w.close()


class LocalTarget:
    """RouterCore's target like the Router's handle over one replica: a session's cache is
    SessionCache(key=session id), as TargetDeployment makes it, and `forget_session` does what
    TargetDeployment.forget_session does."""

    def __init__(self, replica: TargetReplica, pool):
        self.replica, self.pool = replica, pool
        self.caches: dict[str, SessionCache] = {}
        self.forgotten: list[str] = []

    async def __call__(self, p: GenParams, sid: str):
        session = self.caches.setdefault(sid, SessionCache(key=sid)) if sid else None
        async for chunk in self.replica.generate(p, session, self.pool):
            yield chunk

    async def forget_session(self, sid: str) -> bool:
        self.forgotten.append(sid)
        return await self.replica.forget_session(self.caches.get(sid) or SessionCache(key=sid))


def run(coro):
    return asyncio.run(coro)


async def chat(core, message, sid="", tok="", max_tokens=8):
    chunks = [c async for c in core.chat(pb.ChatRequest(session_id=sid, session_token=tok, message=message,
                                                        max_tokens=max_tokens, speculation=AR))]
    return chunks[0].session_id, tok or chunks[0].session_token, chunks


def wait_idle(replica, timeout_s=10.0) -> None:
    t_end = time.monotonic() + timeout_s
    while (replica.active or replica.loop.engine.has_work()) and time.monotonic() < t_end:
        time.sleep(0.02)


def test_delete_session_frees_the_parked_slot_and_the_next_request_prefills_from_scratch(replica, pool):
    engine = replica.loop.engine
    target = LocalTarget(replica, pool)

    async def main():
        core = RouterCore(MemorySessionStore(), target)
        sid, tok, _ = await chat(core, "hello there")
        parked_after_turn = engine.capacity()["parked_slots"], list(engine.parked)
        _, _, turn2 = await chat(core, "tell me more", sid, tok)
        session = await core.get_session(pb.GetSessionRequest(session_id=sid, session_token=tok))
        reply = await core.delete_session(pb.DeleteSessionRequest(session_id=sid, session_token=tok))
        parked_after_delete = engine.capacity()["parked_slots"], engine.trun.cache.num_free
        # the same session id again, straight to the target (the router refuses a deleted session)
        history = [{"role": t.role, "content": t.content} for t in session.turns]
        again = [c async for c in target(GenParams(messages=history, mode="ar", max_tokens=4), sid)]
        return sid, parked_after_turn, turn2, reply, parked_after_delete, again

    sid, parked_after_turn, turn2, reply, parked_after_delete, again = run(main())
    assert parked_after_turn == (1, [sid])  # the turn parked its slot under the session id
    assert turn2[-1].stats.prefix_reused > 0  # ... and the next turn reused it
    assert reply.deleted and target.forgotten == [sid]
    assert parked_after_delete == (0, engine.trun.cache.slots)  # freed by the time DeleteSession answered
    assert again[-1]["stats"]["prefix_reused"] == 0  # nothing of the session was left to reuse


def test_a_session_deleted_mid_turn_does_not_park_its_slot(replica, pool):
    """The turn still running when its session is deleted frees its slot when it ends."""
    engine = replica.loop.engine
    target = LocalTarget(replica, pool)
    running = []

    async def main():
        core = RouterCore(MemorySessionStore(), target)
        sid, tok, _ = await chat(core, "hello there")  # parks a slot
        agen = core.chat(pb.ChatRequest(session_id=sid, session_token=tok, message="a long answer please",
                                        max_tokens=300, speculation=AR))
        await agen.__anext__()
        running.append(engine.has_work() and not engine.parked)  # batched, in the slot it took from the park
        reply = await core.delete_session(pb.DeleteSessionRequest(session_id=sid, session_token=tok))
        with pytest.raises(ApiError) as e:  # the turn's next write finds the session gone
            async for _ in agen:
                pass
        return sid, reply, e.value

    sid, reply, err = run(main())
    assert running == [True] and reply.deleted and err.code == "NOT_FOUND"
    wait_idle(replica)
    assert target.forgotten[0] == sid and not engine.parked
    assert engine.trun.cache.num_free == engine.trun.cache.slots


def test_an_expired_session_is_forgotten_when_the_store_says_so(replica, pool):
    engine = replica.loop.engine
    target = LocalTarget(replica, pool)

    async def main():
        core = RouterCore(MemorySessionStore(ttl_s=1.0), target)
        sid, tok, _ = await chat(core, "hello there", max_tokens=4)
        parked = list(engine.parked)
        await asyncio.sleep(1.2)
        with pytest.raises(ApiError) as e:
            await chat(core, "still there?", sid, tok)
        return sid, parked, e.value

    sid, parked, err = run(main())
    assert parked == [sid] and err.code == "NOT_FOUND"
    assert target.forgotten == [sid] and not engine.parked


def test_a_per_sequence_session_drops_its_own_kv_cache(tiny, pool):
    w = TargetReplica(tiny["target"], None, replica="solo")  # no engine: the session keeps its own cache
    target = LocalTarget(w, pool)

    async def main():
        core = RouterCore(MemorySessionStore(), target)
        sid, tok, _ = await chat(core, "hello there")
        held = target.caches[sid].kv is not None and len(target.caches[sid].ids) > 0
        reply = await core.delete_session(pb.DeleteSessionRequest(session_id=sid, session_token=tok))
        return sid, held, reply

    try:
        sid, held, reply = run(main())
    finally:
        w.close()
    assert held and reply.deleted
    assert target.caches[sid].kv is None and target.caches[sid].ids == []


class Unhelpful:
    """A target whose forget_session fails (raises, or never answers); turns work."""

    def __init__(self, inner: LocalTarget, hang: bool):
        self.inner, self.hang, self.calls = inner, hang, 0

    def __call__(self, p, sid):
        return self.inner(p, sid)

    async def forget_session(self, sid):
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        raise ConnectionError("the target replica died")


@pytest.mark.parametrize("hang", [False, True], ids=["raises", "hangs"])
def test_a_failing_target_does_not_fail_delete_session(replica, pool, caplog, hang):
    target = Unhelpful(LocalTarget(replica, pool), hang)

    async def main():
        core = RouterCore(MemorySessionStore(), target, forget_timeout_s=0.2)
        sid, tok, _ = await chat(core, "hello there")
        reply = await core.delete_session(pb.DeleteSessionRequest(session_id=sid, session_token=tok))
        with pytest.raises(ApiError) as e:
            await core.get_session(pb.GetSessionRequest(session_id=sid, session_token=tok))
        return sid, reply, e.value

    with caplog.at_level(logging.WARNING, logger="specserve.serving.router"):
        sid, reply, err = run(main())
    assert reply.deleted and err.code == "NOT_FOUND"  # the session is gone all the same
    assert target.calls == 2  # DeleteSession, then the GetSession that found it gone
    why = "TimeoutError" if hang else "ConnectionError: the target replica died"
    assert any(sid in r.getMessage() and why in r.getMessage() for r in caplog.records), caplog.text


def test_a_target_without_forget_session_still_deletes(replica, pool):
    inner = LocalTarget(replica, pool)

    async def plain(p, sid):  # an old fake: just the TargetCall
        async for chunk in inner(p, sid):
            yield chunk

    async def main():
        core = RouterCore(MemorySessionStore(), plain)
        sid, tok, _ = await chat(core, "hello there")
        return await core.delete_session(pb.DeleteSessionRequest(session_id=sid, session_token=tok))

    assert run(main()).deleted and inner.forgotten == []


def test_the_engine_loop_drops_between_rounds_and_refuses_once_closed(tiny):
    engine = Engine(tiny["target"], None, max_num_seqs=1, max_model_len=128, probe=False)
    loop = EngineLoop(engine)
    try:
        assert loop.drop_parked("nobody").result(timeout=10) is False
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.drop_parked("nobody").result(timeout=10)


def test_the_deployment_forgets_without_loading_a_session(tiny, pool):
    """TargetDeployment.forget_session, called as Serve would (no Ray cluster needed for this)."""
    import weakref

    from deployments import target as dep

    engine = Engine(tiny["target"], None, max_num_seqs=2, max_model_len=256, probe=False)
    obj = dep.TargetDeployment.func_or_class.__new__(dep.TargetDeployment.func_or_class)
    obj.replica_core = TargetReplica(tiny["target"], None, replica="r0", engine=engine)
    obj.sessions = weakref.WeakValueDictionary()  # as __init__ makes them (it loads a model: not run here)
    load = dep._session_loader(obj.sessions)

    async def main():
        session = await load("sid-1")  # what Serve's multiplexing loads for a session's turn
        [c async for c in obj.replica_core.generate(GenParams(prompt="hello", mode="ar", max_tokens=4), session,
                                                    pool)]
        parked = list(engine.parked)
        freed = await obj.forget_session("sid-1")
        unknown = await obj.forget_session("sid-never-seen")
        return session, parked, freed, unknown

    try:
        session, parked, freed, unknown = run(main())
    finally:
        obj.replica_core.close()
    assert parked == ["sid-1"] and freed and not engine.parked
    assert unknown is False and list(obj.sessions) == ["sid-1"]  # forgetting loaded nothing
