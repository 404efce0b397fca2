"""`specserve bench` smoke test on the tiny models (seconds, no real weights)."""

import json

import pytest

from specserve.engine.kernels import native_bf16
from specserve.tools.bench import format_hit_split, hits_by_previous_round, load_prompts
from specserve.cli import main


def test_bench_tiny_all_modes(tiny_dir, tmp_path, capsys):
    """--k 3: on the tiny pair a draft step costs about a verify, so the policy's own k would be 0."""
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--target", str(tiny_dir / "target"), "--draft", str(tiny_dir / "draft-same"),
               "--dtype", "float32", "--draft-quantize", "none", "--threads", "1", "--prompts", "chat",
               "--n", "3", "--max-new-tokens", "16", "--k", "3", "--out", str(out), "--plot", str(png)])
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
    assert res["config"]["native_bf16"] == native_bf16() and res["config"]["cpus"] >= 1  # machines differ


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


def test_bench_concurrency_levels_through_the_engine(tiny_dir, tmp_path, capsys):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    rc = main(["bench", "--target", str(tiny_dir / "target"), "--draft", str(tiny_dir / "draft-same"),
               "--draft-quantize", "none", "--threads", "1", "--prompts", "chat", "--n", "4",
               "--max-new-tokens", "12", "--modes", "ar,sd,ssd,hf-assisted", "--concurrency", "1,3", "--k", "3",
               "--out", str(out), "--plot", str(png)])
    table = capsys.readouterr().out
    assert rc == 0 and "| sd@3 |" in table and "| hf-assisted@3 (sequential) |" in table
    res = json.loads(out.read_text())
    summ = res["summary"]
    assert {"ar@1", "sd@1", "ar@3", "sd@3", "ssd@3", "hf-assisted@1", "hf-assisted@3", "ar", "sd", "ssd"} <= set(summ)
    for key in ("sd@1", "ar@3", "sd@3", "ssd@1", "ssd@3", "hf-assisted@3"):
        assert summ[key]["mismatches"] == 0, (key, summ[key]["mismatch_detail"])
        assert summ[key]["new_tokens"] == 4 * 12 and summ[key]["aggregate_tokens_per_s"] > 0
    # --k 3 is the most a round drafts (the tiny draft doubts nearly every token: the early stop ends
    # most drafts after one); a draft equal to the target accepts all of it
    assert summ["sd@3"]["acceptance_rate"] == 1.0 and 0 < summ["sd@3"]["mean_k"] <= 3 and summ["sd"] == summ["sd@1"]
    assert summ["ar@3"]["mean_batch"] > 1.5 and summ["ar@1"]["mean_batch"] == 1.0
    assert summ["ssd@3"]["acceptance_rate"] == 1.0 and summ["ssd@3"]["cache_hit_rate"] > 0.8  # a draft worker, batched
    assert summ["ssd@3"]["mean_batch"] > 1.5 and "fallbacks" not in summ["ssd@3"]
    assert summ["ssd@3"]["hit_answer_ms"] > 0
    split = summ["ssd@3"]["rounds_after_accept"] + summ["ssd@3"]["rounds_after_reject"]
    assert split > 0 and summ["ssd@3"]["hit_rate_after_accept"] > 0.8  # a draft equal to the target: all accepted
    assert "ssd@3 cache hits: after a full accept" in table
    assert summ["hf-assisted@3"]["sequential"] and "sequential" not in summ["ar@3"]
    sd = [r for r in res["records"] if r["mode"] == "sd"]  # the C = 1 traces, for `specserve simulate`
    assert len(sd) == 4 and all(len(r["drafted_per_round"]) == r["rounds"] for r in sd)
    assert res["config"]["native_bf16"] == native_bf16() and res["config"]["cpus"] >= 1
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_concurrency_reports_a_mismatch_with_its_logit_gap(tiny, monkeypatch):
    import specserve.tools.bench_batch as bb

    real = bb._run_level

    def broken(engine, encoded, mode, C, *a):
        recs, wall, delta = real(engine, encoded, mode, C, *a)
        if (mode, C) == ("ar", 2):
            recs[0]["token_ids"][2] += 1
        return recs, wall, delta

    monkeypatch.setattr(bb, "_run_level", broken)
    target = tiny["target"]
    encoded = [(p, target.encode(p.text)) for p in load_prompts("chat", 2)]
    res = bb.run_levels(target, None, encoded, ["ar"], [2], 6, progress=False, warmup=False)
    d = res["summary"]["ar@2"]
    assert d["mismatches"] == 1 and d["mismatch_detail"][0]["at"] == 2
    assert d["mismatch_detail"][0]["top2_logit_gap"] >= 0
    with pytest.raises(ValueError, match="--modes ssd needs a draft worker"):
        bb.run_levels(target, None, encoded, ["ssd"], [2], 6, progress=False)


def test_hits_split_by_how_the_round_before_ended():
    # sequence 1: round 0 (the start) all accepted; round 1 hits after a full accept, then rejects;
    # round 2 misses after that rejection, all accepted; round 3 has no drafts (k = 0), so it neither
    # counts nor lets round 4 count; round 5 hits after round 4's full accept.
    # sequence 2: round 1 hits after round 0's rejection.
    traces = [([3, 3, 2, 0, 2, 2], [3, 1, 2, 0, 2, 0], [0, 1, 0, 0, 1, 1]),
              ([2, 2], [0, 2], [0, 1])]
    assert hits_by_previous_round(traces) == {"after_accept": [2, 2], "after_reject": [1, 2]}
    line = format_hit_split("ssd@4", {"hit_rate_after_accept": 2 / 3, "rounds_after_accept": 3,
                                      "hit_rate_after_reject": 0.5, "rounds_after_reject": 2,
                                      "hit_answer_ms": 18.3, "miss_answer_ms": None})
    assert line == "ssd@4 cache hits: after a full accept 0.67 of 3 rounds, after a rejection 0.50 of 2 rounds; a hit waits 18 ms"
    assert format_hit_split("sd@4", {"acceptance_rate": 0.8}) is None
