"""Bad input, faults and load against the whole stack, with nothing lost.

One Serve application (tiny models, two target replicas, one draft replica, a bearer token,
sessions in a private redis-server with AOF that the tests stop and restart):
  * fuzz:  hypothesis-generated requests of every kind through the gRPC proxy; each gets a
           correct answer or a documented status with a message; the server serves afterwards
  * faults: the draft replica killed mid-stream, the target replica killed mid-stream, Redis
           down and back
  * auth:  no token / wrong token / a session without its session_token
  * soak:  16 concurrent streaming clients for 60 s: no errors, exact outputs, bounded memory
"""

from __future__ import annotations


import grpc
import pytest

from specserve.client import Client, ClientError
from specserve.engine.speculative import SpecConfig, generate
from specserve.v1 import serving_pb2 as pb
from specserve.v1 import serving_pb2_grpc as pb_grpc

from serve_helpers import deployment_stats, replica_actor, serve_app

ray = pytest.importorskip("ray")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOKEN = "test-bearer-token"
MAX_TOKENS = 400
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
              "UNAUTHENTICATED", "PERMISSION_DENIED"}


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory):
    """This module's own redis-server (AOF on): the tests stop and restart it."""
    from redis_server import private_redis

    with private_redis(tmp_path_factory.mktemp("redis-aof")) as server:
        yield server


@pytest.fixture(scope="module")
def app(tiny_dir, redis_aof):
    cfg = {
        "target": {"model": str(tiny_dir / "target"), "threads": 1, "draft_timeout_s": 3.0,
                   "replicas": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.3, "max_ongoing_requests": 10}},
        "draft": {"model": str(tiny_dir / "draft-same"), "quantize": "none", "threads": 1,
                  "host": "127.0.0.1", "replicas": {"num_cpus": 0.3}},
        "router": {"num_cpus": 0.1},
        "redis_url": redis_aof.url,
        "auth_token": TOKEN,
        "limits": {"max_tokens": MAX_TOKENS, "default_max_tokens": 4},
    }
    with serve_app(cfg) as address:
        yield address


@pytest.fixture(scope="module")
def client(app):
    with Client(app, timeout=60, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def ar(tiny):
    lm = tiny["target"]
    cache: dict = {}

    def ids(prompt: str, n: int) -> list[int]:
        if (prompt, n) not in cache:
            cache[prompt, n] = [t for c in generate(lm, None, lm.encode(prompt), n, spec=SpecConfig(mode="ar"))
                                for t in c.token_ids]
        return cache[prompt, n]

    return ids


def _healthy(app: str) -> None:
    """Serve's own health check through the proxy, then one exact generation."""
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    with grpc.insecure_channel(app) as ch:
        reply = serve_pb2_grpc.RayServeAPIServiceStub(ch).Healthz(serve_pb2.HealthzRequest(), timeout=30)
    assert reply.message == "success"


# ---------------------------------------------------------------------------- auth


def test_bearer_token_is_required(app):
    req = pb.GenerateRequest(prompt="hi", max_tokens=2)
    with grpc.insecure_channel(app) as ch:
        stub = pb_grpc.SpecServeStub(ch)
        for md in (None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(req, metadata=md, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Chat(pb.ChatRequest(message="hi"), metadata=md, timeout=30))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Generate(req, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
        assert len(ok.token_ids) == 2


def test_sessions_need_their_own_token(app, client):
    sid = list(client.chat("hello", max_tokens=2))[0].session_id
    with Client(app, timeout=30, token=TOKEN) as other:  # knows the id, not the session's token
        for call in (lambda: other.get_session(sid), lambda: list(other.chat("hi", session_id=sid)),
                     lambda: other.delete_session(sid)):
            with pytest.raises(ClientError) as e:
                call()
            assert e.value.code == "PERMISSION_DENIED"
    assert len(client.get_session(sid).turns) == 2  # untouched


# ---------------------------------------------------------------------------- fuzz

_text = st.text(st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["", " ", "\x00\x01\x02", "\u202e\u200b", "💥" * 20, "def f(x):\n\treturn x", "a" * 210_000])
_float = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 1.0, 1e-30, -0.0])
_int32 = st.integers(-(2 ** 31), 2 ** 31 - 1)


@st.composite
def _sampling(draw):
    s = pb.Sampling()
    if draw(st.booleans()):
        s.temperature = draw(_float)
    if draw(st.booleans()):
        s.top_k = draw(st.integers(-5, 100) | _int32)
    if draw(st.booleans()):
        s.top_p = draw(_float)
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2 ** 64 - 1))
    return s


@st.composite
def _speculation(draw):
    sp = pb.SpeculationParams(mode=draw(st.integers(0, 5) | _int32), no_speculation=draw(st.booleans()))
    if draw(st.booleans()):
        sp.k = draw(st.integers(-2, 20) | _int32)
    sp.fanout.extend(draw(st.lists(st.integers(-3, 300), max_size=8)))
    return sp


def _common(draw, msg):
    if draw(st.booleans()):
        msg.max_tokens = draw(st.integers(-3, 8) | _int32)
    if draw(st.booleans()):
        msg.sampling.CopyFrom(draw(_sampling()))
    msg.stop.extend(draw(st.lists(_text, max_size=10)))
    if draw(st.booleans()):
        msg.speculation.CopyFrom(draw(_speculation()))
    return msg


@st.composite
def _request(draw):
    kind = draw(st.sampled_from(["Generate", "GenerateStream", "Chat", "GetSession", "DeleteSession"]))
    sid = draw(st.sampled_from(["", "nope", "a b", "x" * 200, "0" * 32]) | st.text(max_size=20))
    if kind in ("Generate", "GenerateStream"):
        msg = pb.GenerateRequest(prompt=draw(_text), chat=draw(st.booleans()))
        if draw(st.integers(0, 4)) == 0:
            msg.prompt_ids.extend(draw(st.lists(st.integers(-5, 600) | _int32, max_size=30)))
        return kind, _common(draw, msg)
    if kind == "Chat":
        msg = pb.ChatRequest(session_id=sid, message=draw(_text), system=draw(_text),
                             session_token=draw(st.sampled_from(["", "0" * 32]) | st.text(max_size=8)))
        return kind, _common(draw, msg)
    cls = pb.GetSessionRequest if kind == "GetSession" else pb.DeleteSessionRequest
    return kind, cls(session_id=sid, session_token=draw(st.text(max_size=40)))


@st.composite
def _plausible(draw):
    """A request a real client could send: valid or one field off, so that most get generated."""
    kind = draw(st.sampled_from(["Generate", "GenerateStream", "Chat"]))
    sampling = pb.Sampling(temperature=draw(st.sampled_from([0.0, 0.7, 1.0])), top_p=draw(st.sampled_from([1.0, 0.9])),
                           top_k=draw(st.sampled_from([0, 5, 50])), seed=draw(st.integers(0, 2 ** 32)))
    spec = pb.SpeculationParams(mode=draw(st.integers(0, 3)), no_speculation=draw(st.booleans()))
    if draw(st.booleans()):
        spec.k = draw(st.integers(1, 16))
    text = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40))
    common = dict(max_tokens=draw(st.integers(1, 8)), sampling=sampling, speculation=spec,
                  stop=draw(st.lists(st.text(min_size=1, max_size=3), max_size=2)))
    if kind == "Chat":
        return kind, pb.ChatRequest(message=text, system=draw(st.sampled_from(["", "be brief"])), **common)
    return kind, pb.GenerateRequest(prompt=text, chat=draw(st.booleans()), **common)


def test_fuzzed_requests_get_answers_or_documented_errors(app):
    seen: dict[str, int] = {}
    channel = grpc.insecure_channel(app)
    stub = pb_grpc.SpecServeStub(channel)
    auth = (("authorization", f"Bearer {TOKEN}"),)

    count = [0]

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(_request(), _plausible()))
    def one(kind_msg):
        kind, msg = kind_msg
        count[0] += 1
        md = auth if count[0] % 10 else None  # one request in ten without the bearer token
        code, details = "OK", ""
        try:
            out = getattr(stub, kind)(msg, metadata=md, timeout=60)
            if kind in ("GenerateStream", "Chat"):
                out = list(out)
        except grpc.RpcError as e:
            code, details = e.code().name, e.details() or ""
        seen[code] = seen.get(code, 0) + 1
        assert code in DOCUMENTED, f"{kind} got {code}: {details}\n{msg}"
        if code != "OK":
            assert len(details) > 10, f"{kind} got {code} with no useful message: {details!r}"
        if not md:
            assert code == "UNAUTHENTICATED"
        elif code == "OK" and kind == "Generate":
            assert len(out.token_ids) <= (msg.max_tokens if msg.HasField("max_tokens") else 4)
            assert out.stats.new_tokens == len(out.token_ids)
        elif code == "OK" and kind in ("GenerateStream", "Chat"):
            assert out and out[-1].HasField("stats")
            assert out[-1].stats.new_tokens == sum(len(c.token_ids) for c in out)

    one()
    channel.close()
    assert sum(seen.values()) >= 500 and seen.get("OK", 0) >= 100, seen
    print("fuzz outcomes:", seen)


def test_oversized_messages_are_refused(client):
    with pytest.raises(ClientError) as e:
        client.generate("x" * (5 << 20))  # over gRPC's 4 MiB message limit
    assert e.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ClientError) as e:
        client.generate("x" * 300_000)  # under gRPC's limit, over the server's prompt limit
    assert e.value.code == "RESOURCE_EXHAUSTED" and "prompt" in e.value.details


def test_still_healthy_and_exact_after_the_fuzz(app, client, ar):
    _healthy(app)
    assert list(client.generate("def add(a, b):", max_tokens=24, mode="ssd").token_ids) == ar("def add(a, b):", 24)


# ---------------------------------------------------------------------------- faults


def _stream_and_kill(client, prompt, kill, after_chunks=2, **kw):
    """Stream `prompt`, call kill() after a few chunks; return (chunks, error or None)."""
    chunks, err = [], None
    try:
        for c in client.stream(prompt, **kw) if "session_id" not in kw else client.chat(prompt, **kw):
            chunks.append(c)
            if len(chunks) == after_chunks:
                kill()
    except ClientError as e:
        err = e
    return chunks, err


def test_draft_replica_killed_mid_stream_finishes_exact_with_fallback(client, ar):
    prompt = "The quick brown fox"
    draft = deployment_stats("DraftDeployment")[0]

    def kill():
        ray.kill(replica_actor("DraftDeployment", draft["replica"]), no_restart=False)

    chunks, err = _stream_and_kill(client, prompt, kill, mode="ssd", max_tokens=MAX_TOKENS)
    assert err is None
    st_ = chunks[-1].stats
    assert [t for c in chunks for t in c.token_ids] == ar(prompt, MAX_TOKENS)
    assert st_.fallback and "ar after round" in st_.fallback, st_
    # the next ssd request is exact too (a new draft replica, or ar until it is up)
    assert list(client.generate(prompt, max_tokens=16, mode="ssd").token_ids) == ar(prompt, 16)


def test_target_replica_killed_mid_stream_keeps_exactly_the_committed_tokens(client):
    first = list(client.chat("remember: blue", max_tokens=4, mode="ar"))
    sid = first[0].session_id
    killed = []

    def kill():  # the replica streaming this turn is the one with a sequence in flight
        busy = [s for s in deployment_stats("TargetDeployment", replicas=2) if s["active"] > 0]
        assert len(busy) == 1, busy
        killed.append(busy[0]["replica"])
        ray.kill(replica_actor("TargetDeployment", busy[0]["replica"]), no_restart=False)

    chunks, err = _stream_and_kill(client, "now a long answer", kill, session_id=sid, mode="ar",
                                   max_tokens=MAX_TOKENS)
    assert killed and err is not None and err.code == "UNAVAILABLE" and "retry" in err.details, err
    s = client.get_session(sid)
    last = s.turns[-1]
    assert [t.role for t in s.turns] == ["user", "assistant", "user", "assistant"] and not s.busy
    assert not last.complete and last.tokens == sum(len(c.token_ids) for c in chunks)
    assert last.content == "".join(c.text for c in chunks)
    nxt = list(client.chat("go on", session_id=sid, max_tokens=4))  # served again, by a live replica
    assert nxt[-1].stats.new_tokens == 4 and nxt[-1].stats.replica != killed[0]
    assert len(client.get_session(sid).turns) == 6


def test_redis_down_and_back(client, redis_aof):
    sid = list(client.chat("keep me", max_tokens=3))[0].session_id
    before = client.get_session(sid)
    redis_aof.stop()
    try:
        for call in (lambda: list(client.chat("hi", max_tokens=2)), lambda: client.get_session(sid)):
            with pytest.raises(ClientError) as e:
                call()
            assert e.value.code == "UNAVAILABLE" and "Redis" in e.value.details
        assert len(client.generate("stateless still works", max_tokens=3).token_ids) == 3
    finally:
        redis_aof.restart()
    after = client.get_session(sid)  # AOF: nothing committed is lost
    assert [(t.role, t.content, t.tokens) for t in after.turns] == [(t.role, t.content, t.tokens) for t in before.turns]
    assert list(client.chat("and now?", session_id=sid, max_tokens=2))[-1].stats.new_tokens == 2


# ---------------------------------------------------------------------------- load


def test_soak_16_streams_for_60_seconds(app, ar):
    from specserve.tools.loadtest import run_load

    prompts = ["def add(a, b):", "The quick brown fox", "class Stack:", "x = [1, 2, 3]"]
    run_load(app, prompts, concurrency=4, duration_s=3, max_tokens=32, token=TOKEN)  # warm up
    rss0 = {s["replica"]: s["rss_mb"] for s in deployment_stats("TargetDeployment", replicas=2)}
    res = run_load(app, prompts, concurrency=16, duration_s=60, max_tokens=32, token=TOKEN)
    s = res.summary()
    print("soak:", s)
    assert s["requests"] >= 50 and s["ok"] == s["requests"] and not s["errors"], s
    assert s["mismatches"] == 0
    # exact against the engine too, not only self-consistent
    with Client(app, timeout=60, token=TOKEN) as c:
        for p in prompts:
            assert list(c.generate(p, max_tokens=32).token_ids) == ar(p, 32)
    rss1 = {st_["replica"]: st_["rss_mb"] for st_ in deployment_stats("TargetDeployment", replicas=2)}
    for r, before in rss0.items():
        if r in rss1:  # memory does not grow without bound: < 25% over a minute of load
            assert rss1[r] < before * 1.25 + 50, (r, before, rss1[r])
