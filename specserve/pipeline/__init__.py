"""The speculation pipeline: the target <-> draft gRPC stream (docs/architecture.md, "The speculation protocol").

- `wire.py`: engine objects <-> protobuf messages (specserve.v1.speculation_pb2), no gRPC.
- `draft_server.py`: the draft side. `DraftService` applies one TargetMessage at a time to its
  `specserve.engine.ssd.DraftSession`s (plain Python, tested without gRPC); `serve_stream` is the
  per-stream loop that speculates while the next message is awaited; the gRPC servicer, `serve`
  and `run_draft_worker` (the `specserve draft-worker` command) are thin layers over them.
- `remote_drafter.py`: the target side. `DraftClient` multiplexes many sequences over ONE stream
  and raises `DraftUnavailable` on a deadline or a broken stream (the target then decodes alone).

The protocol itself is documented in protos/specserve/v1/speculation.proto.
"""
