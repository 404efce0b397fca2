"""The serving logic without Ray: RouterCore over a TargetReplica in this process, real sessions.

The Ray Serve app (tests/test_serve_app.py) wraps exactly these objects; here the same rules are
checked in milliseconds: validation, exactness per mode, chat history and prefix reuse, one turn
at a time, a target failing mid-turn, cancellation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from specserve.engine.engine import Engine
from specserve.engine.speculative import SpecConfig
from specserve.engine.single import generate
from specserve.pipeline.draft_server import serve as serve_draft
from specserve.serving.api import ApiError, GenParams, Limits, parse_generate, pb, stats_message
from specserve.serving.router import RouterCore
from specserve.serving.replica import SessionCache, TargetReplica
from specserve.sessions import MemorySessionStore, RedisSessionStore

PROMPTS = ["def add(a, b):", "The quick brown fox"]


@pytest.fixture(scope="module")
def draft_server(tiny):
    server = serve_draft(tiny["draft-same"], port=0)
    yield server
    server.stop(grace=0)


@pytest.fixture(scope="module")
def replica(tiny, draft_server):
    engine = Engine(tiny["target"], tiny["draft-same"], max_num_seqs=4, max_model_len=256, max_queue_len=8)
    w = TargetReplica(tiny["target"], tiny["draft-same"], draft_timeout=10.0, replica="r0", engine=engine)
    w.connect_draft(draft_server.address)
    yield w
    w.close()


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(4) as p:
        yield p


def local_target(replica, pool, caches: dict, fail_after: list | None = None):
    """A TargetCall like the Router's Serve handle: sessions keep their cache in `caches`."""

    async def call(p: GenParams, sid: str):
        session = caches.setdefault(sid, SessionCache()) if sid else None
        n = 0
        async for chunk in replica.generate(p, session, pool):
            if fail_after and n == fail_after[0]:
                raise ConnectionError("replica died")
            n += 1
            yield chunk

    return call


def ar_ids(tiny, text: str, n: int) -> list[int]:
    lm = tiny["target"]
    return [t for c in generate(lm, None, lm.encode(text), n, spec=SpecConfig(mode="ar")) for t in c.token_ids]


def run(coro):
    return asyncio.run(coro)


async def collect(agen):
    return [x async for x in agen]


@pytest.fixture(params=["memory", "redis"])
def new_store(request, redis_server):
    """A factory: a redis-py asyncio client is bound to the event loop that creates it."""
    import uuid

    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    return MemorySessionStore if request.param == "memory" else (lambda: RedisSessionStore(redis_server.url, prefix=prefix))


# ---------------------------------------------------------------------------- stateless


@pytest.mark.parametrize("mode", [pb.MODE_AR, pb.MODE_SD, pb.MODE_SSD])
def test_generate_is_exact_in_every_mode(tiny, replica, pool, mode):
    core = RouterCore(MemorySessionStore(), local_target(replica, pool, {}))
    for text in PROMPTS:
        req = pb.GenerateRequest(prompt=text, max_tokens=24, speculation=pb.SpeculationParams(mode=mode))
        reply = run(core.generate(req))
        assert list(reply.token_ids) == ar_ids(tiny, text, 24)
        assert reply.stats.mode == {1: "ar", 2: "sd", 3: "ssd"}[mode] and reply.stats.replica == "r0"
        chunks = run(collect(core.generate_stream(req)))
        assert [t for c in chunks for t in c.token_ids] == list(reply.token_ids)
        assert all(not c.HasField("stats") for c in chunks[:-1]) and chunks[-1].stats.new_tokens == 24
    if mode == pb.MODE_SSD:
        assert reply.stats.cache_hits > 0 and not reply.stats.fallback


def test_concurrent_requests_share_the_engine_and_stay_exact(tiny, replica, pool):
    """ar and sd requests without a session are batched: one engine round serves several of them."""
    core = RouterCore(MemorySessionStore(), local_target(replica, pool, {}))
    texts = PROMPTS * 3
    for mode in (pb.MODE_AR, pb.MODE_SD):
        before = dict(vars(replica.loop.engine.stats))

        async def many():
            reqs = [pb.GenerateRequest(prompt=t, max_tokens=20, speculation=pb.SpeculationParams(mode=mode))
                    for t in texts]
            return await asyncio.gather(*(core.generate(r) for r in reqs))

        replies = run(many())
        for text, reply in zip(texts, replies):
            assert list(reply.token_ids) == ar_ids(tiny, text, 20), (mode, text)
        st = replica.loop.engine.stats
        rounds, rows = st.rounds - before["rounds"], st.row_rounds - before["row_rounds"]
        assert rows / rounds > 1.5, (rows, rounds)  # they really shared forwards
    assert replica.active == 0


def test_a_full_engine_queue_is_resource_exhausted_naming_the_limit(tiny, pool):
    engine = Engine(tiny["target"], None, max_num_seqs=1, max_model_len=128, max_queue_len=1, probe=False)
    w = TargetReplica(tiny["target"], None, replica="small", engine=engine)
    core = RouterCore(MemorySessionStore(), local_target(w, pool, {}))

    async def flood():
        ar = pb.SpeculationParams(mode=pb.MODE_AR)
        reqs = [core.generate(pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=40, speculation=ar)) for _ in range(5)]
        return await asyncio.gather(*reqs, return_exceptions=True)

    try:
        out = run(flood())
    finally:
        w.close()
    full = [e for e in out if isinstance(e, ApiError)]
    assert full and all(e.code == "RESOURCE_EXHAUSTED" and "max_queue_len" in e.message for e in full), out
    done = [r for r in out if not isinstance(r, Exception)]
    assert done and all(list(r.token_ids) == ar_ids(tiny, PROMPTS[0], 40) for r in done)


def test_a_failing_engine_round_fails_its_requests_and_the_loop_goes_on(tiny, monkeypatch):
    from specserve.engine.sequence import Request, SpeculationParams
    from specserve.serving.engine_loop import EngineLoop

    engine = Engine(tiny["target"], None, max_num_seqs=2, max_model_len=128, probe=False)
    loop = EngineLoop(engine)
    ids = tiny["target"].encode(PROMPTS[0])

    async def one():
        req = Request(ids, 8, spec=SpeculationParams("ar"))
        return [t async for chunk, _ in loop.stream(req) for t in chunk.token_ids]

    real, calls = engine.step, []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a forward failed")
        return real()

    monkeypatch.setattr(engine, "step", failing)
    try:
        with pytest.raises(RuntimeError, match="a forward failed"):
            run(one())
        assert run(one()) == ar_ids(tiny, PROMPTS[0], 8)  # the slot was freed, the next request runs
        assert engine.trun.cache.num_free == 2
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        run(one())


def test_ssd_without_a_draft_runs_ar_and_says_why(tiny, pool):
    w = TargetReplica(tiny["target"], None, replica="solo")
    core = RouterCore(MemorySessionStore(), local_target(w, pool, {}))
    reply = run(core.generate(pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=8)))
    assert list(reply.token_ids) == ar_ids(tiny, PROMPTS[0], 8)
    assert reply.stats.mode == "ar" and "no draft deployment" in reply.stats.fallback
    with pytest.raises(ApiError, match="mode sd needs a draft") as e:
        run(core.generate(pb.GenerateRequest(prompt="x", speculation=pb.SpeculationParams(mode=pb.MODE_SD))))
    assert e.value.code == "FAILED_PRECONDITION"


def test_worker_refuses_prompts_over_the_context_window(tiny, replica):
    n = tiny["target"].max_len
    with pytest.raises(ApiError, match=f"context window is {n}") as e:
        next(replica.stream(GenParams(prompt_ids=[1] * n, mode="ar")))
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ApiError, match="outside the vocabulary"):
        next(replica.stream(GenParams(prompt_ids=[10 ** 6], mode="ar")))


def test_limits_pick_the_default_mode_and_refuse_modes_not_served():
    lim = Limits(modes=("ar",), default_mode="ar")
    assert parse_generate(pb.GenerateRequest(prompt="x"), lim).mode == "ar"
    with pytest.raises(ApiError, match="not available") as e:
        parse_generate(pb.GenerateRequest(prompt="x", speculation=pb.SpeculationParams(mode=pb.MODE_SSD)), lim)
    assert e.value.code == "FAILED_PRECONDITION"


def test_bearer_and_session_tokens():
    from specserve.serving.api import check_bearer, check_session_token, session_token

    check_bearer(None, None)  # no token configured: anyone
    check_bearer("s3cret", "Bearer s3cret")
    for bad in (None, "", "Bearer nope", "s3cret", "Bearer s3cret2"):
        with pytest.raises(ApiError, match="authorization: Bearer") as e:
            check_bearer("s3cret", bad)
        assert e.value.code == "UNAUTHENTICATED"
    k1, k2 = b"k" * 32, b"j" * 32
    t = session_token(k1, "abc")
    check_session_token(k1, "abc", t)
    for key, sid, tok in ((k2, "abc", t), (k1, "abd", t), (k1, "abc", "")):
        with pytest.raises(ApiError) as e:
            check_session_token(key, sid, tok)
        assert e.value.code == "PERMISSION_DENIED"


def test_stats_message_keeps_the_counters():
    m = stats_message({"new_tokens": 5, "rounds": 2, "acceptance_rate": 0.5, "mode": "sd", "extra": 1,
                       "fallback": ""})
    assert (m.new_tokens, m.rounds, m.mode) == (5, 2, "sd") and abs(m.acceptance_rate - 0.5) < 1e-6


# ---------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def unbatched(tiny, draft_server):
    """A replica without an engine: every request per sequence (a session keeps its own KV cache)."""
    w = TargetReplica(tiny["target"], tiny["draft-same"], draft_timeout=10.0, replica="r0")
    w.connect_draft(draft_server.address)
    yield w
    w.close()


@pytest.mark.parametrize("mode, batched", [(pb.MODE_SSD, True), (pb.MODE_SD, True), (pb.MODE_SSD, False)],
                         ids=["ssd-batched", "sd-batched", "ssd-per-sequence"])
def test_three_turn_chat_keeps_history_and_reuses_the_prefix(replica, unbatched, pool, new_store, draft_server,
                                                             mode, batched):
    rounds_before = replica.loop.engine.stats.rounds
    draft_reused_before = draft_server.servicer.stats()["reused_tokens"]
    policy = replica.loop.engine.policy
    held = policy.k_ssd, policy.hysteresis
    policy.k_ssd, policy.hysteresis = 3, 1e9  # ssd rows speculate from their first round, whatever the costs
    target = replica if batched else unbatched

    caches: dict = {}

    async def main():
        core = RouterCore(new_store(), local_target(target, pool, caches))
        sid, tok, out = "", "", []
        for msg in ("hello there", "tell me more", "and once more"):
            chunks = await collect(core.chat(pb.ChatRequest(session_id=sid, session_token=tok, message=msg,
                                                            max_tokens=10, system="be brief",
                                                            speculation=pb.SpeculationParams(mode=mode))))
            sid, tok = chunks[0].session_id, tok or chunks[0].session_token
            assert all(c.session_id == sid for c in chunks)
            assert all(c.session_token == (tok if not out else "") for c in chunks)  # given out once
            out.append(chunks)
        with pytest.raises(ApiError) as denied:
            await core.get_session(pb.GetSessionRequest(session_id=sid))
        assert denied.value.code == "PERMISSION_DENIED" and "session_token" in denied.value.message
        with pytest.raises(ApiError) as denied:
            await collect(core.chat(pb.ChatRequest(session_id=sid, session_token=tok[::-1], message="hi")))
        assert denied.value.code == "PERMISSION_DENIED"
        session = await core.get_session(pb.GetSessionRequest(session_id=sid, session_token=tok))
        deleted = await core.delete_session(pb.DeleteSessionRequest(session_id=sid, session_token=tok))
        with pytest.raises(ApiError) as e:
            await core.get_session(pb.GetSessionRequest(session_id=sid, session_token=tok))
        await core.store.close()
        return sid, out, session, deleted, e.value

    try:
        sid, out, session, deleted, err = run(main())
    finally:
        policy.k_ssd, policy.hysteresis = held
    reused = [chunks[-1].stats.prefix_reused for chunks in out]
    assert reused[0] == 0 and reused[1] > 0 and reused[2] > reused[1]
    draft_reused = draft_server.servicer.stats()["reused_tokens"] - draft_reused_before
    if mode == pb.MODE_SSD:  # the draft worker kept the conversation's KV too (Start.cache_key)
        assert draft_reused >= reused[1], (draft_reused, reused)
        def parked_when(done, timeout=10.0):  # the worker applies Stop / Forget after the client is answered
            deadline = time.monotonic() + timeout
            while not done(n := draft_server.servicer.stats()["parked"]) and time.monotonic() < deadline:
                time.sleep(0.02)
            return n

        parked = parked_when(lambda n: n >= 1)
        assert parked >= 1  # the last turn's draft slot, kept for the next turn
        run(target.forget_session(caches[sid]))  # ... and dropped when the session is gone (Forget)
        assert parked_when(lambda n: n < parked) == parked - 1
    else:
        assert draft_reused == 0
    assert [t.role for t in session.turns] == ["system"] + ["user", "assistant"] * 3
    assert session.turns[1].content == "hello there" and session.turns[5].content == "and once more"
    for i, chunks in enumerate(out):  # each assistant turn is exactly what was streamed
        assert session.turns[2 + 2 * i].content == "".join(c.text for c in chunks)
        assert session.turns[2 + 2 * i].tokens == sum(len(c.token_ids) for c in chunks)
    assert not session.busy and session.replica == "r0"
    assert (replica.loop.engine.stats.rounds > rounds_before) == batched  # which path ran
    assert all(c.stats.mode == pb.Mode.Name(mode)[5:].lower() for c in (chunks[-1] for chunks in out))
    assert deleted.deleted
    assert err.code == "NOT_FOUND" and sid in err.message


def test_a_second_turn_at_the_same_time_is_refused(replica, pool, new_store):
    async def main():
        core = RouterCore(new_store(), local_target(replica, pool, {}))
        first = await collect(core.chat(pb.ChatRequest(message="hi", max_tokens=4)))
        sid, tok = first[0].session_id, first[0].session_token

        async def turn(msg):
            try:
                return await collect(core.chat(pb.ChatRequest(session_id=sid, session_token=tok, message=msg,
                                                              max_tokens=30)))
            except ApiError as e:
                return e

        results = await asyncio.gather(turn("one"), turn("two"))
        session = await core.get_session(pb.GetSessionRequest(session_id=sid, session_token=tok))
        await core.store.close()
        return results, session

    results, session = run(main())
    errors = [r for r in results if isinstance(r, ApiError)]
    assert len(errors) == 1 and errors[0].code == "FAILED_PRECONDITION"
    assert [t.role for t in session.turns] == ["user", "assistant"] * 2  # never interleaved


def test_target_failing_mid_turn_keeps_exactly_the_committed_tokens(replica, pool, new_store):
    fail = [3]  # the "replica" dies after 3 chunks

    async def main():
        core = RouterCore(new_store(), local_target(replica, pool, {}, fail), retries=0)  # no resume (test_resume.py)
        got = []
        with pytest.raises(ApiError) as e:
            async for c in core.chat(pb.ChatRequest(message="hello", max_tokens=20,
                                                    speculation=pb.SpeculationParams(mode=pb.MODE_AR))):
                got.append(c)
        sid, tok = got[0].session_id, got[0].session_token
        s = await core.get_session(pb.GetSessionRequest(session_id=sid, session_token=tok))
        fail.clear()  # the next turn works and sees the partial reply in its history
        chunks = await collect(core.chat(pb.ChatRequest(session_id=sid, session_token=tok, message="go on",
                                                        max_tokens=5)))
        after = await core.get_session(pb.GetSessionRequest(session_id=sid, session_token=tok))
        await core.store.close()
        return got, e.value, s, chunks, after

    got, err, s, chunks, after = run(main())
    assert err.code == "UNAVAILABLE" and "retry" in err.message and len(got) == 3
    assert [t.role for t in s.turns] == ["user", "assistant"] and not s.turns[1].complete
    assert s.turns[1].tokens == sum(len(c.token_ids) for c in got) and not s.busy
    assert s.turns[1].content == "".join(c.text for c in got)
    assert chunks[-1].stats.new_tokens == 5 and len(after.turns) == 4


def test_failures_before_the_first_chunk_are_retried(replica, pool):
    calls = []
    inner = local_target(replica, pool, {})

    async def flaky(p, sid):
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("replica restarting")
        async for c in inner(p, sid):
            yield c

    core = RouterCore(MemorySessionStore(), flaky, retries=2)
    reply = run(core.generate(pb.GenerateRequest(prompt="hi", max_tokens=4)))
    assert len(calls) == 3 and len(reply.token_ids) == 4


def test_a_cancelled_batched_stream_frees_its_slot(replica, pool):
    core = RouterCore(MemorySessionStore(), local_target(replica, pool, {}))
    req = pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=200, speculation=pb.SpeculationParams(mode=pb.MODE_AR))

    async def cancel_early():
        agen = core.generate_stream(req)
        await agen.__anext__()
        assert replica.active == 1 and replica.loop.engine.has_work()
        await agen.aclose()

    run(cancel_early())
    for _ in range(50):
        if replica.active == 0 and not replica.loop.engine.has_work():
            break
        threading.Event().wait(0.1)
    engine = replica.loop.engine
    free = engine.trun.cache.num_free + len(engine.parked)  # earlier chat turns park their slots
    assert replica.active == 0 and not engine.has_work() and free == engine.trun.cache.slots


def test_cancelled_stream_frees_target_and_draft(replica, pool, draft_server):
    core = RouterCore(MemorySessionStore(), local_target(replica, pool, {}))
    req = pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=400, speculation=pb.SpeculationParams(mode=pb.MODE_SSD))

    async def cancel_early():
        agen = core.generate_stream(req)
        await agen.__anext__()
        await agen.__anext__()
        assert replica.active == 1 and draft_server.servicer.stats()["sequences_open"] == 1
        await agen.aclose()  # what Serve does when the client goes away

    run(cancel_early())
    deadline = threading.Event()
    for _ in range(50):
        if replica.active == 0 and draft_server.servicer.stats()["sequences_open"] == 0:
            break
        deadline.wait(0.1)
    assert replica.active == 0 and draft_server.servicer.stats()["sequences_open"] == 0
