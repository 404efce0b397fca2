"""`specserve simulate` on a hand-made trace with hand-computed costs."""

import json

import pytest

from specserve.cli import main
from specserve.tools.simulate import CostModel, simulate

RESULT = {"records": [
    {"mode": "ar", "new_tokens": 10},
    {"mode": "sd", "new_tokens": 10, "drafted_per_round": [4, 4, 2], "accepted_per_round": [4, 3, 0],
     "hit_per_round": [0, 0, 0]},
    {"mode": "ssd", "new_tokens": 10, "drafted_per_round": [4, 4, 2], "accepted_per_round": [4, 3, 0],
     "hit_per_round": [0, 1, 1]},
]}


def test_costs_by_hand():
    c = CostModel(verify_ms=20, draft_ms=2, net_ms=1, spec_factor=1.0)
    sim = simulate(RESULT, c)
    assert sim["ar"]["ms"] == 200  # 10 target steps
    assert sim["sd"]["ms"] == (8 + 20) + (8 + 20) + (4 + 20)
    # ssd: round 0 misses (20 + 8 + 1); round 1 hits, T_spec = 5 * 2 = 10 < 20 (20 + 1); round 2 hits (20 + 1)
    assert sim["ssd"]["ms"] == 29 + 21 + 21
    assert sim["ssd"]["hit_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert sim["sd"]["vs_ar"] == pytest.approx(200 / 80, rel=1e-3)
    # a slow draft: speculation takes longer than verification and hides less
    slow = simulate(RESULT, CostModel(verify_ms=20, draft_ms=10, net_ms=0, spec_factor=1.0))
    assert slow["ssd"]["ms"] == (20 + 40) + 50 + 30


def test_cli(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(RESULT))
    assert main(["simulate", str(f), "--verify-ms", "20", "--draft-ms", "2"]) == 0
    out = capsys.readouterr().out
    assert "| ssd |" in out and "| ar |" in out
    assert main(["simulate", str(tmp_path / "missing.json")]) == 2
    assert "bench --out" in capsys.readouterr().err
    assert main(["simulate", str(f), "--verify-ms", "-1"]) == 2
    assert "--verify-ms" in capsys.readouterr().err
