"""The OpenAI-compatible HTTP API for real: the `openai` client -> Serve's HTTP proxy -> Router.

One Serve application for the module: tiny models, one target replica, one draft replica, a
bearer token, sessions in memory. Every answer is checked against the gRPC API's `Generate` on
the same app (one code path below both), every refusal against OpenAI's error shape.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from specserve.client import Client

from serve_helpers import free_port, serve_app, tiny_config

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOKEN = "openai-test-token"
MODEL = "target"  # the tiny target's directory name
PROMPTS = ["def add(a, b):", "The quick brown fox"]
MODES = ["ar", "sd", "ssd"]
DOCUMENTED = {200, 400, 404, 409, 413}  # what a body alone can get (401/429/503 come from elsewhere)


@pytest.fixture(scope="module")
def app(tiny_dir):
    cfg = tiny_config(tiny_dir, {"max_ongoing_requests": 1, "max_queued_requests": 1}, auth_token=TOKEN,
                      limits={"max_tokens": 400, "default_max_tokens": 4, "max_prompt_chars": 5000})
    cfg["target"]["max_num_seqs"] = 1  # one request at a time per replica: Serve's own queue fills (429)
    port = free_port()
    with serve_app(cfg, http_port=port) as address:
        yield address, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def grpc_client(app):
    with Client(app[0], timeout=60, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def oai(app):
    return openai.OpenAI(base_url=app[1] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str, str]:
    """A raw HTTP call (stdlib): status, content type, body text."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].text if c.choices else "" for c in chunks), chunks


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", MODES)
def test_completions_equal_grpc_generate_in_every_mode(oai, grpc_client, mode):
    for prompt in PROMPTS:
        want = grpc_client.generate(prompt, max_tokens=24, mode=mode)
        got = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                     extra_body={"speculation": {"mode": mode}})
        assert got.choices[0].text == want.text, (mode, prompt)
        assert got.usage.completion_tokens == len(want.token_ids) == 24 and got.choices[0].finish_reason == "length"
        assert got.usage.prompt_tokens == want.stats.prompt_tokens > 0
        assert got.usage.total_tokens == got.usage.prompt_tokens + 24
        ext = got.model_extra["specserve"]
        assert ext["mode"] == mode and ext["new_tokens"] == 24 and not ext["fallback"]
        text, chunks = _stream_text(oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, stream=True, stream_options={"include_usage": True},
            extra_body={"speculation": {"mode": mode}}))
        assert text == want.text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
        assert chunks[-2].choices[0].finish_reason == "length"
        assert len(chunks) - 1 == chunks[-2].model_extra["specserve"]["rounds"]  # one chunk per round


def test_usage_is_exact_when_a_stop_string_ends_it(oai, grpc_client):
    full = grpc_client.generate(PROMPTS[0], max_tokens=40, mode="ar").text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    want = grpc_client.generate(PROMPTS[0], max_tokens=40, mode="ar", stop=[stop])
    got = oai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, stop=stop)
    assert got.choices[0].text == want.text and stop not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop" and want.stats.finish_reason == "stop"
    assert got.usage.completion_tokens == want.stats.new_tokens == len(want.token_ids) < 40


@pytest.fixture(scope="module")
def eos_prompt(tiny):
    """A one-token prompt after which the tiny target's greedy output ends at EOS (searched, seed 0)."""
    from specserve.engine.single import generate
    from specserve.engine.speculative import SpecConfig

    lm = tiny["target"]
    for t in range(1, lm.vocab_size):
        chunks = list(generate(lm, None, [t], 30, spec=SpecConfig(mode="ar")))
        if chunks[-1].finish_reason == "eos":
            return [t]
    pytest.fail("no one-token prompt of the tiny target ends at EOS within 30 tokens")


@pytest.mark.parametrize("mode", MODES)
def test_usage_is_exact_when_eos_ends_it(oai, grpc_client, eos_prompt, mode):
    want = grpc_client.generate(eos_prompt, max_tokens=30, mode=mode)
    assert want.stats.finish_reason == "eos"
    got = oai.completions.create(model=MODEL, prompt=eos_prompt, max_tokens=30,
                                 extra_body={"speculation": {"mode": mode}})
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == want.stats.new_tokens == len(want.token_ids) < 30
    assert got.usage.prompt_tokens == 1
    text, chunks = _stream_text(oai.completions.create(model=MODEL, prompt=eos_prompt, max_tokens=30, stream=True,
                                                       stream_options={"include_usage": True}))
    assert text == want.text and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_chat_plain_and_streamed_agree(oai):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    plain = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert plain.usage.completion_tokens == 20 == chunks[-1].model_extra["specserve"]["new_tokens"]


def test_a_continued_conversation_reuses_its_kv_prefix(oai):
    msgs = [{"role": "user", "content": "remember the number 7"}]
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=8,
                                                       extra_headers={"X-Session-Id": "new"})
    sid, token = raw.headers["x-session-id"], raw.headers["x-session-token"]
    first = raw.parse()
    assert first.model_extra["specserve"]["prefix_reused"] == 0
    time.sleep(1.5)  # the replica announces the sessions it caches to the routers (Serve multiplexing)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "which number?"}]
    second = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                         extra_headers={"X-Session-Id": sid, "X-Session-Token": token})
    assert second.model_extra["specserve"]["prefix_reused"] > 0
    assert second.model_extra["specserve"]["replica"] == first.model_extra["specserve"]["replica"]
    with pytest.raises(openai.PermissionDeniedError) as e:  # a session is private: its token is needed
        oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, extra_headers={"X-Session-Id": sid})
    assert "session_token" in e.value.message


# ---------------------------------------------------------------------------- errors

_U = [{"role": "user", "content": "x"}]
ERRORS = [
    # (name, endpoint, kwargs, openai exception, words in the message)
    ("n > 1", "completions", dict(prompt="x", n=2), "BadRequestError", "n=2"),
    ("logprobs", "completions", dict(prompt="x", logprobs=2), "BadRequestError", "logprobs"),
    ("max_tokens over the limit", "completions", dict(prompt="x", max_tokens=401), "BadRequestError", "max_tokens"),
    ("negative temperature", "completions", dict(prompt="x", temperature=-1), "BadRequestError", "temperature"),
    ("top_p zero", "completions", dict(prompt="x", top_p=0), "BadRequestError", "top_p"),
    ("unknown field", "completions", dict(prompt="x", extra_body={"frobnicate": 1}), "BadRequestError",
     "frobnicate"),
    ("bad mode", "completions", dict(prompt="x", extra_body={"speculation": {"mode": "fast"}}), "BadRequestError",
     "speculation.mode"),
    ("k too large", "completions", dict(prompt="x", extra_body={"speculation": {"k": 99}}), "BadRequestError",
     "speculation.k"),
    ("token id outside the vocabulary", "completions", dict(prompt=[10 ** 6]), "BadRequestError", "vocabulary"),
    ("unknown model", "completions", dict(prompt="x", model="gpt-4"), "NotFoundError", "model"),
    ("huge prompt", "completions", dict(prompt="x" * 5001), "APIStatusError", "prompt"),
    ("tools", "chat", dict(messages=_U, tools=[{"type": "function", "function": {"name": "f"}}]), "BadRequestError",
     "tools"),
    ("response_format", "chat", dict(messages=_U, response_format={"type": "json_object"}), "BadRequestError",
     "response_format"),
    ("no messages", "chat", dict(messages=[]), "BadRequestError", "messages"),
    ("huge conversation", "chat", dict(messages=[{"role": "user", "content": "y" * 5001}]), "APIStatusError",
     "messages"),
]


@pytest.mark.parametrize("name,endpoint,kw,exc,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_raise_the_matching_openai_exception_naming_the_field(oai, name, endpoint, kw, exc, words):
    kw = {"model": MODEL, **kw}
    create = oai.completions.create if endpoint == "completions" else oai.chat.completions.create
    with pytest.raises(getattr(openai, exc)) as e:
        create(**kw)
    assert words in e.value.message, (name, e.value.message)
    assert set(e.value.body) >= {"message", "type", "param", "code"}
    if exc == "APIStatusError":
        assert e.value.status_code == 413


def test_a_wrong_or_missing_token_gets_401_on_every_route(app):
    base = app[1]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", b"{broken"),
                                   ("POST", "/v1/chat/completions", b'{"model": 1}'), ("GET", "/nope", None),
                                   ("POST", "/generate", b"{}"), ("GET", "/", None)):
            status, _, text = _http(method, base + path, body, headers)
            assert status == 401, (headers, path, text)
            assert json.loads(text)["error"]["type"] == "authentication_error"
    assert _http("GET", base + "/health")[0] == 200
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _, text = _http("GET", base + "/nope", None, auth)
    assert status == 404 and json.loads(text)["error"]["code"] == "not_found"


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]


# ---------------------------------------------------------------------------- fuzz

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                     max_leaves=6)
_FIELD = {
    "model": st.sampled_from([MODEL, "gpt-4", ""]) | _JSON,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 2 ** 40), max_size=4) | _JSON,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                                "content": st.text(max_size=30) | _JSON}), max_size=3) | _JSON,
    "max_tokens": st.integers(-3, 6) | st.integers(-2 ** 70, 2 ** 70) | _JSON,
    "temperature": st.floats(allow_nan=True) | _JSON,
    "top_p": st.floats(-1, 2) | _JSON,
    "seed": st.integers(-2 ** 70, 2 ** 70) | _JSON,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=140), max_size=10) | _JSON,
    "stream": st.booleans() | _JSON,
    "n": st.integers(0, 3) | _JSON,
    "speculation": st.fixed_dictionaries({}, optional={"mode": st.sampled_from(MODES + ["x"]) | _JSON,
                                                       "k": st.integers(-2, 20) | _JSON}) | _JSON,
}
_JUNK = st.fixed_dictionaries({}, optional=_FIELD).map(json.dumps) | st.binary(max_size=60).map(
    lambda b: b.decode("latin-1")) | _JSON.map(json.dumps)
_NEAR = {"max_tokens": st.integers(-1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.1, 1),
         "seed": st.integers(0, 2 ** 64), "stop": st.text(min_size=1, max_size=3), "stream": st.booleans(),
         "speculation": st.fixed_dictionaries({}, optional={"mode": st.sampled_from(MODES), "k": st.integers(0, 5)})}


@st.composite
def _request(draw):
    """(path, body): a broken body, or a nearly valid one for that path (so the engine runs too)."""
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    if draw(st.booleans()):
        return path, draw(_JUNK)
    text = draw(st.text(min_size=1, max_size=30))
    body = {"model": MODEL, **draw(st.fixed_dictionaries({}, optional=_NEAR))}
    if path.endswith("/completions") and "chat" not in path:
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    return path, json.dumps(body, ensure_ascii=draw(st.booleans()))


_SEEN: set[int] = set()


@settings(max_examples=320, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(req=_request())
def test_fuzzed_bodies_get_documented_statuses(app, req):
    path, body = req
    status, ctype, text = _http("POST", app[1] + path, body.encode("utf-8", "surrogatepass"),
                                {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert status in DOCUMENTED, (body, status, text)
    _SEEN.add(status)
    if status != 200:
        err = json.loads(text)["error"]
        assert err["message"] and err["type"], err
    elif "text/event-stream" in ctype:
        assert text.rstrip().endswith("data: [DONE]"), text


def test_the_server_answers_exactly_after_the_fuzz(oai, grpc_client):
    assert {200, 400} <= _SEEN, _SEEN  # the fuzz reached the engine and the validation both
    want = grpc_client.generate(PROMPTS[1], max_tokens=16, mode="ssd")
    got = oai.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16,
                                 extra_body={"speculation": {"mode": "ssd"}})
    assert got.choices[0].text == want.text and got.usage.completion_tokens == 16


def test_a_full_target_queue_is_429_and_the_rest_stay_exact(app, oai, grpc_client):
    """The target takes 1 request and queues 1 (this module's config): 6 at once overflow it."""
    import threading

    want = grpc_client.generate(PROMPTS[0], max_tokens=400, mode="ar").text
    results: list = [None] * 6
    start = threading.Barrier(len(results))

    def one(i):
        start.wait()
        try:
            results[i] = oai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=400,
                                                extra_body={"speculation": {"mode": "ar"}}).choices[0].text
        except openai.RateLimitError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert refused and all("queue is full" in e.message for e in refused), results
    assert [r for r in results if not isinstance(r, openai.RateLimitError)] == [want] * (6 - len(refused))


# ---------------------------------------------------------------------------- gRPC health, reflection


def test_reflection_lists_the_public_services(app):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(app[0]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=30))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"specserve.v1.SpecServe", "grpc.health.v1.Health"} <= names, names


def test_health_is_serving_and_not_serving_while_the_target_is_down(app):
    """Last in the module: it kills the target replica and waits for Serve to bring one back."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serve_helpers import deployment_stats, replica_actor

    H = health_pb2.HealthCheckResponse
    with grpc.insecure_channel(app[0]) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "specserve.v1.SpecServe"):  # no token needed: probes carry none
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status == H.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=180)
        assert next(watch).status == H.SERVING
        replica = deployment_stats("TargetDeployment")[0]["replica"]
        ray.kill(replica_actor("TargetDeployment", replica), no_restart=True)
        seen = [next(watch).status]  # Watch sends changes only: down, then up again (Serve restarts it)
        seen.append(next(watch).status)
        watch.cancel()
        assert seen == [H.NOT_SERVING, H.SERVING]
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status == H.SERVING
