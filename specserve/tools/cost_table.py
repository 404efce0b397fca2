"""The cost table: measured forward times of a target and a draft, by rows x new tokens per row.

One JSON file, written by `python -m specserve.tools.gpu_check` (scripts/gpu_check.sh) and read by
`specserve simulate --costs FILE`:

    {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
     "target": {"1x1": 7.9, "1x5": 8.3, "8x1": 8.1, ...},   # "ROWSxTOKENS": median ms of one forward
     "draft":  {"1x1": 4.2, ...},
     "meta":   {...}}                                       # free-form: shapes, cache, reps, torch

"ROWSxTOKENS" is one `NativeRunner.forward` over ROWS rows of TOKENS new tokens each (every row
keeping TOKENS logits) on a cache already holding a context. Each table is a full grid: every
listed rows count with every listed tokens count; `draft` may be empty (an ar-only table).

Interpolation (`forward_ms`): linear in tokens per row between the measured tokens counts (past
the largest, the last segment's line goes on: a forward's cost grows about linearly in its
tokens, docs/batching-forward.md; below the smallest, the smallest's value), then linear in rows
between the two measured rows counts around the asked one. Rows outside the measured range are
refused, not extrapolated: the batch knee (where more rows stop being free) is what the table is
for. Every error names the field and the fix.

This module reads and writes JSON and interpolates; it knows nothing of models.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["CostTable", "MODELS", "key"]

MODELS = ("target", "draft")
FIX = "re-measure with scripts/gpu_check.sh (python -m specserve.tools.gpu_check --out FILE)"


def key(rows: int, tokens: int) -> str:
    return f"{rows}x{tokens}"


def _parse_key(model: str, k: str) -> tuple[int, int]:
    parts = k.split("x") if isinstance(k, str) else []
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{model}[{k!r}]: keys are 'ROWSxTOKENS' with both >= 1, e.g. '8x5': rename it")
    return int(parts[0]), int(parts[1])


@dataclass
class CostTable:
    device: str
    dtype: str
    target: dict[str, float]
    draft: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("device", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string (what was measured): set it")
        if not isinstance(self.meta, dict):
            raise ValueError("meta must be an object (free-form notes): make it {} or remove it")
        self._grid: dict[str, tuple[list[int], list[int], dict[tuple[int, int], float]]] = {}
        for model in MODELS:
            table = getattr(self, model)
            if not isinstance(table, dict):
                raise ValueError(f"{model} must be an object of 'ROWSxTOKENS': ms: {FIX}")
            if model == "target" and not table:
                raise ValueError(f"target is empty: a table needs the target's forwards: {FIX}")
            points = {}
            for k, ms in table.items():
                if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0:
                    raise ValueError(f"{model}[{k!r}] must be a number of milliseconds > 0, got {ms!r}: "
                                     f"fix it or {FIX}")
                points[_parse_key(model, k)] = float(ms)
            rows = sorted({r for r, _ in points})
            tokens = sorted({t for _, t in points})
            for r in rows:
                for t in tokens:
                    if (r, t) not in points:
                        raise ValueError(f"{model}[{key(r, t)!r}] is missing: a table is a full rows x tokens grid "
                                         f"(rows {rows}, tokens {tokens}): add it or {FIX}")
            self._grid[model] = (rows, tokens, points)

    # ---- files --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "CostTable":
        if not isinstance(data, dict):
            raise ValueError(f"a cost table is a JSON object with device, dtype, target, draft: {FIX}")
        missing = [f for f in ("device", "dtype", "target") if f not in data]
        if missing:
            raise ValueError(f"{missing[0]} is missing from the cost table: {FIX}")
        unknown = sorted(set(data) - {"device", "dtype", "target", "draft", "meta"})
        if unknown:
            raise ValueError(f"{unknown[0]} is not a cost table field (device, dtype, target, draft, meta): remove it")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"cost table {path} does not exist: {FIX}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"cost table {path} is not JSON ({e}): {FIX}") from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"cost table {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    # ---- lookups ------------------------------------------------------------------------------
    def require(self, model: str, rows: int, tokens: int = 1) -> None:
        """Refuse (ValueError naming the field) unless `forward_ms(model, rows, t)` is defined for t <= tokens."""
        if model not in self._grid or not self._grid[model][2]:
            raise ValueError(f"{model} is empty in the cost table but this replay needs its forwards: {FIX}")
        rs, ts, _ = self._grid[model]
        if not rs[0] <= rows <= rs[-1]:
            raise ValueError(f"{model} rows: this replay needs {rows} rows but the table measured {rs[0]}..{rs[-1]} "
                             f"(rows are not extrapolated): measure {rows} rows (--rows) or lower --batch")
        if tokens > ts[-1] and len(ts) < 2:
            raise ValueError(f"{model} tokens: this replay needs up to {tokens} tokens per row but the table measured "
                             f"only {ts[0]}: measure two tokens counts or more (--tokens)")

    def forward_ms(self, model: str, rows: int, tokens: int) -> float:
        """One forward of `rows` rows x `tokens` new tokens, interpolated (module docstring)."""
        self.require(model, rows, tokens)
        rs, ts, pts = self._grid[model]
        lo, hi, w = _bracket(rs, rows)
        return (1 - w) * _along_tokens(ts, pts, lo, tokens) + w * _along_tokens(ts, pts, hi, tokens)


def _bracket(xs: list[int], x: int) -> tuple[int, int, float]:
    """(lower point, upper point, weight of the upper) for x within [xs[0], xs[-1]]."""
    i = bisect_left(xs, x)
    if xs[i] == x:
        return x, x, 0.0
    lo, hi = xs[i - 1], xs[i]
    return lo, hi, (x - lo) / (hi - lo)


def _along_tokens(ts: list[int], pts: dict, rows: int, tokens: int) -> float:
    if tokens <= ts[0] or len(ts) == 1:
        return pts[(rows, ts[0])]
    if tokens >= ts[-1]:
        a, b = ts[-2], ts[-1]  # extend the last segment's line
    else:
        i = bisect_left(ts, tokens)
        a, b = ts[i - 1], ts[i]
    ya, yb = pts[(rows, a)], pts[(rows, b)]
    return ya + (yb - ya) * (tokens - a) / (b - a)
