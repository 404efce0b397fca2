"""Who runs this round, and with how many drafts: queues, admission, aborts and the k policy.

`Scheduler` keeps a waiting queue (bounded: `add()` past `max_queue_len` raises `QueueFull`) and
the running set. `schedule()` is called once per round, between rounds: it applies pending
aborts, admits waiting sequences while slots are free, and picks the round's k. It holds no
tensors and never preempts: every slot is preallocated for max_model_len tokens, so a running
sequence can never run out of cache.

Prefill: no separate forward, and chunked. An admitted prompt goes through the SAME target
forward as the other rows' verification (in its last prefill round it even speculates: the draft
prefills it in its first draft step). Why: one forward per round keeps one host sync per round and
gives a short new row its first token after one round; the runner runs linears on flat tokens and
groups rows by length for attention, so the short rows pay no padding beside a long prompt;
measured on the 1.5B shape (docs/batching-forward.md), a 300-token prompt beside 8 rows verifying 5
costs 13.5 s in one forward vs 13.8 s as two. What one round may prefill is capped by
`max_prefill_tokens`: the rows still prefilling take the budget oldest first (a row's uncached
prompt tokens; a decoding row's one uncached token is not counted), and a prompt longer than its
share is fed in chunks over several rounds, in which that row drafts nothing and commits nothing
(`SchedulerOutput.feeds`). So a long prompt never stalls the running rows for more than one
chunk's forward. Waiting requests are admitted while the budget has room after the rows already
prefilling (so a row's prefill finishes before newer prompts take the budget).

The k policy: `KPolicy` picks one k per round for the rows that let the scheduler choose, from
the `CostModel` (forward seconds as a function of tokens, learnt online from the engine's timings
after a start-up probe) and each sequence's smoothed acceptance a: it maximises
  sum_rows E(a, k) / (k * draft_step(rows) + target(rows * (k + 1))),
  E(a, k) = (1 - a^(k+1)) / (1 - a) committed tokens per row per round,
and moves off the current k only for a gain above `hysteresis`. k = 0 is plain batched decoding
(no draft forward at all). A request's fixed k is exactly that (only its budget cuts it).
ssd rows get their k from the policy too, unless the request fixes it (`choose_ssd`, a k of its
own: their drafting is the draft worker's, hidden behind the verify on a cache hit, so only the
verify forward is priced; the drafter may propose fewer, its early stop). The policy also decides
what a speculation-cache miss costs (`ssd_miss_k`): the whole batch waits
while a missed row is drafted just in time, so past a batch size a miss is answered at once with
no drafts (KPlan.miss_k = 0) and only that row decodes plainly for a round.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .defaults import K, K_MAX, MAX_PREFILL_TOKENS
from .sequence import Sequence

__all__ = ["QueueFull", "LinearCost", "MeasuredCost", "CostModel", "KPolicy", "expected_tokens", "ssd_miss_k", "prefill_feeds",
           "Scheduler", "SchedulerOutput"]


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue_len (servers map this to RESOURCE_EXHAUSTED)."""


def expected_tokens(a: float, k: int) -> float:
    """Committed tokens per round with k drafts at per-draft acceptance a."""
    a = min(max(a, 0.0), 1.0)
    return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


class LinearCost:
    """seconds(tokens) = c0 + c1 * tokens, an exponentially weighted least-squares fit.

    A forward over N flat tokens costs a fixed part (reading the weights: memory-bound) plus a
    part per token (compute); the 1.5B measurements fit this within ~10%. The prior enters as two
    pseudo-observations (at 1 and `span` tokens) of weight `prior_weight` that do not decay.
    """

    def __init__(self, c0: float, c1: float, span: int = 40, prior_weight: float = 0.2, decay: float = 0.97):
        self.decay = decay
        self._prior = [(1.0, c0 + c1, prior_weight), (float(span), c0 + c1 * span, prior_weight)]
        self._s = [0.0] * 5  # decayed sums of w, w*x, w*y, w*x*x, w*x*y

    def observe(self, tokens: int, seconds: float) -> None:
        x, y, d = float(tokens), float(seconds), self.decay
        self._s = [d * s for s in self._s]
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            self._s[i] += v

    def coefficients(self) -> tuple[float, float]:
        w, sx, sy, sxx, sxy = self._s
        for x, y, pw in self._prior:
            w, sx, sy, sxx, sxy = w + pw, sx + pw * x, sy + pw * y, sxx + pw * x * x, sxy + pw * x * y
        var = sxx - sx * sx / w
        c1 = max((sxy - sx * sy / w) / var, 0.0) if var > 1e-12 else 0.0
        c0 = max((sy - c1 * sx) / w, 0.0)
        return c0, c1

    def predict(self, tokens: int) -> float:
        c0, c1 = self.coefficients()
        return c0 + c1 * tokens


class MeasuredCost:
    """seconds(tokens) from measured points: an EMA per token count, piecewise-linear in between.

    Unlike one straight line this keeps the flat, memory-bound start (on the 1.5B fp32 shape 1, 3
    and 5 tokens cost 458 / 447 / 519 ms, then ~40 ms per token): a line through all points
    misprices one-token steps by ~20%, and so the k = 0 vs k > 0 choice. Past the last point it
    extends the last segment's slope; below the first it is flat. With fewer than one point it
    falls back to `prior` (a LinearCost).
    """

    def __init__(self, prior: LinearCost, decay: float = 0.8, spike: float = 1.5):
        self.prior, self.decay, self.spike = prior, decay, spike
        self.points: dict[int, float] = {}  # tokens -> smoothed seconds

    def set_point(self, tokens: int, seconds: float) -> None:
        """A deliberate measurement (the start-up probe): taken as is."""
        self.points[tokens] = seconds
        self.prior.observe(tokens, seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        """A round's timing: moves its point (a new one starts at the curve) by an EMA step.

        An observation counts at most `spike` times the point: a round stalled by another process
        (seen here: 2.7 s beside 0.2 s rounds while tests ran) moves the point by one bounded step,
        not for the next dozen rounds, while a real change still moves it within a few rounds."""
        old = self.points.get(tokens, self.predict(tokens) if self.points else seconds)
        seconds = min(seconds, self.spike * old) if old > 0 else seconds
        self.points[tokens] = self.decay * old + (1 - self.decay) * seconds
        self.prior.observe(tokens, seconds)

    def predict(self, tokens: int) -> float:
        xs = sorted(self.points)
        if not xs:
            return self.prior.predict(tokens)
        if tokens <= xs[0] or len(xs) == 1:
            return self.points[xs[0]] if tokens <= xs[0] else self.points[xs[0]] + self.prior.coefficients()[1] * (
                tokens - xs[0])
        i = next((j for j, x in enumerate(xs) if x >= tokens), len(xs) - 1)
        x0, x1 = xs[i - 1], xs[i]
        y0, y1 = self.points[x0], self.points[x1]
        slope = (y1 - y0) / (x1 - x0)
        if tokens > x1:  # past the last point: never cheaper than it
            return y1 + max(slope, 0.0) * (tokens - x1)
        return y0 + slope * (tokens - x0)


@dataclass
class CostModel:
    """Seconds of one target forward over N tokens, and of one draft step over N tokens."""

    target: LinearCost | MeasuredCost
    draft: LinearCost | MeasuredCost | None = None

    def round_seconds(self, kd: list[int]) -> float:
        """One round where row i drafts kd[i] tokens (0 = no drafting) and verifies kd[i] + 1."""
        t = self.target.predict(sum(k + 1 for k in kd))
        if self.draft is not None:
            for j in range(1, max(kd, default=0) + 1):
                t += self.draft.predict(sum(1 for k in kd if k >= j))
        return t


@dataclass
class KPolicy:
    """Pick the round's k for the rows that let the scheduler choose (see the module docstring)."""

    cost: CostModel
    k_max: int = K_MAX
    hysteresis: float = 0.05
    k: int = 0  # the current k, kept between rounds
    k_ssd: int = K  # the ssd rows' current k (their drafting is hidden: see choose_ssd)

    def rate(self, k: int, rows: list[tuple[float, int | None]]) -> float:
        """Expected committed tokens per second; rows = (acceptance, fixed k or None)."""
        kd = [k if fixed is None else fixed for _, fixed in rows]
        tokens = sum(expected_tokens(a, kk) for (a, _), kk in zip(rows, kd))
        return tokens / max(self.cost.round_seconds(kd), 1e-9)

    def choose_ssd(self, rows: list[tuple[float, int | None]], other_tokens: int, other_expected: float) -> int:
        """The k of the next proposal of the ssd rows that let the scheduler choose (`k_ssd`, kept
        between rounds, with hysteresis). Their drafting is the draft worker's and hidden behind the
        verify (a miss's wait is `ssd_miss_k`'s to price), so only the verify is priced: E(a, k) per
        row over the target forward of every row's tokens (other_tokens: the other rows'; other_expected:
        their expected commits). k = 0 turns an ssd row's speculation off for a round."""
        if not any(fixed is None for _, fixed in rows):
            return self.k_ssd

        def rate(k: int) -> float:
            kd = [k if fixed is None else fixed for _, fixed in rows]
            tokens = other_expected + sum(expected_tokens(a, kk) for (a, _), kk in zip(rows, kd))
            return tokens / max(self.cost.target.predict(other_tokens + sum(kk + 1 for kk in kd)), 1e-9)

        rates = [rate(k) for k in range(self.k_max + 1)]
        best = max(range(len(rates)), key=rates.__getitem__)
        cur = min(self.k_ssd, self.k_max)
        if rates[best] > rates[cur] * (1.0 + self.hysteresis):
            self.k_ssd = best
        return self.k_ssd

    def choose(self, rows: list[tuple[float, int | None]]) -> int:
        if self.cost.draft is None or not any(fixed is None for _, fixed in rows):
            return self.k  # nothing to choose this round; keep the state
        rates = [self.rate(k, rows) for k in range(self.k_max + 1)]
        best = max(range(len(rates)), key=rates.__getitem__)
        cur = min(self.k, self.k_max)
        if rates[best] > rates[cur] * (1.0 + self.hysteresis):
            self.k = best
        return self.k


def ssd_miss_k(cost: CostModel, base_tokens: int, others: list[float],
               ssd: list[tuple[float, int, float]]) -> int | None:
    """The most drafts a missed ssd row drafts just in time (KPlan.miss_k); None: no draft cost known.

    base_tokens: the verify forward's tokens (this round's, the guess for the next); others: the
    expected tokens of the rows that are not ssd; ssd: (acceptance a, k, hit rate h) per ssd row.
    A miss drafted to m tokens makes the whole batch wait m draft steps over the missed rows (while
    any row misses: probability 1 - prod h), and gains only that row's E(a, m) - 1 tokens; m = 0
    answers it at once and the row decodes plainly this round. The m in 0..k with the most expected
    tokens per second wins, ties to the larger (at batch 1 a miss's draft usually pays; at large
    batches it rarely does)."""
    if cost.draft is None or not ssd:
        return None
    p_any, misses = 1.0, 0.0
    for _, _, h in ssd:
        p_any *= h
        misses += 1 - h
    p_any = 1 - p_any
    rows_missed = max(1, round(misses / p_any)) if p_any > 0 else 1
    t_base, t_step = cost.target.predict(base_tokens), cost.draft.predict(rows_missed)
    fixed = sum(others) + sum(h * expected_tokens(a, k) for a, k, h in ssd)
    best, best_rate = None, -1.0
    for m in range(max(k for _, k, _ in ssd), -1, -1):  # from the largest: ties keep it
        tokens = fixed + sum((1 - h) * expected_tokens(a, min(m, k)) for a, k, h in ssd)
        rate = tokens / max(t_base + p_any * m * t_step, 1e-9)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = m, rate
    return best


def prefill_feeds(uncached: list[int], budget: int) -> list[int]:
    """The uncached tokens each row feeds this round: all of them for a decoding row (one), and for
    rows still prefilling (more than one) the round's `budget` shared in row order (oldest first):
    a row gets min(its uncached, what is left), at least one token."""
    out = []
    for u in uncached:
        if u > 1:
            f = max(1, min(u, budget))
            budget -= f
            out.append(f)
        else:
            out.append(u)
    return out


@dataclass
class SchedulerOutput:
    """One round's plan (plain data; the engine applies it to the caches)."""

    prefill: list[Sequence] = field(default_factory=list)  # admitted now: need a slot, prompt uncached
    running: list[Sequence] = field(default_factory=list)  # every row of this round (prefill included)
    k: int = 0  # the round's k for rows without a fixed k
    draft_lens: list[int] = field(default_factory=list)  # per running row: its drafts this round
    feeds: list[int] = field(default_factory=list)  # per running row: uncached tokens it feeds (< uncached: a chunk)
    aborted: list[Sequence] = field(default_factory=list)  # were running: free their slots
    preempted: list[Sequence] = field(default_factory=list)  # always empty: caches are preallocated


class Scheduler:
    def __init__(self, max_num_seqs: int, max_queue_len: int, policy: KPolicy, speculate: bool,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS):
        if max_queue_len < 0:
            raise ValueError(f"max_queue_len must be >= 0, got {max_queue_len}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 (prompt tokens prefilled per round), got {max_prefill_tokens}")
        self.max_num_seqs, self.max_queue_len = max_num_seqs, max_queue_len
        self.policy, self.speculate, self.max_prefill_tokens = policy, speculate, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._abort: set[str] = set()
        self.aborted_waiting: list[Sequence] = []  # aborted before they ran (no slot to free)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue_len:
            raise QueueFull(f"queue full: {len(self.waiting)} requests waiting (max_queue_len); "
                            "retry later or raise max_queue_len")
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> None:
        """Takes effect at the next round boundary (the next `schedule()`)."""
        self._abort.add(seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._abort)

    def schedule(self, free_slots: int) -> SchedulerOutput:
        out = SchedulerOutput()
        if self._abort:
            for s in [s for s in self.waiting if s.id in self._abort]:
                self.waiting.remove(s)
                s.finish("abort")
                self.aborted_waiting.append(s)
            for s in [s for s in self.running if s.id in self._abort]:
                self.running.remove(s)
                s.finish("abort")
                out.aborted.append(s)
                free_slots += 1
            self._abort.clear()
        budget = self.max_prefill_tokens - sum(s.uncached for s in self.running if s.uncached > 1)
        while self.waiting and free_slots > 0 and len(self.running) < self.max_num_seqs and budget > 0:
            s = self.waiting.popleft()
            budget -= s.uncached  # the prompt and any resumed output (a parked prefix may spare some)
            free_slots -= 1
            self.running.append(s)
            out.prefill.append(s)
        out.running, out.feeds = list(self.running), prefill_feeds([s.uncached for s in self.running],
                                                                   self.max_prefill_tokens)
        whole = [f == s.uncached for s, f in zip(out.running, out.feeds)]  # False: a prefill chunk, no drafts
        rows = [(s.acceptance, s.spec.k) for s, w in zip(out.running, whole) if w and self.speculate and s.speculates]
        out.k = self.policy.choose(rows) if rows else self.policy.k
        out.draft_lens = [s.draft_len(out.k) if w and (self.speculate or s.external) else 0
                          for s, w in zip(out.running, whole)]
        return out

    def update_from_output(self, rows: list[Sequence], accepted: list[int], drafted: list[int]) -> list[Sequence]:
        """After the round: acceptance EMAs; drop finished rows; return them (their slots are to free)."""
        for s, n, k in zip(rows, accepted, drafted):
            s.observe_acceptance(n, k)
        done = [s for s in rows if s.finish_reason]
        self.running = [s for s in self.running if not s.finish_reason]
        return done
