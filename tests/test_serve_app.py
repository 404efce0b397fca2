"""The whole stack, for real: gRPC client -> Ray Serve gRPC proxy -> Router -> Target <-> Draft.

One Serve application for the module (Ray + Serve take ~20 s to start): tiny models, two target
replicas, one draft replica, sessions in a private redis-server. Outputs are checked against the
engine's plain autoregressive decoding of the same prompts.
"""

from __future__ import annotations

import io
import threading
import time

import grpc
import pytest

from specserve.client import Client, ClientError
from specserve.engine.speculative import SpecConfig
from specserve.engine.single import generate
from specserve.v1 import serving_pb2 as pb
from specserve.v1 import serving_pb2_grpc as pb_grpc

from serve_helpers import APP, deployment_stats, replica_actor, serve_app

ray = pytest.importorskip("ray")
PROMPTS = ["def add(a, b):", "The quick brown fox", "class Stack:", "x = [1, 2, 3]"]


@pytest.fixture(scope="module")
def app(tiny_dir, redis_server):
    cfg = {
        "target": {"model": str(tiny_dir / "target"), "threads": 1, "draft_timeout_s": 10.0,
                   "replicas": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.3}},
        "draft": {"model": str(tiny_dir / "draft-same"), "quantize": "none", "threads": 1,
                  "host": "127.0.0.1", "replicas": {"num_cpus": 0.3}},
        "router": {"num_cpus": 0.1},
        "redis_url": redis_server.url,
        "limits": {"max_tokens": 400},
    }
    with serve_app(cfg, APP) as address:
        yield address


@pytest.fixture(scope="module")
def client(app):
    with Client(app, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(tiny):
    """Greedy ar continuations of the engine alone, by prompt."""
    lm = tiny["target"]
    return {p: [t for c in generate(lm, None, lm.encode(p), 40, spec=SpecConfig(mode="ar")) for t in c.token_ids]
            for p in PROMPTS}


def _target_stats() -> list[dict]:
    return deployment_stats("TargetDeployment", replicas=2)


def _draft_stats() -> dict:
    return deployment_stats("DraftDeployment")[0]


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_generate_and_stream_are_exact_in_every_mode(client, expected, mode):
    for prompt, want in expected.items():
        reply = client.generate(prompt, max_tokens=40, mode=mode)
        assert list(reply.token_ids) == want, (mode, prompt)
        assert reply.stats.mode == mode and reply.stats.new_tokens == 40 and not reply.stats.fallback
        chunks = list(client.stream(prompt, max_tokens=40, mode=mode))
        assert [t for c in chunks for t in c.token_ids] == want
        assert "".join(c.text for c in chunks) == reply.text
        assert chunks[-1].stats.rounds == len(chunks)
    if mode == "ssd":  # draft-same: the speculation cache answers nearly every round
        assert reply.stats.cache_hit_rate > 0.8


def test_eight_concurrent_streams_from_separate_clients_are_exact(app, expected):
    jobs = [(PROMPTS[i % len(PROMPTS)], ["ar", "sd", "ssd"][i % 3]) for i in range(8)]
    results: list = [None] * len(jobs)

    def one(i, prompt, mode):
        with Client(app, timeout=120) as c:
            results[i] = [t for ch in c.stream(prompt, max_tokens=40, mode=mode) for t in ch.token_ids]

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for (prompt, mode), got in zip(jobs, results):
        assert got == expected[prompt], (prompt, mode)


# ---------------------------------------------------------------------------- sessions


def _turn(client, sid, message, **kw):
    if sid:  # a replica announces the sessions it caches to the routers within ~0.1-1 s (Serve's
        time.sleep(1.5)  # multiplexing); a person typing the next turn is slower than that
    chunks = list(client.chat(message, session_id=sid, **kw))
    return chunks[0].session_id, chunks


def test_three_turn_chat_with_redis(client, redis_server):
    sid, turns = "", []
    for msg in ("hello", "tell me more", "thanks"):
        sid, chunks = _turn(client, sid, msg, max_tokens=12)
        turns.append(chunks)
    reused = [c[-1].stats.prefix_reused for c in turns]
    assert reused[0] == 0 and 0 < reused[1] < reused[2]  # the session's replica kept its KV prefix
    s = client.get_session(sid)
    assert [(t.role, t.content) for t in s.turns[::2]] == [("user", "hello"), ("user", "tell me more"),
                                                            ("user", "thanks")]
    assert [t.content for t in s.turns[1::2]] == ["".join(c.text for c in chunks) for chunks in turns]
    assert s.replica == turns[-1][-1].stats.replica and not s.busy
    import redis

    r = redis.Redis.from_url(redis_server.url)
    assert any(sid in k.decode() for k in r.scan_iter(count=1000)), "the session lives in Redis"
    assert client.delete_session(sid) is True
    with pytest.raises(ClientError) as e:
        client.get_session(sid)
    assert e.value.code == "NOT_FOUND"
    assert not any(sid in k.decode() for k in r.scan_iter(count=1000))


def test_two_concurrent_turns_on_one_session(client, app):
    sid, _ = _turn(client, "", "hi", max_tokens=4)
    outcomes: list = [None, None]

    def turn(i):
        with Client(app, timeout=60) as c:
            try:
                outcomes[i] = list(c.chat(f"message {i}", session_id=sid, max_tokens=300, mode="ar",
                                          session_token=client.session_tokens[sid]))
            except ClientError as e:
                outcomes[i] = e

    threads = [threading.Thread(target=turn, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [o for o in outcomes if isinstance(o, ClientError)]
    assert len(errors) == 1 and errors[0].code == "FAILED_PRECONDITION", outcomes
    roles = [t.role for t in client.get_session(sid).turns]
    assert roles == ["user", "assistant"] * 2  # never an interleaved history


def test_chat_cli_repl(client):
    from specserve.client.chat import run_chat

    out, err = io.StringIO(), io.StringIO()
    code = run_chat(client, inp=io.StringIO("hello\n/history\n/quit\n"), out=out, err=err, max_tokens=6)
    assert code == 0 and "user: hello" in out.getvalue() and "assistant: " in out.getvalue()
    assert "[session " in err.getvalue() and "prefix reused 0" in err.getvalue()


def test_chat_cli_resumes_a_session_started_elsewhere(client, app, monkeypatch, capsys):
    import io
    import re

    from specserve.cli import main
    from specserve.client.chat import run_chat

    err = io.StringIO()
    assert run_chat(client, inp=io.StringIO("hi\n"), out=io.StringIO(), err=err, max_tokens=4) == 0
    sid, token = re.search(r"--session (\S+) --session-token (\S+)\)", err.getvalue()).groups()
    for given, code in ((token, 0), ("not-the-token", 1)):  # a fresh client knows no session token
        monkeypatch.setattr("sys.stdin", io.StringIO("/history\n"))
        assert main(["chat", "--address", app, "--session", sid, "--session-token", given]) == code
        captured = capsys.readouterr()
        assert ("user: hi" in captured.out) == (code == 0), captured
    assert "PERMISSION_DENIED" in captured.err
    assert main(["chat", "--address", app, "--session-token", token]) == 2  # a token needs its session


def test_bench_server_measures_every_mode_through_the_stack(app, tmp_path, capsys):
    import json

    from specserve.cli import main

    out = tmp_path / "r.json"
    assert main(["bench-server", "--address", app, "--prompts", "chat", "--n", "2", "--max-new-tokens", "12",
                 "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"ar", "sd", "ssd"}
    assert all(summary[m]["mismatches"] == 0 for m in ("sd", "ssd")) and summary["ssd"]["cache_hit_rate"] > 0.5
    assert "stack overhead" in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad requests

_GEN = pb.GenerateRequest
_SP = pb.SpeculationParams
BAD = [
    # (name, call, request, status code, words the message must contain)
    ("empty prompt", "Generate", _GEN(), "INVALID_ARGUMENT", "prompt is empty"),
    ("max tokens over the limit", "Generate", _GEN(prompt="x", max_tokens=401), "INVALID_ARGUMENT", "max_tokens"),
    ("zero max tokens", "GenerateStream", _GEN(prompt="x", max_tokens=0), "INVALID_ARGUMENT", "max_tokens"),
    ("negative temperature", "Generate", _GEN(prompt="x", sampling=pb.Sampling(temperature=-1)),
     "INVALID_ARGUMENT", "sampling.temperature"),
    ("NaN temperature", "Generate", _GEN(prompt="x", sampling=pb.Sampling(temperature=float("nan"))),
     "INVALID_ARGUMENT", "sampling.temperature"),
    ("top-p zero", "Generate", _GEN(prompt="x", sampling=pb.Sampling(top_p=0)), "INVALID_ARGUMENT", "sampling.top_p"),
    ("top-p above one", "GenerateStream", _GEN(prompt="x", sampling=pb.Sampling(top_p=1.5)),
     "INVALID_ARGUMENT", "sampling.top_p"),
    ("unknown mode", "Generate", _GEN(prompt="x", speculation=_SP(mode=7)), "INVALID_ARGUMENT", "speculation.mode"),
    ("k zero", "Generate", _GEN(prompt="x", speculation=_SP(k=0)), "INVALID_ARGUMENT", "speculation.k"),
    ("k too large", "Generate", _GEN(prompt="x", speculation=_SP(k=99)), "INVALID_ARGUMENT", "speculation.k"),
    ("prompt longer than the context window", "Generate", _GEN(prompt_ids=[5] * 4096), "INVALID_ARGUMENT",
     "context window"),
    ("token id outside the vocabulary", "GenerateStream", _GEN(prompt_ids=[10 ** 6]), "INVALID_ARGUMENT",
     "vocabulary"),
    ("huge prompt", "Generate", _GEN(prompt="x" * 200_001), "RESOURCE_EXHAUSTED", "prompt"),
    ("session without its token (chat)", "Chat", pb.ChatRequest(session_id="nope", message="hi"),
     "PERMISSION_DENIED", "session_token"),
    ("session without its token (get)", "GetSession", pb.GetSessionRequest(session_id="nope"), "PERMISSION_DENIED",
     "session_token"),
    ("malformed session id", "GetSession", pb.GetSessionRequest(session_id="a b"), "INVALID_ARGUMENT",
     "session_id"),
    ("empty chat message", "Chat", pb.ChatRequest(message="  "), "INVALID_ARGUMENT", "message"),
    ("empty stop string", "Generate", _GEN(prompt="x", stop=[""]), "INVALID_ARGUMENT", "stop[0]"),
]


@pytest.mark.parametrize("name,call,request_,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_status_and_a_message_naming_the_field(client, name, call, request_, code, words):
    method = getattr(client.stub, call)
    with pytest.raises(grpc.RpcError) as e:
        out = method(request_, timeout=60)
        if call in ("GenerateStream", "Chat"):
            list(out)
    assert e.value.code().name == code, (name, e.value.details())
    assert words in e.value.details(), (name, e.value.details())


def test_unknown_sessions_are_not_found(client):
    sid, _ = _turn(client, "", "hi", max_tokens=2)
    token = client.session_tokens[sid]
    assert client.delete_session(sid) is True
    for call in (lambda: client.get_session(sid), lambda: list(client.chat("again", session_id=sid))):
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.code == "NOT_FOUND" and sid in e.value.details
    assert client.delete_session(sid, session_token=token) is False


def test_the_server_still_serves_after_bad_requests(client, expected):
    assert list(client.generate(PROMPTS[0], max_tokens=40).token_ids) == expected[PROMPTS[0]]


# ---------------------------------------------------------------------------- cancellation, failures


def test_a_cancelled_stream_stops_the_work_on_target_and_draft(app):
    channel = grpc.insecure_channel(app)
    stub = pb_grpc.SpecServeStub(channel)
    call = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[1], max_tokens=400,
                                                  speculation=pb.SpeculationParams(mode=pb.MODE_SSD)))
    got = [next(call), next(call)]
    call.cancel()
    assert sum(len(c.token_ids) for c in got) < 400
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15:
        if all(s["active"] == 0 for s in _target_stats()) and _draft_stats()["sequences_open"] == 0:
            break
        time.sleep(0.2)
    assert all(s["active"] == 0 for s in _target_stats()), _target_stats()
    assert _draft_stats()["sequences_open"] == 0, _draft_stats()
    channel.close()


def test_killing_the_session_replica_between_turns_loses_nothing(client):
    sid, first = _turn(client, "", "remember this", max_tokens=10)
    replica = first[-1].stats.replica
    sid, second = _turn(client, sid, "and this", max_tokens=10)
    assert second[-1].stats.replica == replica and second[-1].stats.prefix_reused > 0  # affinity
    ray.kill(replica_actor("TargetDeployment", replica), no_restart=True)
    sid, third = _turn(client, sid, "what did I say?", max_tokens=10)
    st = third[-1].stats
    assert st.replica != replica and st.new_tokens == 10
    assert st.prefix_reused == 0  # a new replica: re-prefilled from the stored history
    turns = client.get_session(sid).turns
    assert [t.content for t in turns[::2]] == ["remember this", "and this", "what did I say?"]
    assert all(t.complete for t in turns)
    assert turns[1].content == "".join(c.text for c in first) and turns[3].content == "".join(c.text for c in second)
