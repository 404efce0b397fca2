"""The vocabulary of speculation, shared by the engine and the drafters: no loop lives here.

  SpecConfig    how one generation speculates (mode, a fixed k or the policy's, the policy's bounds)
  KPlan         the k a drafter drafts one proposal to (the target's engine owns k)
  Stats         the counters of one generation, filled in while it streams
  Chunk         the tokens one round commits, and their text
  Drafter       what the engine asks of a drafter that is not its own draft model (ssd: a remote
                worker); DraftUnavailable when it cannot go on (the row finishes as ar, exact)

The loop itself is the batching engine (engine.py); `single.generate()` runs one request through it.
This module does not know about models, caches, processes or networks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from . import defaults

__all__ = ["SpecConfig", "KPlan", "Stats", "Chunk", "Drafter", "DraftUnavailable", "MODES"]

MODES = ("ar", "sd", "ssd")


@dataclass
class SpecConfig:
    """How one generation speculates.

    k is the most drafts a round drafts: with k fixed, k every round (only the budget and the early
    stop cut it); None lets the engine's policy choose k every round, within [0, k_max], from
    measured costs and acceptance (k = 0 is a plain decode round), starting at k_init.
    `stop_prob` is the early stop: a draft ends after a token the draft itself gives less than this
    probability (0 = always draft k), in sd rows on the CPU (`Engine.stop_prob`) and in an ssd
    draft worker.
    """

    mode: str = "sd"
    k: int | None = None
    k_init: int = defaults.K
    k_max: int = defaults.K_MAX
    stop_prob: float = defaults.STOP_PROB

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.k is not None and not 1 <= self.k <= 64:
            raise ValueError(f"k (draft length) must be between 1 and 64, got {self.k}")
        if not 0 <= self.k_init <= self.k_max <= 64 or self.k_max < 1:
            raise ValueError(f"need 0 <= k_init <= k_max <= 64 and k_max >= 1, got k_init {self.k_init}, "
                             f"k_max {self.k_max}")
        if not 0 <= self.stop_prob < 1:
            raise ValueError(f"stop_prob must be in [0, 1), got {self.stop_prob}")


@dataclass(frozen=True)
class KPlan:
    """The loop's k for one proposal: it owns k, and a drafter drafts exactly this (docs/architecture.md, SSD).

    k: the most drafts the proposal may hold: a drafter gives exactly k, fewer only after a token it
      doubts (`stop_prob`) or at the end of its budget; 0 = no drafts this round.
    if_accepted / if_rejected: the k the loop will ask for in the round after this one, when every
      draft of this proposal is accepted / when one is rejected (before the budget cuts it). A drafter
      that pre-drafts the round after (SSD) drafts its branches to these lengths, so a cut proposal
      is never mistaken for a rejection.
    miss_k: the most drafts when the proposal must be drafted after the outcome arrives (SSD: a
      speculation-cache miss, or a late hit drawn on; the tokens a branch already has are kept),
      None = k. 0 makes a miss answer at once with no drafts: that row's round is plain decoding,
      and the batch does not wait for a just-in-time draft.
    """

    k: int
    if_accepted: int
    if_rejected: int
    miss_k: int | None = None

    def __post_init__(self):
        for name in ("k", "if_accepted", "if_rejected", "miss_k"):
            v = getattr(self, name)
            if name == "miss_k" and v is None:
                continue
            if not (isinstance(v, int) and 0 <= v <= 64):
                raise ValueError(f"KPlan.{name} must be an int in [0, 64], got {v!r}")

    def jit(self, n: int) -> int:
        """The drafts of a proposal of n that is drafted just in time (a miss): n, or miss_k if less."""
        return n if self.miss_k is None else min(n, self.miss_k)

    def after(self, full: bool) -> int:
        """The k of the round after, by how this proposal ends (full = every draft accepted)."""
        return self.if_accepted if full else self.if_rejected


@dataclass
class Stats:
    """Counters of one generation; filled in while it streams."""

    new_tokens: int = 0
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prompt_tokens: int = 0
    prefix_reused: int = 0  # prompt tokens already in the target cache passed in (no prefill for them)
    elapsed_s: float = 0.0
    ttft_s: float = 0.0
    draft_wait_s: float = 0.0  # time the target waited for proposals (in-process: drafting itself)
    verify_s: float = 0.0
    cache_hits: int = 0  # ssd: proposals served from the draft's speculation cache
    cache_misses: int = 0
    late_hits: int = 0  # ssd: hits whose branch the draft was still drafting when the outcome arrived
    hit_wait_s: float = 0.0  # ssd: the target's wait for proposals that were cache hits (the answer latency)
    miss_wait_s: float = 0.0  # ssd: ... for proposals drafted just-in-time
    fallback: str = ""  # why the drafter was dropped mid-sequence (the rest ran as ar), if it was
    finish_reason: str = ""
    accepted_per_round: list[int] = field(default_factory=list)
    drafted_per_round: list[int] = field(default_factory=list)
    hit_per_round: list[int] = field(default_factory=list)  # ssd: 1 if this round's proposal came from the cache

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def drafts(self) -> int:
        """Rounds that verified a non-empty draft (k = 0 rounds are plain decode steps)."""
        return sum(1 for k in self.drafted_per_round if k)

    @property
    def accepted_per_pos(self) -> list[int]:
        """[i]: rounds whose draft token at position i (0-based) was accepted; sums to accepted_tokens.

        Computed from the per-round trace when asked (once, at the end), not in the round.
        """
        counts = [0] * (max(self.accepted_per_round, default=0) + 1)
        for n in self.accepted_per_round:
            counts[n] += 1
        out, ge = [], 0  # rounds that accepted at least i + 1 drafts, from the last position down
        for c in reversed(counts[1:]):
            ge += c
            out.append(ge)
        return out[::-1]

    @property
    def cache_hit_rate(self) -> float:
        n = self.cache_hits + self.cache_misses
        return self.cache_hits / n if n else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self, trace: bool = False) -> dict:
        d = asdict(self)
        if not trace:
            for key in ("accepted_per_round", "drafted_per_round", "hit_per_round"):
                d.pop(key)
        d["acceptance_rate"] = round(self.acceptance_rate, 4)
        d["drafts"], d["accepted_per_pos"] = self.drafts, self.accepted_per_pos
        d["tokens_per_s"] = round(self.tokens_per_s, 3)
        d["cache_hit_rate"] = round(self.cache_hit_rate, 4)
        for key in ("elapsed_s", "ttft_s", "draft_wait_s", "verify_s", "hit_wait_s", "miss_wait_s"):
            d[key] = round(d[key], 4)
        return d


@dataclass
class Chunk:
    """Tokens committed by one round, and the text they add (empty without a tokenizer)."""

    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None  # set on the last chunk: eos | length | stop


class DraftUnavailable(RuntimeError):
    """The drafter cannot go on (a remote worker died, stalled or refused); decoding continues alone."""


class Drafter:
    """What the loop asks of a drafter, once per round: `propose`, then `on_outcome`.

    propose(seq, plan) -> (d, q): at most plan.k draft tokens after the committed tokens `seq`, and
      the distributions they were sampled from (q [len(d), V], None = point masses / greedy).
    on_outcome(accepted, token, committed, plan): the round's outcome; `committed` = len(seq) +
      accepted, the prefix that stays valid in any cache; `plan` the next proposal's KPlan (a
      remote drafter asks for that proposal now).
    """

    hits = 0
    misses = 0
    late_hits = 0  # hits whose proposal was still being drafted when the outcome arrived
    last_hit = False  # whether the proposal of the current round came from a speculation cache
    waiting_start = False  # no proposal asked for yet (a remote drafter not started): nothing to tell

    def propose(self, seq: list[int], plan: KPlan) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError

    def on_outcome(self, accepted: int, token: int, committed: int, plan: KPlan) -> None:
        pass

    def close(self) -> None:
        pass

    # Many sequences' drafters at once (the batching engine, once a round). A drafter class that can
    # serve several of its drafters in one exchange (RemoteDrafter: one message on their shared
    # stream) overrides these; the defaults take the drafters one by one.
    @staticmethod
    def start_all(items: list[tuple["Drafter", list[int], KPlan]]) -> None:
        """Ask for the first proposals of (drafter, seq, plan) now, so `propose` has them ready."""

    @staticmethod
    def outcome_all(items: list[tuple["Drafter", int, int, int, KPlan]]) -> list[Exception | None]:
        """`on_outcome(accepted, token, committed, plan)` of each (drafter, ...); per item None or the
        DraftUnavailable it raised."""
        out: list[Exception | None] = []
        for d, accepted, token, committed, plan in items:
            try:
                d.on_outcome(accepted, token, committed, plan)
                out.append(None)
            except DraftUnavailable as e:
                out.append(e)
        return out
