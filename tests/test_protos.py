"""The committed generated code (specserve/v1/*_pb2*) matches protos/ and imports cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "protos" / "gen.sh"
GENERATED = ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi")


def _generated(base: Path) -> dict[str, bytes]:
    """{path relative to base: content} of every generated file under base/specserve."""
    return {str(p.relative_to(base)): p.read_bytes()
            for pattern in GENERATED for p in (base / "specserve").rglob(pattern)}


def test_committed_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to regenerate (pip install -e '.[dev]')")
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"protos/gen.sh failed:\n{run.stdout}\n{run.stderr}"
    fresh, committed = _generated(tmp_path), _generated(ROOT)
    assert fresh, "protos/gen.sh generated nothing"
    stale = sorted(p for p in fresh if committed.get(p) != fresh[p])
    orphans = sorted(set(committed) - set(fresh))
    assert not stale and not orphans, (
        f"generated code is stale: {stale or ''} {('no .proto for ' + str(orphans)) if orphans else ''}; "
        "run protos/gen.sh and commit the result")


def test_messages_round_trip():
    from specserve.v1 import speculation_pb2 as pb
    from specserve.v1 import speculation_pb2_grpc as pb_grpc

    msg = pb.TargetMessage(start=pb.Start(seq="a", prompt_ids=[1, 2, 3],
                                          params=pb.SpecParams(temperature=0.7, k=3, fanout=[2, 1])))
    back = pb.TargetMessage.FromString(msg.SerializeToString())
    assert back.WhichOneof("kind") == "start" and list(back.start.prompt_ids) == [1, 2, 3]
    assert back.start.params.HasField("k") and not back.start.params.HasField("top_p")
    out = pb.DraftMessage(proposal=pb.Proposal(seq="a", round=2, token_ids=[5],
                                               q=[pb.SparseDist(ids=[5, 6], probs=[0.75, 0.25])]))
    back = pb.DraftMessage.FromString(out.SerializeToString())
    assert back.proposal.q[0].probs[0] == 0.75
    assert pb.Error.STALE_ROUND == 2 and pb.Error.Code.Name(3) == "UNKNOWN_SEQUENCE"
    assert hasattr(pb_grpc, "SpeculationStub") and hasattr(pb_grpc, "add_SpeculationServicer_to_server")
