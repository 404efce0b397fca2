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

This module reads JSON and does arithmetic; it knows nothing of models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CostModel", "simulate", "format_simulation"]


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


def _round_ms(mode: str, k: int, hit: bool, c: CostModel) -> float:
    if mode == "sd" or k == 0:
        return k * c.draft_ms + c.verify_ms
    t_spec = (k + 1) * c.draft_ms * c.spec_factor
    if hit:
        return max(c.verify_ms, t_spec) + c.net_ms
    return c.verify_ms + k * c.draft_ms + c.net_ms


def simulate(result: dict, cost: CostModel) -> dict:
    """Predicted tokens/s per mode from a bench result's records (needs its per-round traces)."""
    recs = result.get("records", [])
    if not recs:
        raise ValueError("the results file has no records: write it with `specserve bench --out FILE`")
    out: dict[str, dict] = {}
    ar_tokens = sum(r["new_tokens"] for r in recs if r["mode"] == "ar")
    if ar_tokens:
        out["ar"] = {"tokens": ar_tokens, "ms": ar_tokens * cost.verify_ms}
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
        out[mode] = {"tokens": sum(r["new_tokens"] for r in rs), "ms": ms, "rounds": rounds,
                     "hit_rate": round(hits / rounds, 4) if kind == "ssd" and rounds else None}
    for d in out.values():
        d["tokens_per_s"] = round(d["tokens"] / d["ms"] * 1000, 2)
    if "ar" in out:
        for d in out.values():
            d["vs_ar"] = round(d["tokens_per_s"] / out["ar"]["tokens_per_s"], 3)
    return out


def format_simulation(sim: dict, cost: CostModel) -> str:
    rows = [f"cost model: verify {cost.verify_ms} ms, draft step {cost.draft_ms} ms, network {cost.net_ms} ms, "
            f"batched branch step x{cost.spec_factor}", "",
            "| mode | predicted tok/s | vs ar | cache hit rate |", "|---|---|---|---|"]
    for m, d in sim.items():
        hr = f"{d['hit_rate']:.2f}" if d.get("hit_rate") is not None else "—"
        rows.append(f"| {m} | {d['tokens_per_s']:.1f} | {d.get('vs_ar', 1.0):.2f}x | {hr} |")
    return "\n".join(rows)


def load(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"results file {path} does not exist: write one with `specserve bench --out FILE`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"results file {path} is not JSON ({e})") from None
