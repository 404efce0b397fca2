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
    assert sim["ssd"]["hit_rate"] == 1.0  # rounds 1 and 2 answer outcomes, both hits; round 0 answers the start
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


# ---------------------------------------------------------------------- a measured cost table

TABLE = {"device": "hand-made", "dtype": "bfloat16",
         "target": {"1x1": 10, "1x5": 14, "4x1": 12, "4x5": 20},
         "draft": {"1x1": 2, "1x5": 3, "4x1": 2.5, "4x5": 4, "32x1": 6, "32x5": 10}}


def test_table_interpolates_linearly_in_tokens_then_rows():
    from specserve.tools.cost_table import CostTable

    t = CostTable.from_dict(TABLE)
    assert t.forward_ms("target", 1, 5) == 14  # a measured point
    assert t.forward_ms("target", 1, 3) == pytest.approx(12)  # halfway from 1 to 5 tokens
    assert t.forward_ms("target", 1, 7) == pytest.approx(16)  # past 5 tokens: the last segment goes on
    assert t.forward_ms("target", 2, 1) == pytest.approx(10 + 2 / 3)  # a third of the way from 1 to 4 rows
    assert t.forward_ms("target", 4, 3) == pytest.approx(16)
    assert t.forward_ms("draft", 8, 1) == pytest.approx(3.0)  # 2.5 + (6 - 2.5) * 4 / 28
    with pytest.raises(ValueError, match=r"target rows: .*5 rows.*1\.\.4.*--rows"):
        t.forward_ms("target", 5, 1)


def test_table_costs_by_hand():
    from specserve.tools.cost_table import CostTable
    from specserve.tools.simulate import TableCost

    t = CostTable.from_dict(TABLE)
    sim = simulate(RESULT, TableCost(t, batch=1, branches=8, net_ms=1))
    assert sim["ar"]["ms"] == 10 * 10  # target (1, 1) per token
    assert sim["sd"]["ms"] == pytest.approx((8 + 14) * 2 + (4 + 12))  # k draft (1, 1) steps + target (1, k+1)
    # ssd: miss (14 + 8 + 1); hit k=4: T_spec = draft(1, 5) 3 + 4 x draft(8, 1) 3.0 = 15 > 14; hit k=2: 2.5 + 6 < 12
    assert sim["ssd"]["ms"] == pytest.approx(23 + 16 + 13)
    b4 = simulate(RESULT, TableCost(t, batch=4, branches=8, net_ms=1))
    assert b4["sd"]["ms"] == pytest.approx((10 + 20) * 2 + (5 + 16))
    assert b4["ar"]["aggregate_tokens_per_s"] == pytest.approx(4 * 10 / 120 * 1000, rel=1e-3)
    with pytest.raises(ValueError, match="target rows"):
        simulate(RESULT, TableCost(t, batch=8))  # the table measured 1..4 target rows


@pytest.mark.parametrize("change, field", [
    ({"target": {"1x1": -1}}, "target['1x1']"),
    ({"target": {"1x1": 10, "4x5": 20}}, "target['1x5'] is missing"),
    ({"draft": {"8 by 1": 3}}, "draft['8 by 1']"),
    ({"dtype": ""}, "dtype"),
    ({"target": {}}, "target is empty"),
    ({"rows": [1]}, "rows is not a cost table field"),
])
def test_a_bad_table_is_refused_naming_the_field(change, field):
    from specserve.tools.cost_table import CostTable

    with pytest.raises(ValueError) as e:
        CostTable.from_dict({**TABLE, **change})
    assert field in str(e.value)


def test_costs_through_the_cli(tmp_path, capsys):
    f, costs = tmp_path / "r.json", tmp_path / "costs.json"
    f.write_text(json.dumps(RESULT))
    costs.write_text(json.dumps(TABLE))
    assert main(["simulate", str(f), "--costs", str(costs), "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "batch 4" in out and "aggregate tok/s" in out and "| sd |" in out
    assert main(["simulate", str(f), "--batch", "4"]) == 2
    assert "--batch needs --costs" in capsys.readouterr().err
    costs.write_text(json.dumps({**TABLE, "draft": {}}))  # the sd and ssd records need draft forwards
    assert main(["simulate", str(f), "--costs", str(costs)]) == 2
    err = capsys.readouterr().err
    assert "--costs" in err and "draft is empty" in err
    costs.write_text(json.dumps({**TABLE, "target": {"1x1": "fast"}}))
    assert main(["simulate", str(f), "--costs", str(costs)]) == 2
    assert "target['1x1']" in capsys.readouterr().err
    assert main(["simulate", str(f), "--costs", str(tmp_path / "none.json")]) == 2
    assert "gpu_check" in capsys.readouterr().err
