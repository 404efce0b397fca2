"""The GPU check's code on the CPU: `--quick --device cpu` end to end, its cost table fed to `simulate --costs`.

scripts/gpu_check.sh runs the same module on CUDA with the real shapes; here the shapes are tiny
so that every line of it runs in CI. No timing is asserted: only that the table is complete and valid.
"""

import json

import pytest

from specserve.cli import main as cli
from specserve.tools.cost_table import CostTable
from specserve.tools.gpu_check import main

TRACE = {"records": [
    {"mode": "ar", "new_tokens": 6},
    {"mode": "sd", "new_tokens": 6, "drafted_per_round": [2, 2], "accepted_per_round": [2, 1], "hit_per_round": [0, 0]},
    {"mode": "ssd", "new_tokens": 6, "drafted_per_round": [2, 2], "accepted_per_round": [2, 1],
     "hit_per_round": [0, 1]},
]}


def test_quick_cost_table_feeds_simulate(tmp_path, capsys):
    out = tmp_path / "costs.json"
    assert main(["--device", "cpu", "--quick", "--skip-exactness", "--rows", "1,8", "--tokens", "1,3",
                 "--reps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PASS cost table" in printed and "SUMMARY: 1 passed, 0 failed" in printed
    table = CostTable.load(out)
    assert set(table.target) == {"1x1", "1x3", "8x1", "8x3"}
    assert set(table.draft) == {"1x1", "1x3", "8x1", "8x3", "64x1", "64x3"}  # and a batch of 8's branch rows
    assert table.device == "cpu" and table.dtype == "float32" and table.meta["reps"] == 1
    trace = tmp_path / "bench.json"
    trace.write_text(json.dumps(TRACE))
    assert cli(["simulate", str(trace), "--costs", str(out)]) == 0  # ssd at batch 1: 8 branch rows, measured
    assert "| ssd |" in capsys.readouterr().out
    assert cli(["simulate", str(trace), "--costs", str(out), "--batch", "8"]) == 0  # 64 branch rows: measured
    assert "| ssd |" in capsys.readouterr().out
    assert cli(["simulate", str(trace), "--costs", str(out), "--batch", "8", "--branches", "16"]) == 2  # 128: not
    assert "draft rows" in capsys.readouterr().err


def test_exactness_checks_pass_on_the_cpu(capsys):
    """Part (a) with the tiny models: every mode equals ar (on CUDA the script also counts syncs)."""
    assert main(["--device", "cpu", "--quick", "--skip-costs"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("PASS ") == 9 and "FAIL" not in printed


def test_refusals_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--dtype", "int4", "--skip-exactness"])
    assert "--dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--rows", "one", "--skip-exactness"])
    assert "--rows" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_saying_so(capsys):
    assert main(["--device", "cuda"]) == 1
    assert "sees no CUDA GPU" in capsys.readouterr().out


def test_a_mismatch_names_the_token_and_the_targets_logit_gap(tiny):
    from specserve.tools.gpu_check import _same

    _same([1, 2, 3], [1, 2, 3], "equal")
    with pytest.raises(AssertionError, match=r"x: differs from its ar run at new token 2 .*top-2 logit gap"):
        _same([1, 2, 3], [1, 2, 4], "x", tiny["target"], [5, 6])
