"""Session stores: the same contract for MemorySessionStore and RedisSessionStore (a private
redis-server from the redis_server fixture, never the machine's 6379), plus Redis-only checks:
keys expire, AOF survives a crash, an unreachable Redis raises StoreUnavailable."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from specserve.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionBusy,
    SessionError,
    SessionNotFound,
    StoreUnavailable,
    Turn,
    open_store,
)


@pytest.fixture(params=["memory", "redis"])
def kind(request):
    return request.param


@pytest.fixture
def make_store(kind, request):
    """make_store(ttl_s=...) -> a new store; Redis stores of one test share a unique key prefix."""
    if kind == "memory":
        return lambda ttl_s=86400.0: MemorySessionStore(ttl_s=ttl_s)
    server = request.getfixturevalue("redis_server")
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    return lambda ttl_s=86400.0: RedisSessionStore(server.url, ttl_s=ttl_s, prefix=prefix)


def run(make_store, body, ttl_s=86400.0):
    """asyncio.run(body(store)) with a fresh store, closed afterwards."""

    async def main():
        store = make_store(ttl_s=ttl_s)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def turn(store, sid, user, chunks, complete=True):
    """One whole turn: chunks is [(token_ids, text), ...]."""
    t = await store.begin_turn(sid, user)
    for ids, text in chunks:
        await store.append(sid, t, ids, text)
    return await store.end_turn(sid, t, complete=complete)


# -----------------------------------------------------------------------------
# the contract, both stores


def test_create_get_delete(make_store):
    async def body(store):
        s = await store.create()
        assert len(s.id) == 32 and s.turns == [] and not s.busy and s.replica == ""
        assert s.created > 1e9 and s.updated >= s.created
        got = await store.get(s.id)
        assert got == s
        mine = await store.create(session_id="my-id_1")
        assert mine.id == "my-id_1" and await store.get("my-id_1") == mine
        with pytest.raises(SessionError, match="'my-id_1' already exists"):
            await store.create(session_id="my-id_1")
        with pytest.raises(SessionError, match="invalid session id"):
            await store.create(session_id="a:turns")
        assert await store.delete(s.id) is True
        assert await store.delete(s.id) is False
        assert await store.delete("no:such id") is False
        for call in (
            store.get(s.id),
            store.begin_turn(s.id, "hi"),
            store.append(s.id, "t", [1], "x"),
            store.end_turn(s.id, "t"),
            store.set_replica(s.id, "r"),
        ):
            with pytest.raises(SessionNotFound) as e:
                await call
            assert repr(s.id) in str(e.value) and "start a new one" in str(e.value)
        with pytest.raises(SessionNotFound, match="'x:turns'"):
            await store.get("x:turns")
        await store.ping()

    run(make_store, body)


def test_system_prompt_and_messages(make_store):
    async def body(store):
        s = await store.create(system="Be brief.")
        assert s.turns == [Turn("system", "Be brief.")]
        s = await turn(store, s.id, "hi", [([5, 6], "hello")])
        assert s.messages() == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
        assert (await store.create(system="")).turns == []

    run(make_store, body)


def test_three_turn_conversation(make_store):
    async def body(store):
        sid = (await store.create(system="sys")).id
        expect = [Turn("system", "sys")]
        for i in range(3):
            user = f"question {i} héllo ✓ \"quoted\" / \\ \n"
            chunks = [([100 * i + j, 100 * i + j + 1], f"<{i}.{j} ü>") for j in range(4)]
            before = await store.get(sid)
            s = await turn(store, sid, user, chunks)
            ids = [t for c in chunks for t in c[0]]
            expect += [Turn("user", user), Turn("assistant", "".join(c[1] for c in chunks), ids, True)]
            assert s.turns == expect and not s.busy
            assert s.updated >= before.updated and s.created == before.created
            assert await store.get(sid) == s
        # a turn that committed nothing but completed (e.g. max_new_tokens=0) is kept
        s = await turn(store, sid, "empty", [])
        assert s.turns[-2:] == [Turn("user", "empty"), Turn("assistant", "", [], True)]

    run(make_store, body)


def test_get_while_busy_shows_the_turn_in_progress(make_store):
    async def body(store):
        sid = (await store.create()).id
        t = await store.begin_turn(sid, "hi")
        s = await store.get(sid)
        assert s.busy and s.turns == [Turn("user", "hi"), Turn("assistant", "", [], False)]
        await store.append(sid, t, [1, 2], "ab")
        await store.append(sid, t, [], "")
        await store.append(sid, t, [3], "c")
        s = await store.get(sid)
        assert s.busy and s.turns == [Turn("user", "hi"), Turn("assistant", "abc", [1, 2, 3], False)]
        s = await store.end_turn(sid, t)
        assert not s.busy and s.turns == [Turn("user", "hi"), Turn("assistant", "abc", [1, 2, 3], True)]

    run(make_store, body)


def test_concurrent_begin_turn_one_wins(make_store):
    async def body(store):
        for _ in range(5):
            sid = (await store.create()).id
            res = await asyncio.gather(*(store.begin_turn(sid, f"m{i}") for i in range(2)), return_exceptions=True)
            won = [r for r in res if isinstance(r, str)]
            lost = [r for r in res if isinstance(r, SessionBusy)]
            assert len(won) == 1 and len(lost) == 1, res
            assert repr(sid) in str(lost[0]) and "busy" in str(lost[0])
            s = await store.get(sid)
            assert s.busy and len(s.turns) == 2

    run(make_store, body)


def test_concurrent_turns_never_interleave(make_store):
    async def worker(store, sid, w, n_turns):
        for k in range(n_turns):
            while True:
                try:
                    t = await store.begin_turn(sid, f"w{w}k{k}")
                    break
                except SessionBusy:
                    await asyncio.sleep(0.001)
            for j in range(3):
                await store.append(sid, t, [w * 1000 + k * 10 + j], f"w{w}k{k}.{j};")
                await asyncio.sleep(0)
            await store.end_turn(sid, t)

    async def body(store):
        sid = (await store.create()).id
        await asyncio.gather(*(worker(store, sid, w, 3) for w in range(6)))
        s = await store.get(sid)
        assert len(s.turns) == 2 * 6 * 3 and not s.busy
        seen = set()
        for u, a in zip(s.turns[::2], s.turns[1::2]):
            assert u.role == "user" and a.role == "assistant" and a.complete
            w, k = map(int, u.content[1:].split("k"))
            assert a.content == "".join(f"{u.content}.{j};" for j in range(3))
            assert a.token_ids == [w * 1000 + k * 10 + j for j in range(3)]
            seen.add(u.content)
        assert len(seen) == 18

        # many concurrent appends to one turn: every (ids, text) pair lands whole, in one order
        t = await store.begin_turn(sid, "many")
        await asyncio.gather(*(store.append(sid, t, [i, i], f"<{i}>") for i in range(50)))
        a = (await store.end_turn(sid, t)).turns[-1]
        order = [int(x) for x in a.content[1:-1].split("><")]
        assert sorted(order) == list(range(50))
        assert a.token_ids == [i for i in order for _ in range(2)]

    run(make_store, body)


def test_wrong_turn_token(make_store):
    async def body(store):
        sid = (await store.create()).id
        t = await store.begin_turn(sid, "hi")
        with pytest.raises(SessionBusy, match="does not hold the session") as e:
            await store.append(sid, "not-the-token", [1], "x")
        assert repr(sid) in str(e.value)
        with pytest.raises(SessionBusy):
            await store.end_turn(sid, "not-the-token")
        await store.append(sid, t, [1], "x")
        await store.end_turn(sid, t)
        with pytest.raises(SessionBusy):  # the turn has ended: its token is spent
            await store.append(sid, t, [2], "y")
        with pytest.raises(SessionBusy):
            await store.end_turn(sid, t)
        s = await store.get(sid)
        assert s.turns == [Turn("user", "hi"), Turn("assistant", "x", [1], True)] and not s.busy

    run(make_store, body)


def test_lease_expiry(make_store):
    async def body(store):
        sid = (await store.create()).id
        # appends renew the lease: 3 x 0.15 s > one 0.3 s lease, still held
        t = await store.begin_turn(sid, "q1", lease_s=0.3)
        for i in range(3):
            await asyncio.sleep(0.15)
            await store.append(sid, t, [i], str(i))
        with pytest.raises(SessionBusy):
            await store.begin_turn(sid, "q2")
        # silence past the lease: the turn is lost, keeping what it committed
        await asyncio.sleep(0.4)
        s = await store.get(sid)
        assert not s.busy and s.turns == [Turn("user", "q1"), Turn("assistant", "012", [0, 1, 2], False)]
        with pytest.raises(SessionBusy, match="lease expired"):
            await store.append(sid, t, [9], "9")
        t2 = await store.begin_turn(sid, "q2", lease_s=0.2)
        with pytest.raises(SessionBusy):
            await store.end_turn(sid, t)
        # a lost turn with nothing committed leaves no trace
        await asyncio.sleep(0.3)
        assert (await store.get(sid)).turns == s.turns
        t3 = await store.begin_turn(sid, "q3")
        with pytest.raises(SessionBusy):
            await store.end_turn(sid, t2, complete=False)
        s = await store.end_turn(sid, t3)
        assert s.turns == [
            Turn("user", "q1"),
            Turn("assistant", "012", [0, 1, 2], False),
            Turn("user", "q3"),
            Turn("assistant", "", [], True),
        ]

    run(make_store, body)


def test_end_turn_incomplete(make_store):
    async def body(store):
        sid = (await store.create(system="s")).id
        s = await turn(store, sid, "cut", [([7, 8], "ab")], complete=False)
        assert s.turns == [Turn("system", "s"), Turn("user", "cut"), Turn("assistant", "ab", [7, 8], False)]
        s = await turn(store, sid, "nothing", [], complete=False)
        assert s.turns == [Turn("system", "s"), Turn("user", "cut"), Turn("assistant", "ab", [7, 8], False)]
        assert (await store.get(sid)) == s and not s.busy

    run(make_store, body)


def test_set_replica(make_store):
    async def body(store):
        sid = (await store.create()).id
        await store.set_replica(sid, "target-2")
        assert (await store.get(sid)).replica == "target-2"
        s = await turn(store, sid, "hi", [([1], "a")])
        assert s.replica == "target-2"

    run(make_store, body)


def test_ttl_expiry(make_store, kind):
    async def body(store):
        a = (await store.create(system="a")).id
        b = (await store.create(system="b")).id
        tb = await store.begin_turn(b, "hi")
        await store.append(b, tb, [1], "x")
        if kind == "redis":
            ttls = [await store._r.pttl(k) for k in store.keys(b)]
            assert all(0 < t <= 1000 for t in ttls), ttls
        await asyncio.sleep(0.6)
        await store.set_replica(b, "r")  # a write renews b's expiry
        await asyncio.sleep(0.6)
        with pytest.raises(SessionNotFound, match=repr(a)):
            await store.get(a)
        assert (await store.get(b)).replica == "r"
        if kind == "redis":
            assert await store._r.exists(*store.keys(a)) == 0
        await asyncio.sleep(0.6)
        with pytest.raises(SessionNotFound):
            await store.get(b)
        with pytest.raises(SessionNotFound):
            await store.append(b, tb, [2], "y")
        if kind == "redis":
            assert await store._r.keys(store.prefix + "*") == []

    run(make_store, body, ttl_s=1.0)


# -----------------------------------------------------------------------------
# Redis only


def test_redis_key_layout(redis_server):
    async def body():
        store = RedisSessionStore(redis_server.url, ttl_s=100, prefix=f"t:{uuid.uuid4().hex[:8]}:")
        try:
            sid = (await store.create(system="s")).id
            t = await store.begin_turn(sid, "hi")
            await store.append(sid, t, [1, 2], "ab")
            meta, turns, partial, ids = store.keys(sid)
            assert meta == store.prefix + sid
            assert sorted(await store._r.keys(store.prefix + "*")) == sorted(store.keys(sid))
            assert set(await store._r.hgetall(meta)) == {"created", "updated", "replica"}
            assert set(await store._r.hgetall(partial)) == {"turn", "deadline", "lease", "user", "text"}
            assert await store._r.lrange(ids, 0, -1) == ["1", "2"]
            assert await store._r.llen(turns) == 1
            await store.end_turn(sid, t)
            assert await store._r.exists(partial, ids) == 0 and await store._r.llen(turns) == 3
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_restart_keeps_sessions(redis_server):
    async def body():
        store = RedisSessionStore(redis_server.url, prefix=f"t:{uuid.uuid4().hex[:8]}:")
        try:
            sid = (await store.create(system="s")).id
            await turn(store, sid, "q1", [([1, 2], "ab")])
            await store.set_replica(sid, "r1")
            t = await store.begin_turn(sid, "q2")
            await store.append(sid, t, [3], "c")
            before = await store.get(sid)
            # A crash: only the fsynced AOF remains. In a thread, so the event loop runs meanwhile
            # and sees the old connections close, as it would in a server.
            await asyncio.to_thread(redis_server.restart, kill=True)
            assert await store.get(sid) == before
            await store.append(sid, t, [4], "d")  # the same client reconnects, scripts reload
            s = await store.end_turn(sid, t)
            assert s.turns[-1] == Turn("assistant", "cd", [3, 4], True) and s.replica == "r1"
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_unavailable(redis_server):
    async def body():
        store = RedisSessionStore(redis_server.url, prefix=f"t:{uuid.uuid4().hex[:8]}:")
        try:
            sid = (await store.create()).id
            t = await store.begin_turn(sid, "hi")
            redis_server.stop()
            try:
                for call in (
                    store.ping(),
                    store.create(),
                    store.get(sid),
                    store.delete(sid),
                    store.begin_turn(sid, "x"),
                    store.append(sid, t, [1], "a"),
                    store.end_turn(sid, t),
                    store.set_replica(sid, "r"),
                ):
                    with pytest.raises(StoreUnavailable) as e:
                        await call
                    assert redis_server.url in str(e.value) and "unavailable until" in str(e.value)
            finally:
                redis_server.start()
            await store.ping()
            await store.append(sid, t, [1], "a")
            assert (await store.end_turn(sid, t)).turns[-1] == Turn("assistant", "a", [1], True)
        finally:
            await store.close()

        # the password never shows
        store = RedisSessionStore("redis://user:s3cret@127.0.0.1:1/0")
        try:
            with pytest.raises(StoreUnavailable) as e:
                await store.ping()
            assert "s3cret" not in str(e.value) and "redis://user:***@127.0.0.1:1/0" in str(e.value)
        finally:
            await store.close()

    asyncio.run(body())


def test_open_store(monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    s = open_store(None, ttl_s=5)
    assert isinstance(s, MemorySessionStore) and s.ttl_s == 5
    s = open_store(redis_server.url)
    assert isinstance(s, RedisSessionStore) and s.url == redis_server.url
    asyncio.run(s.close())
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    s = open_store()
    assert isinstance(s, RedisSessionStore) and s.prefix == "specserve:session:"
    asyncio.run(s.close())
