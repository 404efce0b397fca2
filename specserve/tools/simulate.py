"""`specserve simulate`: replay bench traces under a cost model of another machine.

A bench run records, per round, how many tokens were drafted and accepted and (ssd) whether the
proposal came from the speculation cache. Those traces depend on the models and prompts, not on
the hardware, so replaying them with other step times predicts what ar / sd / ssd would do
there, e.g. draft and target on separate GPUs. Costs of one round with k drafted tokens:

  ar   one target step per token                          T_v
  sd   draft k tokens, then verify                        k * T_d + T_v
  ssd  cache hit: the proposal was ready while verifying  max(T_v, T_spec) + T_net
       miss: draft just in time after the outcome         T_v + k * T_d + T_net
       with T_spec = (k + 1) * T_d * spec_factor (the glue forward + k batched branch steps)

With a measured cost table (`--costs FILE`, tools/cost_table.py) and a batch size B the step
times depend on the round's shape instead (`TableCost`): T_v = target forward at (B rows, k + 1
tokens), a draft step = draft forward at (B rows, 1 token), T_spec = the glue forward at (B rows,
k + 1 tokens) + k batched branch steps at (B x branches rows, 1 token); ar costs target (B, 1) per
token. B > 1 assumes every row of the batch drafts like the traced one (same k per round), and
the aggregate throughput is B x the per-sequence tokens/s.

The cache hit rate counts hits among the rounds that answer an outcome: every round but a
sequence's first, whose proposal no speculation could have prepared. The bench's `cache_hit_rate`
counts the same, plus the answers to outcomes after which the sequence had ended (no round used
them), so the two differ by a few answers.

This module reads JSON and does arithmetic; it knows nothing of models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .cost_table import CostTable

__all__ = ["CostModel", "TableCost", "simulate", "format_simulation"]


@dataclass
class CostModel:
    verify_ms: float = 20.0  # one target forward (decode or verify of k+1 tokens)
    draft_ms: float = 1.5  # one draft step
    net_ms: float = 0.1  # one target <-> draft message round trip
    spec_factor: float = 1.2  # a batched branch step over one plain draft step

    def __post_init__(self):
        for name in ("verify_ms", "draft_ms", "net_ms", "spec_factor"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.verify_ms == 0:
            raise ValueError("verify_ms must be > 0")

    batch = 1

    def verify(self, k: int) -> float:  # one target forward over k + 1 tokens
        return self.verify_ms

    def drafting(self, k: int) -> float:  # k sequential draft steps
        return k * self.draft_ms

    def speculation(self, k: int) -> float:  # T_spec: the glue forward + k batched branch steps
        return (k + 1) * self.draft_ms * self.spec_factor

    def describe(self) -> str:
        return (f"cost model: verify {self.verify_ms} ms, draft step {self.draft_ms} ms, network {self.net_ms} ms, "
                f"batched branch step x{self.spec_factor}")


@dataclass
class TableCost:
    """Step times from a measured cost table at a batch of `batch` rows (module docstring)."""

    table: CostTable
    batch: int = 1
    branches: int = 8  # candidate outcomes ssd pre-drafts per round (ssd.default_fanout's budget)
    net_ms: float = 0.1

    def __post_init__(self):
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.branches < 1:
            raise ValueError(f"branches must be >= 1, got {self.branches}")
        if not self.net_ms >= 0:
            raise ValueError(f"net_ms must be >= 0, got {self.net_ms}")

    def require(self, modes: set[str], k_max: int) -> None:
        """Refuse a table that lacks what replaying `modes` with drafts up to `k_max` needs."""
        self.table.require("target", self.batch, k_max + 1)
        if modes & {"sd", "ssd", "ssd-nocache"} and k_max > 0:
            self.table.require("draft", self.batch, 1)
        if "ssd" in modes and k_max > 0:  # speculation: the glue forward and the branch steps
            self.table.require("draft", self.batch, k_max + 1)
            self.table.require("draft", self.batch * self.branches, 1)

    def verify(self, k: int) -> float:
        return self.table.forward_ms("target", self.batch, k + 1)

    def drafting(self, k: int) -> float:
        return k * self.table.forward_ms("draft", self.batch, 1) if k else 0.0

    def speculation(self, k: int) -> float:
        return (self.table.forward_ms("draft", self.batch, k + 1)
                + k * self.table.forward_ms("draft", self.batch * self.branches, 1))

    def describe(self) -> str:
        return (f"cost table: {self.table.device} {self.table.dtype}, batch {self.batch} "
                f"(aggregate tok/s = {self.batch} x per-sequence), {self.branches} branches, network {self.net_ms} ms")


def _round_ms(mode: str, k: int, hit: bool, c) -> float:
    if mode == "sd" or k == 0:
        return c.drafting(k) + c.verify(k)
    if hit:
        return max(c.verify(k), c.speculation(k)) + c.net_ms
    return c.verify(k) + c.drafting(k) + c.net_ms


def simulate(result: dict, cost: CostModel | TableCost) -> dict:
    """Predicted tokens/s per mode from a bench result's records (needs its per-round traces)."""
    recs = result.get("records", [])
    if not recs:
        raise ValueError("the results file has no records: write it with `specserve bench --out FILE`")
    if isinstance(cost, TableCost):
        ks = [k for r in recs for k in r.get("drafted_per_round", [])]
        try:
            cost.require({r["mode"] for r in recs}, max(ks, default=0))
        except ValueError as e:
            raise ValueError(f"the cost table lacks what this replay needs: {e}") from None
    out: dict[str, dict] = {}
    ar_tokens = sum(r["new_tokens"] for r in recs if r["mode"] == "ar")
    if ar_tokens:
        out["ar"] = {"tokens": ar_tokens, "ms": ar_tokens * cost.verify(0)}
    for mode in ("sd", "ssd", "ssd-nocache"):
        rs = [r for r in recs if r["mode"] == mode]
        if not rs:
            continue
        if any("drafted_per_round" not in r for r in rs):
            raise ValueError(f"the {mode} records have no per-round traces: re-run the bench with this version")
        kind = "sd" if mode == "sd" else "ssd"
        ms = sum(_round_ms(kind, k, bool(h), cost)
                 for r in rs for k, h in zip(r["drafted_per_round"], r["hit_per_round"]))
        rounds = sum(len(r["drafted_per_round"]) for r in rs)
        hits = sum(sum(r["hit_per_round"]) for r in rs)
        asked = rounds - sum(1 for r in rs if r["drafted_per_round"])  # a sequence's first round answers no outcome
        out[mode] = {"tokens": sum(r["new_tokens"] for r in rs), "ms": ms, "rounds": rounds,
                     "hit_rate": round(hits / asked, 4) if kind == "ssd" and asked else None}
    for d in out.values():
        d["tokens_per_s"] = round(d["tokens"] / d["ms"] * 1000, 2)
        if cost.batch > 1:
            d["aggregate_tokens_per_s"] = round(d["tokens_per_s"] * cost.batch, 2)
    if "ar" in out:
        for d in out.values():
            d["vs_ar"] = round(d["tokens_per_s"] / out["ar"]["tokens_per_s"], 3)
    return out


def format_simulation(sim: dict, cost: CostModel | TableCost) -> str:
    agg = cost.batch > 1
    rows = [cost.describe(), "",
            "| mode | predicted tok/s | vs ar | cache hit rate |" + (" aggregate tok/s |" if agg else ""),
            "|---|---|---|---|" + ("---|" if agg else "")]
    for m, d in sim.items():
        hr = f"{d['hit_rate']:.2f}" if d.get("hit_rate") is not None else "—"
        rows.append(f"| {m} | {d['tokens_per_s']:.1f} | {d.get('vs_ar', 1.0):.2f}x | {hr} |"
                    + (f" {d['aggregate_tokens_per_s']:.1f} |" if agg else ""))
    return "\n".join(rows)


def load(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"results file {path} does not exist: write one with `specserve bench --out FILE`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"results file {path} is not JSON ({e})") from None
