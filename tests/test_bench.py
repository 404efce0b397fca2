"""`specserve bench` smoke test on the tiny models (seconds, no real weights)."""

import json

import pytest

from specserve.tools.bench import load_prompts
from specserve.cli import main


def test_bench_tiny_all_modes(tiny_dir, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--target", str(tiny_dir / "target"), "--draft", str(tiny_dir / "draft-same"),
               "--dtype", "float32", "--draft-quantize", "none", "--threads", "1", "--prompts", "chat",
               "--n", "3", "--max-new-tokens", "16", "--out", str(out), "--plot", str(png)])
    table = capsys.readouterr().out
    assert rc == 0
    assert "| ar |" in table and "| hf-assisted |" in table and "| sd |" in table
    res = json.loads(out.read_text())
    summ = res["summary"]
    assert summ["sd"]["mismatches"] == 0 and summ["hf-assisted"]["mismatches"] == 0
    assert summ["sd"]["acceptance_rate"] == 1.0
    assert len(res["records"]) == 9 and {r["mode"] for r in res["records"]} == {"ar", "hf-assisted", "sd"}
    sd = [r for r in res["records"] if r["mode"] == "sd"]
    assert all(sum(r["accepted_per_round"]) == r["accepted_tokens"] for r in sd)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_reports_a_mismatch(tiny, monkeypatch):
    """A mode whose tokens differ from ar's is reported, with the first differing position."""
    import specserve.tools.bench as bench

    real = bench._run_engine

    def broken(mode, *a, **kw):
        r = real(mode, *a, **kw)
        if mode == "sd":
            r.token_ids[3] += 1
        return r

    monkeypatch.setattr(bench, "_run_engine", broken)
    res = bench.run_bench(tiny["target"], tiny["draft-random"], load_prompts("chat", 2), ["ar", "sd"],
                          max_new_tokens=8, warmup=False, progress=False)
    assert res["summary"]["sd"]["mismatches"] == 2
    assert res["summary"]["sd"]["mismatch_detail"] == ["chat/0@3", "chat/1@3"]


def test_prompt_sets(tmp_path):
    assert len(load_prompts("chat", 5)) == 5
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b", "chat": true, "id": "x"}\n')
    ps = load_prompts(str(f), 10)
    assert [p.text for p in ps] == ["a", "b"] and ps[1].chat and ps[1].id == "x"
    f.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1 .*\"prompt\""):
        load_prompts(str(f), 1)
    with pytest.raises(ValueError, match="--prompts"):
        load_prompts("nope.jsonl", 1)
