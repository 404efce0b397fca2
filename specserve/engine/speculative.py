"""Speculative decoding (SD) and the plain autoregressive baseline (AR), as one loop.

A round, with k draft tokens:
  1. draft   -- the draft model proposes d_1..d_k, sampling each from its warped q_i.
  2. verify  -- ONE target forward over [last committed token, d_1..d_k] gives p_1..p_{k+1}.
  3. accept  -- rejection sampling keeps n drafts and adds a recovered or bonus token t*.
  4. crop    -- the target's KV cache rolls back to the committed prefix (rejected drafts vanish).
  5. emit    -- the n + 1 new tokens go out as one chunk (cut at EOS, stop string, budget), and
               the drafter hears the outcome (it crops its own cache, or a remote SSD worker
               answers with the next proposal, often from its speculation cache).
AR is the same loop with k = 0: step 2 alone is one decode step, step 3 samples from p_1.

The output is exactly what the target alone produces: token-identical when greedy, the same
distribution when sampling. The draft only changes how many tokens a round yields.

This module does not know about processes, networks or sessions: it takes loaded models and
token ids, and yields chunks.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from . import defaults
from .lm import LM, KVCache, check_pair
from .sampling import SamplingParams, rejection_sample, resume_seed, sample, warp
from .text import TextStream

__all__ = ["SpecConfig", "KPlan", "Stats", "Chunk", "generate", "draft_step", "Drafter", "LocalDrafter",
           "DraftUnavailable", "MODES"]

MODES = ("ar", "sd", "ssd")


@dataclass
class SpecConfig:
    """How to speculate. k fixes the draft length; k=None adapts it within [k_min, k_max].

    With `stop_prob` > 0 a round drafts fewer than k tokens when the draft doubts its own guess
    (HF's assisted generation has the same idea); 0 always drafts k. Neither changes the output.
    """

    mode: str = "sd"
    k: int | None = None
    k_init: int = defaults.K
    k_min: int = defaults.K_MIN
    k_max: int = defaults.K_MAX
    stop_prob: float = defaults.STOP_PROB  # stop drafting after a token the draft gives less than this

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.k is not None and not 1 <= self.k <= 64:
            raise ValueError(f"k (draft length) must be between 1 and 64, got {self.k}")
        if not 1 <= self.k_min <= self.k_init <= self.k_max <= 64:
            raise ValueError(
                f"need 1 <= k_min <= k_init <= k_max <= 64, got {self.k_min}, {self.k_init}, {self.k_max}")
        if not 0 <= self.stop_prob < 1:
            raise ValueError(f"stop_prob must be in [0, 1), got {self.stop_prob}")

    def next_k(self, k: int, full: bool) -> int:
        """The k after a round drafted with k: fixed k stays; adaptive grows after a full accept, else shrinks."""
        if self.k is not None:
            return self.k
        return min(k + 1, self.k_max) if full else max(k - 1, self.k_min)

    def plan(self, k: int, kr: int) -> "KPlan":
        """The loop's k for a proposal of at most kr drafts (k before the budget cut it), and the round after's."""
        return KPlan(kr, self.next_k(k, True), self.next_k(k, False))


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


def draft_step(cache: KVCache, seq: list[int], k: int, sp: SamplingParams,
               gen: torch.Generator, stop_prob: float) -> tuple[list[int], torch.Tensor | None]:
    """Sample up to k draft tokens after `seq`; return (ids, q [len(ids), V] or None when greedy).

    Drafting stops early after a token whose draft probability (of the softmax at temperature 1
    when greedy) is below `stop_prob`: a guess the draft itself doubts is rarely accepted, and the
    tokens after it even less. The cache ends holding seq + d_1..d_{n-1} (d_n is never fed).
    """
    logits = cache.forward(seq[cache.length:], keep=1)[-1]  # [V]
    ids, qs = [], []
    for i in range(k):
        q = warp(logits, sp.temperature, sp.top_k, sp.top_p)  # [V]
        ids.append(sample(q, gen))
        if not sp.greedy:
            qs.append(q)
        if stop_prob > 0:
            conf = q[ids[-1]] if not sp.greedy else torch.softmax(logits, -1)[ids[-1]]
            if conf < stop_prob:
                break
        if i < k - 1:
            logits = cache.forward([ids[-1]])[-1]
    return ids, (torch.stack(qs) if qs else None)


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


class LocalDrafter(Drafter):
    """A draft LM in this process, drafting on demand (plain SD)."""

    def __init__(self, lm: LM, sp: SamplingParams, gen: torch.Generator, stop_prob: float):
        self.cache, self.sp, self.gen, self.stop_prob = lm.new_cache(), sp, gen, stop_prob

    def propose(self, seq, plan):
        return draft_step(self.cache, seq, plan.k, self.sp, self.gen, self.stop_prob)

    def on_outcome(self, accepted, token, committed, plan):
        if self.cache.length > committed:
            self.cache.crop(committed)


def generate(
    target: LM,
    draft: LM | Drafter | None,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    spec: SpecConfig | None = None,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
    stats: Stats | None = None,
    target_cache: KVCache | None = None,
    resume_ids: list[int] | tuple[int, ...] = (),
    resume_text: str = "",
) -> Iterator[Chunk]:
    """Stream the target's continuation of `prompt_ids`, one Chunk per round.

    `draft` is a draft LM (drafted in this process), any `Drafter` (e.g. a remote SSD worker),
    or None for mode "ar". If the drafter raises DraftUnavailable the sequence finishes as "ar"
    (still exact) and `stats.fallback` says why. Pass `stats` to read the counters while or after
    streaming. `target_cache` (e.g. a chat session's) must hold a strict prefix of `prompt_ids`
    (the caller crops it); the loop prefills only the rest and leaves the cache holding a prefix of
    prompt + output. `resume_ids` continue a generation begun elsewhere: output tokens committed
    already (with `resume_text`, the text released for them); they count in `max_new_tokens`, the
    stop strings and `stats.new_tokens`, and the draws come from `resume_seed(seed, len(resume_ids))`.
    """
    sp = sampling or SamplingParams()
    spec = spec or SpecConfig()
    st = stats if stats is not None else Stats()
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token of prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) >= target.max_len:
        raise ValueError(f"prompt is {len(prompt_ids)} tokens but the target's context window is "
                         f"{target.max_len}: shorten the prompt")
    resume = [int(t) for t in resume_ids]
    bad = [t for t in prompt_ids + resume if not 0 <= t < target.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {target.vocab_size}), got {bad[:5]}")
    if spec.mode != "ar" and draft is None:
        raise ValueError(f"mode {spec.mode!r} needs a draft model: pass --draft, or use mode 'ar'")
    if isinstance(draft, LM):
        check_pair(target, draft)

    budget = min(max_new_tokens, target.max_len - len(prompt_ids))
    if len(resume) >= budget:
        raise ValueError(f"resume_ids hold {len(resume)} tokens, the whole budget of {budget}: nothing is left "
                         "to generate")
    seed = resume_seed(seed, len(resume)) if seed is not None else int.from_bytes(os.urandom(6), "little")
    gen = torch.Generator().manual_seed(seed)
    drafter: Drafter | None = None
    if spec.mode != "ar":
        drafter = LocalDrafter(draft, sp, gen, spec.stop_prob) if isinstance(draft, LM) else draft
    text = TextStream(target.tokenizer, stop)
    if resume:
        text.resume(resume, resume_text)
    eos = target.eos_ids
    seq = prompt_ids + resume  # committed tokens; the caches hold a prefix of them
    tc = target_cache if target_cache is not None else target.new_cache()
    if tc.length >= len(seq):
        raise ValueError(f"target_cache holds {tc.length} tokens but must hold fewer than the prompt's "
                         f"{len(seq)}: crop it to a strict prefix")
    st.prefix_reused = tc.length
    k = (spec.k or spec.k_init) if drafter else 0  # the loop owns k: every proposal is asked for with its KPlan
    st.prompt_tokens, st.new_tokens = len(prompt_ids), len(resume)
    t_start = time.perf_counter()
    try:
        while st.new_tokens < budget:
            kr = min(k, budget - st.new_tokens - 1) if drafter else 0  # never draft past the budget
            # 1. draft up to kr tokens
            t0 = time.perf_counter()
            d, q = [], None
            if kr > 0:
                try:
                    d, q = drafter.propose(seq, spec.plan(k, kr))
                    if len(d) > kr:
                        raise DraftUnavailable(f"the drafter proposed {len(d)} tokens when asked for at most {kr}")
                except DraftUnavailable as e:  # give the drafter up (a remote one frees its sequence)
                    drafter.close()
                    drafter, st.fallback, d, q = None, f"ar after round {st.rounds}: {e}", [], None
            kr = len(d)
            t1 = time.perf_counter()
            # 2. verify: one target forward over the uncached committed tokens + the drafts
            logits = tc.forward(seq[tc.length:] + d, keep=kr + 1)  # [kr+1, V]
            p = warp(logits, sp.temperature, sp.top_k, sp.top_p)  # [kr+1, V]
            # 3. accept n drafts, then a recovered or bonus token
            n, t_next = rejection_sample(torch.tensor(d, dtype=torch.long), q, p, gen)
            t2 = time.perf_counter()
            # 4. crop the target cache back to the committed prefix seq + d_1..d_n
            tc.crop(len(seq) + n)
            st.verify_s += t2 - t1
            new = d[:n] + [t_next]
            # 5. emit, cut at EOS / budget / stop string; tell the drafter the outcome if we go on
            finish = None
            for i, t in enumerate(new):
                if t in eos:
                    new, finish = new[: i + 1], "eos"
                    break
            if st.new_tokens + len(new) >= budget and finish is None:
                new, finish = new[: budget - st.new_tokens], "length"
            delta, keep = text.push(new, final=finish is not None)
            if keep is not None:
                new, finish = new[: keep - st.new_tokens], "stop"
            st.drafted_per_round.append(kr)
            st.hit_per_round.append(int(kr > 0 and drafter is not None and drafter.last_hit))
            if drafter is not None and kr > 0:
                k = spec.next_k(k, n == kr)  # the next round's k, decided before the drafter is asked for it
                if not finish:
                    t3 = time.perf_counter()
                    k_next = max(0, min(k, budget - st.new_tokens - len(new) - 1))
                    try:  # a draft cache crops to seq + d_1..d_n
                        drafter.on_outcome(n, t_next, len(seq) + n, spec.plan(k, k_next))
                    except DraftUnavailable as e:
                        drafter.close()
                        drafter, st.fallback = None, f"ar after round {st.rounds + 1}: {e}"
                    wait = time.perf_counter() - t3
                    st.draft_wait_s += wait
                    if drafter is not None and drafter.last_hit:
                        st.hit_wait_s += wait
                    else:
                        st.miss_wait_s += wait
            st.draft_wait_s += t1 - t0
            seq += new
            st.rounds += 1
            st.draft_tokens += kr
            st.accepted_tokens += n
            st.accepted_per_round.append(n)
            st.new_tokens += len(new)
            if drafter is not None:
                st.cache_hits, st.cache_misses, st.late_hits = drafter.hits, drafter.misses, drafter.late_hits
            st.elapsed_s = time.perf_counter() - t_start
            if st.rounds == 1:
                st.ttft_s = st.elapsed_s
            if finish:
                st.finish_reason = finish
            yield Chunk(token_ids=new, text=delta, finish_reason=finish)
            if finish:
                return
    finally:
        if drafter is not None:
            drafter.close()
