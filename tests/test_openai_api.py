"""The OpenAI-compatible API's rules without a server: bodies -> the gRPC request, replies, errors."""

from __future__ import annotations

import json

import pytest

from specserve.serving import openai as oa
from specserve.serving.api import ApiError, Limits, QueueFull, parse_generate, pb
from specserve.serving.router import target_error

M = "tiny"


def _err(fn, *a) -> tuple[int, dict]:
    with pytest.raises(ApiError) as e:
        fn(*a)
    return oa.error_response(e.value)


def test_a_completion_body_becomes_the_grpc_request_a_client_would_send():
    r = oa.parse_completion({"model": M, "prompt": "def f():", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                             "seed": -1, "stop": "\n", "speculation": {"mode": "sd", "k": 3}, "n": 1,
                             "logprobs": None, "stream": True, "stream_options": {"include_usage": True}}, M)
    assert r.stream and r.include_usage and not r.chat
    want = pb.GenerateRequest(prompt="def f():", max_tokens=7, stop=["\n"],
                              sampling=pb.Sampling(temperature=0.5, top_p=0.9, seed=2 ** 64 - 1),
                              speculation=pb.SpeculationParams(mode=pb.MODE_SD, k=3))
    assert r.request == want
    p = parse_generate(r.request, Limits())
    assert (p.mode, p.k, p.max_tokens, p.stop) == ("sd", 3, 7, ["\n"])
    assert oa.parse_completion({"model": M, "prompt": [1, 2, 3]}, M).request.prompt_ids == [1, 2, 3]


def test_a_chat_body_keeps_the_conversation_for_the_template():
    r = oa.parse_chat_completion({"model": M, "max_completion_tokens": 5, "messages": [
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
        M)
    assert r.chat and r.request.max_tokens == 5
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = {"role": "assistant", "content": "yo", "refusal": None, "tool_calls": None, "annotations": []}
    r = oa.parse_chat_completion({"model": M, "messages": [{"role": "user", "content": "a"}, reply,
                                                           {"role": "user", "content": "b"}]}, M)
    assert r.messages[1] == {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize("body,param,status", [
    ({"model": M, "prompt": "x", "n": 2}, "n", 400),
    ({"model": M, "prompt": "x", "logprobs": 2}, "logprobs", 400),
    ({"model": M, "prompt": "x", "best_of": 3}, "best_of", 400),
    ({"model": M, "prompt": "x", "wat": 1}, "wat", 400),
    ({"model": M, "prompt": "x", "max_tokens": "9"}, "max_tokens", 400),
    ({"model": M, "prompt": "x", "max_tokens": True}, "max_tokens", 400),
    ({"model": M, "prompt": "x", "max_tokens": 10 ** 30}, "max_tokens", 400),
    ({"model": M, "prompt": "x", "temperature": "hot"}, "temperature", 400),
    ({"model": M, "prompt": "x", "stop": [1]}, "stop", 400),
    ({"model": M, "prompt": "x", "speculation": {"mode": "fast"}}, "speculation.mode", 400),
    ({"model": M, "prompt": "x", "speculation": {"k": 1.5}}, "speculation.k", 400),
    ({"model": M, "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", 400),
    ({"model": M, "prompt": ["a", "b"]}, "prompt", 400),
    ({"prompt": "x"}, "model", 400),
    ({"model": "gpt-4", "prompt": "x"}, "model", 404),
    ([1, 2], "body", 400),
])
def test_completion_refusals_name_the_field(body, param, status):
    code, err = _err(oa.parse_completion, body, M)
    assert code == status and err["error"]["param"] == param and param.split(".")[0] in err["error"]["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": M, "messages": []}, "messages"),
    ({"model": M, "messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"model": M, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": M, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": M, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format"),
    ({"model": M, "messages": [{"role": "user", "content": "x"}], "functions": [{}]}, "functions"),
    ({"model": M, "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"model": M, "messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]},
                               {"role": "user", "content": "y"}]}, "messages[0]"),
])
def test_chat_refusals_name_the_field(body, param):
    code, err = _err(oa.parse_chat_completion, body, M)
    assert code == 400 and err["error"]["param"] == param, err


def test_range_errors_from_the_shared_validation_speak_openai_names():
    for body, param in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0},
                                                                                         "max_tokens")):
        r = oa.parse_completion({"model": M, "prompt": "x", **body}, M)
        code, err = _err(parse_generate, r.request, Limits())
        assert code == 400 and err["error"]["param"] == param and "sampling." not in err["error"]["message"]
    r = oa.parse_chat_completion({"model": M, "messages": [{"role": "user", "content": "x" * 50}]}, M)
    with pytest.raises(ApiError) as e:
        parse_generate(r.request, Limits(max_prompt_chars=10))
    code, err = oa.error_response(e.value, chat=True)
    assert code == 413 and err["error"]["message"].startswith("messages is 50 characters")


def test_status_mapping_and_the_error_shape():
    cases = [(ApiError("UNAUTHENTICATED", "x"), 401), (ApiError("NOT_FOUND", "x"), 404),
             (ApiError("RESOURCE_EXHAUSTED", "prompt is big"), 413), (QueueFull("full"), 429),
             (ApiError("UNAVAILABLE", "down"), 503), (ApiError("INTERNAL", "?"), 500)]
    for e, status in cases:
        code, body = oa.error_response(e)
        assert code == status and set(body["error"]) == {"message", "type", "param", "code"}
    # the target refusing for lack of room (or Serve's back-pressure) is a full queue, not a big request
    assert isinstance(target_error(ApiError("RESOURCE_EXHAUSTED", "queue")), QueueFull)
    assert isinstance(target_error(type("BackPressureError", (Exception,), {})("q")), QueueFull)
    auth = ApiError("UNAUTHENTICATED", "send the metadata 'authorization: Bearer <token>' (Client(..., token=...))")
    assert oa.error_response(auth)[1]["error"]["message"].endswith("(OpenAI(api_key=...))")
    with pytest.raises(ApiError) as e:
        oa.parse_json(b"{not json")
    assert oa.error_response(e.value)[0] == 400


def test_replies_and_chunks_carry_exact_usage_and_the_stats():
    stats = pb.Stats(prompt_tokens=4, new_tokens=3, rounds=2, finish_reason="eos", mode="sd")
    r = oa.parse_chat_completion({"model": M, "messages": [{"role": "user", "content": "x"}], "stream": True,
                                  "stream_options": {"include_usage": True}}, M)
    body = oa.completion_body(r, "id", pb.GenerateReply(text="abc", stats=stats))
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert body["choices"][0]["message"]["content"] == "abc" and body["choices"][0]["finish_reason"] == "stop"
    assert body["specserve"]["rounds"] == 2 and body["specserve"]["mode"] == "sd"
    first = oa.stream_chunk(r, "id", pb.GenerateChunk(text="a"), True)
    last = oa.stream_chunk(r, "id", pb.GenerateChunk(text="bc", stats=stats), False)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"} and first["usage"] is None
    assert last["choices"][0]["finish_reason"] == "stop" and last["specserve"]["new_tokens"] == 3
    u = oa.usage_chunk(r, "id", stats)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 7
    assert json.loads(oa.sse(u)[len("data: "):]) == u and oa.SSE_DONE == "data: [DONE]\n\n"
