"""The OpenAI-compatible HTTP API as plain functions: JSON bodies in, the gRPC API's requests out.

`parse_completion` / `parse_chat_completion` check an OpenAI body's types and refuse what
specserve does not do (n > 1, logprobs, tools, ...), then build the same `pb.GenerateRequest` a
gRPC client would send: `RouterCore` validates it with `api.parse_generate`, so both APIs share
one set of rules and one code path to the target. `completion_body` / `stream_chunk` /
`usage_chunk` shape replies; `error_response` turns an `ApiError` into OpenAI's error object and
its HTTP status. No Ray, no FastAPI: every rule here is tested without a server.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from .api import MODE_NAMES, ApiError, QueueFull, pb

__all__ = ["OpenAIRequest", "parse_completion", "parse_chat_completion", "parse_json", "completion_body",
           "stream_chunk", "usage_chunk", "sse", "SSE_DONE", "error_response", "models_body", "FINISH"]

_INT32 = 2 ** 31 - 1
_MODES = {name: num for num, name in MODE_NAMES.items()}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # engine -> OpenAI finish_reason
SSE_DONE = "data: [DONE]\n\n"

# What an OpenAI client may send that specserve accepts: name -> None (any JSON) or a checker.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
           "speculation", "n", "user", "logprobs", "frequency_penalty", "presence_penalty", "logit_bias"}
_COMPLETION = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                   "function_call", "response_format", "parallel_tool_calls"}
# Known OpenAI fields specserve refuses unless they hold their "off" value.
_OFF = {"n": (1,), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
        "best_of": (None, 1), "suffix": (None, ""), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
        "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
        "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
        "parallel_tool_calls": (None, False, True)}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _bad(param: str, message: str) -> ApiError:
    e = ApiError("INVALID_ARGUMENT", message)
    e.param = param
    return e


@dataclass
class OpenAIRequest:
    """One parsed OpenAI body: the gRPC request it means, and how to answer it."""

    request: pb.GenerateRequest
    model: str
    stream: bool = False
    include_usage: bool = False
    chat: bool = False
    messages: list[dict] = field(default_factory=list)  # chat: the conversation, as the target templates it


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 that says what is wrong with it."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad("body", f"the body is not JSON ({e}): send a JSON object with Content-Type application/json")


def _int(name: str, v: Any, lo: int, hi: int = _INT32) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"{name} is {_show(v)}: it must be an integer")
    if not lo <= v <= hi:
        raise _bad(name, f"{name} is {v}: it must be between {lo} and {hi}")
    return v


def _num(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"{name} is {_show(v)}: it must be a number")
    return float(v)


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(name, f"{name} is {_show(v)}: it must be true or false")
    return v


def _show(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def _common(body: Any, allowed: set[str], served_model: str, **fixed: Any) -> OpenAIRequest:
    """Type checks shared by both endpoints; the fields go into a GenerateRequest unvalidated by range."""
    if not isinstance(body, dict):
        raise _bad("body", f"the body is {_show(body)}: send a JSON object")
    for key in body:
        if key not in allowed:
            raise _bad(key, f"{key} is not supported by this server: remove it (supported: "
                            f"{', '.join(sorted(allowed - set(_OFF)))})")
    for key, off in _OFF.items():
        if key in body and not any(type(body[key]) is type(o) and body[key] == o for o in off):
            raise _bad(key, f"{key}={_show(body[key])} is not supported by this server: remove {key} "
                            f"(specserve returns one choice, without log-probabilities or tools)")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", f"model is {_show(model)}: name the served model ({served_model!r}, see GET /v1/models)")
    if model != served_model:
        e = ApiError("NOT_FOUND", f"model {model[:80]!r} is not served here: use {served_model!r} (GET /v1/models)")
        e.param = "model"
        raise e
    req = pb.GenerateRequest(**fixed)
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        req.max_tokens = _int("max_tokens", tokens, -_INT32)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            setattr(req.sampling, name, _num(name, body[name]))
    if body.get("top_k") is not None:
        req.sampling.top_k = _int("top_k", body["top_k"], -_INT32)
    if body.get("seed") is not None:
        req.sampling.seed = _int("seed", body["seed"], -2 ** 63, 2 ** 64 - 1) % 2 ** 64
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", f"stop is {_show(stop)}: give a string or a list of strings")
        req.stop.extend(stop)
    _speculation(req, body.get("speculation"))
    out = OpenAIRequest(req, model)
    if body.get("stream") is not None:
        out.stream = _bool("stream", body["stream"])
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage"}:
            raise _bad("stream_options", f"stream_options is {_show(so)}: give {{\"include_usage\": true}}")
        if not out.stream:
            raise _bad("stream_options", "stream_options needs stream: true")
        out.include_usage = _bool("stream_options.include_usage", so.get("include_usage", False))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", f"user is {_show(body['user'])}: it must be a string")
    return out


def _speculation(req: pb.GenerateRequest, sp: Any) -> None:
    """The `speculation: {mode, k}` extension -> SpeculationParams (api.py checks k's range)."""
    if sp is None:
        return
    if not isinstance(sp, dict) or set(sp) - {"mode", "k"}:
        raise _bad("speculation", f"speculation is {_show(sp)}: give {{\"mode\": \"ar\" | \"sd\" | \"ssd\", "
                                  "\"k\": draft tokens per round}} (both optional)")
    if sp.get("mode") is not None:
        if sp["mode"] not in _MODES:
            raise _bad("speculation.mode", f"speculation.mode is {_show(sp['mode'])}: use \"ar\", \"sd\" or \"ssd\"")
        req.speculation.mode = _MODES[sp["mode"]]
    if sp.get("k") is not None:
        req.speculation.k = _int("speculation.k", sp["k"], -_INT32)


def parse_completion(body: Any, served_model: str) -> OpenAIRequest:
    """POST /v1/completions: `prompt` is a string, a list of one string, or a list of token ids."""
    out = _common(body, _COMPLETION, served_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        out.request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        out.request.prompt_ids.extend(_int("prompt", t, -_INT32) for t in prompt)
    else:
        raise _bad("prompt", f"prompt is {_show(prompt)}: give one string (or one list of token ids); "
                             "several prompts in one request are not supported")
    return out


def _content(i: int, m: Any) -> dict:
    # a reply passed back as it came (message.model_dump()) carries these, empty
    extra = {k for k, v in m.items() if k not in ("role", "content", "name") and v not in (None, [], "")} \
        if isinstance(m, dict) else set()
    if not isinstance(m, dict) or m.get("role") not in _ROLES or extra:
        raise _bad(f"messages[{i}]", f"messages[{i}] is {_show(m)}: give {{\"role\": \"system\" | \"user\" | "
                                     "\"assistant\", \"content\": \"...\"}")
    c = m.get("content")
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        c = "".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise _bad(f"messages[{i}].content", f"messages[{i}].content is {_show(c)}: give text (a string, or "
                                             "a list of {\"type\": \"text\", \"text\": ...} parts)")
    return {"role": _ROLES[m["role"]], "content": c}


def parse_chat_completion(body: Any, served_model: str) -> OpenAIRequest:
    """POST /v1/chat/completions: the conversation goes to the target's chat template as it is."""
    out = _common(body, _CHAT, served_model, chat=True)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", f"messages is {_show(msgs)}: give a non-empty list of {{role, content}}")
    out.messages = [_content(i, m) for i, m in enumerate(msgs)]
    if out.messages[-1]["role"] != "user" or not out.messages[-1]["content"].strip():
        raise _bad("messages", "the last of messages must be a non-empty user message: that is what the model answers")
    out.request.prompt = "\n".join(m["content"] for m in out.messages)  # for api.py's size check only
    out.chat = True
    return out


# ---------------------------------------------------------------------------- replies


def stats_dict(stats: pb.Stats) -> dict:
    return json_format.MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _usage(stats: pb.Stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens}


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def completion_body(r: OpenAIRequest, rid: str, reply: pb.GenerateReply) -> dict:
    """The unary reply: one choice, exact `usage`, the run's stats under `specserve`."""
    finish = FINISH.get(reply.stats.finish_reason, reply.stats.finish_reason or None)
    if r.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": reply.text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if r.chat else "text_completion", "created": int(time.time()),
            "model": r.model, "choices": [choice], "usage": _usage(reply.stats), "specserve": stats_dict(reply.stats)}


def stream_chunk(r: OpenAIRequest, rid: str, chunk: pb.GenerateChunk, first: bool) -> dict:
    """One round as an SSE chunk; the last round's carries finish_reason and the stats."""
    has = chunk.HasField("stats")
    finish = FINISH.get(chunk.stats.finish_reason, chunk.stats.finish_reason or None) if has else None
    if r.chat:
        delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": chunk.text, "finish_reason": finish, "logprobs": None}
    out = {"id": rid, "object": "chat.completion.chunk" if r.chat else "text_completion",
           "created": int(time.time()), "model": r.model, "choices": [choice]}
    if has:
        out["specserve"] = stats_dict(chunk.stats)
    if r.include_usage:
        out["usage"] = None
    return out


def usage_chunk(r: OpenAIRequest, rid: str, stats: pb.Stats) -> dict:
    """stream_options.include_usage: the extra last chunk, no choices, exact usage."""
    return {"id": rid, "object": "chat.completion.chunk" if r.chat else "text_completion",
            "created": int(time.time()), "model": r.model, "choices": [], "usage": _usage(stats)}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def models_body(model: str, modes: tuple[str, ...]) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "specserve",
                                        "specserve": {"modes": list(modes)}}]}


# ---------------------------------------------------------------------------- errors

# The gRPC API's field names, as an OpenAI body spells them.
_RENAME = [("sampling.temperature", "temperature"), ("sampling.top_p", "top_p"), ("sampling.top_k", "top_k"),
           ("prompt_ids", "prompt"), ("metadata 'authorization: Bearer <token>' (Client(..., token=...))",
                                      "header 'Authorization: Bearer <token>' (OpenAI(api_key=...))")]
_STATUS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "UNAUTHENTICATED": (401, "authentication_error"),
           "PERMISSION_DENIED": (403, "permission_error"), "NOT_FOUND": (404, "not_found_error"),
           "FAILED_PRECONDITION": (409, "conflict_error"), "RESOURCE_EXHAUSTED": (413, "invalid_request_error"),
           "UNAVAILABLE": (503, "service_unavailable")}
_PARAM = re.compile(r"^([a-z_]+(?:\.[a-z_]+|\[\d+\])*)\b")


def error_response(e: ApiError, chat: bool = False) -> tuple[int, dict]:
    """An ApiError -> (HTTP status, {"error": {message, type, param, code}}); queue full is 429."""
    message = e.message
    for old, new in _RENAME:
        message = message.replace(old, new)
    if chat and message.startswith("prompt is"):
        message = "messages" + message[len("prompt"):]
    status, kind = _STATUS.get(e.code, (500, "server_error"))
    if isinstance(e, QueueFull):
        status, kind = 429, "rate_limit_error"
    param = getattr(e, "param", None)
    if param is None and status in (400, 413):
        m = _PARAM.match(message)
        param = m.group(1) if m else None
    return status, {"error": {"message": message, "type": kind, "param": param, "code": e.code.lower()}}
