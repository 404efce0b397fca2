"""`specserve bench --concurrency 1,8`: the modes at each concurrency level through the batching engine.

At level C the prompts go through ONE `Engine` (the one a target replica runs) C at a time: C
requests are admitted, and each one that finishes is replaced by the next prompt until all ran.
Per `mode@C` the summary has:
  aggregate_tokens_per_s  all new tokens / the wall time of that mode and level
  tokens_per_s_median     per request (its new tokens / its time from admission to its last chunk)
  acceptance_rate, mean_k (drafts per row and round), mean_batch (rows per round)
  cache_hit_rate          ssd: proposals answered from the draft worker's speculation cache, with
                          late_hits, hit_answer_ms and miss_answer_ms (outcome sent -> proposal back),
                          hit_rate_after_accept / _after_reject (split by how the round before
                          ended: a bonus or a recovered token to guess; rounds_after_* count them)
                          and miss_k_rounds (rounds by the drafts a miss got: 0 = none, see
                          scheduler.ssd_miss_k)
  mismatches              greedy: every sequence against `ar@1`, with the first diverging position
                          and the target's top-2 logit gap there (a near-tie explains a flip)
hf-assisted cannot batch: at C > 1 its requests run one after another (`sequential: true`).
ssd rows draft through a RemoteDrafter each, over the one `client` stream to a draft worker.

This module knows the engine, prompts and clocks; it does not know servers.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..engine.engine import Engine
from ..engine.lm import LM
from ..engine.sampling import SamplingParams
from ..engine.sequence import Request, SpeculationParams
from ..engine.speculative import SpecConfig
from ..pipeline.drafters import make_drafter
from .bench import _first_diff, format_hit_split, hit_split_summary, host_facts, run_one

__all__ = ["BATCH_MODES", "run_levels", "logit_gap", "format_levels", "plot_levels"]

BATCH_MODES = ("ar", "sd", "ssd", "hf-assisted")


@torch.inference_mode()
def logit_gap(target: LM, prompt_ids: list[int], out_ids: list[int], at: int) -> float:
    """The target's top-1 minus top-2 logit at output position `at` (teacher-forced on `out_ids`)."""
    x = torch.tensor([prompt_ids + out_ids[:at]], device=target.model.device)
    logits = target.model(input_ids=x).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return round(float(top[0] - top[1]), 6)


def _run_level(engine: Engine, encoded, mode: str, C: int, max_new: int, sp: SamplingParams,
               k: int | None, seed: int, bar=None, client=None, fanout=None) -> tuple[list[dict], float, dict]:
    """All prompts through the engine, C at a time; returns (records, wall seconds, engine stats delta)."""
    before = {key: dict(v) if isinstance(v, dict) else v for key, v in vars(engine.stats).items()}
    pending = list(enumerate(encoded))
    live: dict[str, tuple] = {}
    records: list[dict] = []
    t0 = time.perf_counter()
    while pending or live:
        while pending and len(live) < C:
            i, (p, ids) = pending.pop(0)
            drafter = None
            if mode == "ssd":
                drafter = make_drafter("ssd", ids, engine.target.vocab_size, sp, SpecConfig(mode="ssd", k=k),
                                       client=client, fanout=fanout, seed=seed + i, max_new_tokens=max_new)
            rid = engine.add(Request(ids, max_new, sp, seed + i, spec=SpeculationParams(mode, k), drafter=drafter))
            live[rid] = (p, engine.seqs[rid], [])
        for rid, chunk in engine.step():
            p, seq, toks = live[rid]
            toks += chunk.token_ids
            if chunk.finish_reason:
                st = seq.stats
                records.append({"prompt_id": p.id, "mode": f"{mode}@{C}", "prompt_tokens": st.prompt_tokens,
                                "new_tokens": st.new_tokens, "elapsed_s": st.elapsed_s, "rounds": st.rounds,
                                "draft_tokens": st.draft_tokens, "accepted_tokens": st.accepted_tokens,
                                "tokens_per_s": st.new_tokens / st.elapsed_s if st.elapsed_s > 0 else 0.0,
                                "drafted_per_round": st.drafted_per_round,  # traces for `specserve simulate`
                                "accepted_per_round": st.accepted_per_round,
                                "hit_per_round": st.hit_per_round or [0] * st.rounds,
                                "cache_hits": st.cache_hits, "cache_misses": st.cache_misses,
                                "late_hits": st.late_hits, "hit_wait_s": st.hit_wait_s, "miss_wait_s": st.miss_wait_s,
                                "fallback": st.fallback, "token_ids": toks})
                del live[rid]
                if bar is not None:
                    bar.set_postfix_str(f"{mode}@{C} {p.id} {records[-1]['tokens_per_s']:.2f} tok/s")
                    bar.update(1)
    wall = time.perf_counter() - t0
    delta = {key: ({m: n - before[key].get(m, 0) for m, n in v.items() if n - before[key].get(m, 0)}
                   if isinstance(v, dict) else v - before[key]) for key, v in vars(engine.stats).items()}
    return records, wall, delta


def _run_hf_sequential(target, draft, encoded, C, max_new, sp, seed, bar=None) -> tuple[list[dict], float, dict]:
    records, t0 = [], time.perf_counter()
    for i, (p, ids) in enumerate(encoded):
        r = run_one("hf-assisted", target, draft, ids, max_new, sp, seed=seed + i)
        records.append({"prompt_id": p.id, "mode": f"hf-assisted@{C}", "prompt_tokens": len(ids),
                        "new_tokens": r.new_tokens, "elapsed_s": r.elapsed_s, "rounds": 0, "draft_tokens": 0,
                        "accepted_tokens": 0, "tokens_per_s": r.tokens_per_s, "token_ids": r.token_ids})
        if bar is not None:
            bar.update(1)
    return records, time.perf_counter() - t0, {}


def run_levels(target: LM, draft: LM | None, encoded, modes: list[str], levels: list[int], max_new: int,
               sampling: SamplingParams | None = None, k: int | None = None, seed: int = 0,
               engine: Engine | None = None, progress: bool = True, warmup: bool = True, client=None,
               fanout: list[int] | None = None) -> dict:
    """Every mode at every level: {"config", "summary" {"mode@C": {...}, "mode": its C = 1 entry}, "records"}.

    The records of C = 1 also appear under the plain mode name, so `specserve simulate` replays them.
    """
    from tqdm import tqdm

    sp = sampling or SamplingParams()
    bad = [m for m in modes if m not in BATCH_MODES]
    if bad:
        raise ValueError(f"--modes: {', '.join(bad)} cannot run with --concurrency (it runs "
                         f"{', '.join(BATCH_MODES)}): drop them or run without --concurrency")
    if "ssd" in modes and client is None:
        raise ValueError("--modes ssd needs a draft worker: pass --draft (a local worker is started) or --draft-address")
    if any(c < 1 for c in levels):
        raise ValueError(f"--concurrency: levels must be >= 1, got {levels}")
    if sp.greedy:  # ar@1 is the reference of the exactness check
        modes = modes if "ar" in modes else ["ar", *modes]
        levels = sorted(set(levels) | {1})
    engine = engine or Engine(target, draft, max_num_seqs=max(levels),
                              max_model_len=max(len(ids) for _, ids in encoded) + max_new + 1)
    if warmup:  # the first forwards of a process are slow (allocation, kernel selection)
        _run_level(engine, encoded[:1], modes[0] if modes[0] != "hf-assisted" else "ar", 1, min(8, max_new), sp, k, seed)
    summary, records = {}, []
    runs = [(m, c) for c in sorted(levels) for m in modes]
    bar = tqdm(total=len(runs) * len(encoded), desc="bench --concurrency", unit="request", disable=not progress)
    for m, c in runs:
        if m == "hf-assisted":
            recs, wall, delta = _run_hf_sequential(target, draft, encoded, c, max_new, sp, seed, bar)
        else:
            recs, wall, delta = _run_level(engine, encoded, m, c, max_new, sp, k, seed, bar, client, fanout)
        summary[f"{m}@{c}"] = _summarize(recs, wall, delta, sequential=m == "hf-assisted" and c > 1)
        records += recs
    bar.close()
    if sp.greedy:
        _check(summary, records, target, dict((p.id, ids) for p, ids in encoded))
    for m in modes:  # the plain entries are the C = 1 ones
        if f"{m}@1" in summary:
            summary[m] = summary[f"{m}@1"]
            records += [dict(r, mode=m) for r in records if r["mode"] == f"{m}@1"]
    return {"config": {"target": target.describe(), "draft": draft.describe() if draft else None, "modes": modes,
                       "concurrency": sorted(levels), "prompts": len(encoded), "max_new_tokens": max_new,
                       "temperature": sp.temperature, "k": k, "seed": seed, "threads": torch.get_num_threads(),
                       **host_facts(), "engine": engine.capacity()},
            "summary": summary, "records": records}


def _summarize(recs: list[dict], wall: float, delta: dict, sequential: bool) -> dict:
    new = sum(r["new_tokens"] for r in recs)
    d = {"prompts": len(recs), "new_tokens": new, "wall_s": round(wall, 3),
         "aggregate_tokens_per_s": round(new / wall, 3) if wall > 0 else 0.0,
         "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in recs), 3) if recs else 0.0}
    drafted = sum(r["draft_tokens"] for r in recs)
    d["acceptance_rate"] = round(sum(r["accepted_tokens"] for r in recs) / drafted, 4) if drafted else None
    hits, misses = (sum(r.get(key, 0) for r in recs) for key in ("cache_hits", "cache_misses"))
    if hits + misses:  # ssd; the answer latency: from sending a row's outcome to having its next proposal
        d["cache_hit_rate"] = round(hits / (hits + misses), 4)
        d["late_hits"] = sum(r["late_hits"] for r in recs)
        d["hit_answer_ms"] = round(1000 * sum(r["hit_wait_s"] for r in recs) / hits, 2) if hits else None
        d["miss_answer_ms"] = round(1000 * sum(r["miss_wait_s"] for r in recs) / misses, 2) if misses else None
        d.update(hit_split_summary((r["drafted_per_round"], r["accepted_per_round"], r["hit_per_round"]) for r in recs))
    if any(r.get("fallback") for r in recs):
        d["fallbacks"] = sum(1 for r in recs if r.get("fallback"))
    if delta.get("rounds"):
        d["mean_batch"] = round(delta["row_rounds"] / delta["rounds"], 3)
        d["mean_k"] = round(delta["draft_tokens"] / delta["row_rounds"], 3)
    if delta.get("miss_k_rounds"):  # ssd: rounds by the miss_k the policy chose (0 = a miss decodes plainly)
        d["miss_k_rounds"] = {str(m): n for m, n in sorted(delta["miss_k_rounds"].items())}
    if sequential:
        d["sequential"] = True  # hf-assisted cannot batch: one request after another
    return d


def _check(summary: dict, records: list[dict], target: LM, prompts: dict[str, list[int]]) -> None:
    ref = {r["prompt_id"]: r["token_ids"] for r in records if r["mode"] == "ar@1"}
    for key, d in summary.items():
        if key == "ar@1" or "@" not in key:
            continue
        bad = []
        for r in (x for x in records if x["mode"] == key):
            at = _first_diff(r["token_ids"], ref[r["prompt_id"]])
            if at is not None:
                gap = logit_gap(target, prompts[r["prompt_id"]], ref[r["prompt_id"]], at)
                bad.append({"prompt_id": r["prompt_id"], "at": at, "top2_logit_gap": gap})
        d["mismatches"] = len(bad)
        d["mismatch_detail"] = bad


def plot_levels(result: dict, path) -> None:
    """Aggregate tokens/s against concurrency, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in result["config"]["modes"]:
        pts = sorted((int(key.split("@")[1]), d["aggregate_tokens_per_s"]) for key, d in summ.items()
                     if key.startswith(f"{m}@"))
        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=m)
        for c, v in pts:
            ax.annotate(f"{v:.1f}", (c, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("concurrent requests (C)")
    ax.set_ylabel("aggregate new tokens/s")
    cfg = result["config"]
    ax.set_title(f"{cfg['target']['name']} / {cfg['draft']['name'] if cfg['draft'] else '-'}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_levels(summary: dict) -> str:
    """A markdown table of the `mode@C` entries, with each level's ratio to ar at the same level."""
    rows = ["| mode@C | aggregate tok/s | vs ar@C | vs ar@1 | tok/s per request (median) | acceptance | mean k "
            "| mean batch | cache hit rate | mismatches |", "|---|---|---|---|---|---|---|---|---|---|"]
    ar1 = summary.get("ar@1", {}).get("aggregate_tokens_per_s")
    for key, d in summary.items():
        if "@" not in key:
            continue
        c = key.split("@")[1]
        arc = summary.get(f"ar@{c}", {}).get("aggregate_tokens_per_s")
        agg = d["aggregate_tokens_per_s"]
        acc = d.get("acceptance_rate")
        rows.append(f"| {key}{' (sequential)' if d.get('sequential') else ''} | {agg:.2f} | "
                    f"{agg / arc if arc else 0:.2f}x | {agg / ar1 if ar1 else 0:.2f}x | {d['tokens_per_s_median']:.2f} | "
                    f"{'—' if acc is None else f'{acc:.2f}'} | {d.get('mean_k', '—')} | {d.get('mean_batch', '—')} | "
                    f"{d.get('cache_hit_rate', '—')} | {d.get('mismatches', '—')} |")
    notes = [line for key, d in summary.items() if "@" in key and (line := format_hit_split(key, d))]
    return "\n".join(rows + ([""] + notes if notes else []))
