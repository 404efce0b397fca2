"""A small Python client of specserve's public gRPC API (`specserve.v1.SpecServe`).

    from specserve.client import Client

    with Client("127.0.0.1:9000") as c:
        print(c.generate("def fib(n):", max_tokens=64).text)
        for chunk in c.chat("Write a haiku about KV caches"):   # a new session
            print(chunk.text, end="", flush=True)
        session = chunk.session_id                             # continue it later

Every call raises `ClientError` (with the gRPC status `code` name and the server's message) on
failure. This module knows the wire API only: no models, no Ray.
"""

from __future__ import annotations

from typing import Any, Iterator

import grpc

from ..v1 import serving_pb2 as pb
from ..v1 import serving_pb2_grpc as pb_grpc

__all__ = ["Client", "ClientError", "pb", "request_fields"]

_MODES = {None: pb.MODE_UNSPECIFIED, "ar": pb.MODE_AR, "sd": pb.MODE_SD, "ssd": pb.MODE_SSD}


class ClientError(RuntimeError):
    """A call failed: `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `details` the reason."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


def _error(exc: grpc.RpcError) -> ClientError:
    return ClientError(exc.code().name, exc.details() or "")


def request_fields(max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, seed: int | None = None, stop: list[str] | tuple[str, ...] = (),
                   mode: str | None = None, k: int | None = None, fanout: list[int] | None = None,
                   no_speculation: bool = False) -> dict[str, Any]:
    """Keyword arguments shared by GenerateRequest and ChatRequest (None = the server's default)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be ar, sd, ssd or None, got {mode!r}")
    sampling = pb.Sampling()
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    spec = pb.SpeculationParams(mode=_MODES[mode], fanout=fanout or [], no_speculation=no_speculation)
    if k is not None:
        spec.k = k
    out: dict[str, Any] = {"sampling": sampling, "stop": list(stop), "speculation": spec}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


class Client:
    """A connection to a specserve server (Ray Serve's gRPC proxy, port 9000 by default).

    application: the Serve application name, needed only when the cluster runs several apps.
    timeout: a deadline in seconds for every call (None: no deadline).
    token: the server's bearer token, when it requires one (sent as `authorization: Bearer ...`).

    The client remembers the `session_token` of every session it started (`session_tokens`) and
    sends it with later calls on that session; pass `session_token=` for a session started elsewhere.
    """

    def __init__(self, address: str = "127.0.0.1:9000", application: str | None = None,
                 timeout: float | None = None, token: str | None = None):
        self.address, self.timeout = address, timeout
        md = ([("application", application)] if application else []) + (
            [("authorization", f"Bearer {token}")] if token else [])
        self.metadata = tuple(md) or None
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.SpecServeStub(self.channel)
        self.session_tokens: dict[str, str] = {}

    def _kw(self) -> dict:
        return {"timeout": self.timeout, "metadata": self.metadata}

    def generate(self, prompt: str | list[int], chat: bool = False, **kw: Any) -> pb.GenerateReply:
        """The whole reply at once. prompt: text, or token ids. kw: see `request_fields`."""
        try:
            return self.stub.Generate(self._request(prompt, chat, kw), **self._kw())
        except grpc.RpcError as e:
            raise _error(e) from None

    def stream(self, prompt: str | list[int], chat: bool = False, **kw: Any) -> Iterator[pb.GenerateChunk]:
        """One chunk per speculation round; the last one carries `stats`."""
        try:
            yield from self.stub.GenerateStream(self._request(prompt, chat, kw), **self._kw())
        except grpc.RpcError as e:
            raise _error(e) from None

    def chat(self, message: str, session_id: str = "", system: str = "", session_token: str | None = None,
             **kw: Any) -> Iterator[pb.GenerateChunk]:
        """One turn of a chat session (empty session_id: a new one; read its id from any chunk)."""
        req = pb.ChatRequest(session_id=session_id, message=message, system=system,
                             session_token=self._token(session_id, session_token), **request_fields(**kw))
        try:
            for chunk in self.stub.Chat(req, **self._kw()):
                if chunk.session_token:
                    self.session_tokens[chunk.session_id] = chunk.session_token
                yield chunk
        except grpc.RpcError as e:
            raise _error(e) from None

    def get_session(self, session_id: str, session_token: str | None = None) -> pb.Session:
        req = pb.GetSessionRequest(session_id=session_id, session_token=self._token(session_id, session_token))
        try:
            return self.stub.GetSession(req, **self._kw())
        except grpc.RpcError as e:
            raise _error(e) from None

    def delete_session(self, session_id: str, session_token: str | None = None) -> bool:
        req = pb.DeleteSessionRequest(session_id=session_id, session_token=self._token(session_id, session_token))
        try:
            return self.stub.DeleteSession(req, **self._kw()).deleted
        except grpc.RpcError as e:
            raise _error(e) from None

    def _token(self, session_id: str, given: str | None) -> str:
        return given if given is not None else self.session_tokens.get(session_id, "")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _request(prompt: str | list[int], chat: bool, kw: dict) -> pb.GenerateRequest:
        fields = request_fields(**kw)
        if isinstance(prompt, str):
            return pb.GenerateRequest(prompt=prompt, chat=chat, **fields)
        return pb.GenerateRequest(prompt_ids=[int(t) for t in prompt], chat=chat, **fields)
