"""The draft side of speculative speculative decoding (SSD): a drafter with a speculation cache.

A sequence alternates between the two sides. The target commits tokens S; the draft proposes
d_1..d_k (round r); the target verifies and reports the outcome (r, j, t*): j in 0..k accepted
drafts and t*, the recovered (j < k) or bonus (j = k) token. The committed sequence becomes
S + d_1..d_j + t*. SSD uses the time the target spends verifying: right after proposal r goes
out, `DraftSession.speculate` guesses the likely outcomes and drafts proposal r+1 for each, so a
correct guess (a cache hit) is answered with no model work at all. A miss drafts just-in-time.

k has one owner, the target: every request for a proposal (the first one, and every outcome)
carries a `KPlan`: the proposal's k, and the k the target will ask for in the round after,
when every draft is accepted / when one is rejected. The draft drafts exactly that: its
proposal holds k drafts (fewer only after a token it doubts, `stop_prob`, or at its budget), so
j = len(d) always means "all accepted" and j < len(d) a real rejection; and its branches are
drafted to the plan's lengths. A request whose k differs from the plan is still served from a
branch: truncated when the branch is longer, extended when it is shorter.

Speculation, after sending d_1..d_k (the cache holds S + d_1..d_{k-1}):
  1. glue     -- one forward over d_k gives the draft's distribution at position k; with the
                 k distributions computed while drafting, step_probs [k+1, V].
  2. predict  -- `predict_outcomes` takes the top-F_i tokens at each position i, without
                 d_{i+1} (a token the target would have accepted cannot be the recovered one).
                 The fan-out F comes from an `AcceptanceModel`: the geometric prior refit online
                 from measured acceptance per position and the measured rank of realised outcomes.
  3. branch   -- the cache of S + d_1..d_k is repeated B times along the batch axis; branch
                 (i, t) feeds t at position |S|+i with an attention mask that hides the cache
                 columns of d_{i+1}..d_k. Batched one-token forwards draft every branch at once.
  4. restore  -- the batch-1 tensors of S + d_1..d_k are put back (the branch steps built new
                 ones), and the proposals are stored under (r+1, i, t).
Speculation runs one forward at a time (`speculate_step`), so a server answers other messages
between steps. An outcome that arrives while its own round is being speculated is not thrown
away: if it is one of the branches, that branch alone is drafted on to the end (a "late hit");
otherwise the branches are dropped and the proposal is drafted just-in-time (a miss).

On a hit the session only remembers that its cache holds S + d_1..d_k while the sequence is now
S + d_1..d_j + t* + d'_1..d'_k: the next `speculate` crops back to the common prefix and feeds
[t*, d'_1..d'_k] in ONE forward, which both rebuilds the cache and yields all k+1 rows of
step_probs (a multi-token forward costs about one step). Simple over clever: a cleverer version
would splice the chosen branch's k KV entries from step 3 into the batch-1 cache (its keys are
already rotated for the right positions), saving that forward; and would draft the branches as
one tree in the sequence axis of a batch-1 cache (a 4-D mask, B new tokens a step) instead of a
batch: the batch repeats the prefix B times, and DynamicCache's concatenation copies all B
copies again at every step, which costs memory bandwidth once the prefix is long.

Sampling stays lossless: with temperature > 0 every d_i is drawn from q', the warped
distribution truncated to its top `q_top` tokens and renormalised, and the proposal carries q'
exactly (ids + probs), which the verifier uses in `rejection_sample`. Speculative branches draw
their tokens the same way from the session's generator; the realised outcome picks a branch
whose tokens were drawn independently of the target's randomness, so the served proposal is a
fresh draw from q' given the committed prefix. A branch is only ever served as drawn: cut to
the asked k (the first k draws of a longer draw), or drawn on after its last token (never
redrawn because of its length, which would favour short proposals). Greedy proposals carry
empty q lists.

This module does not know about networks, processes, threads, the target model or when the
target will answer: it takes a loaded draft LM, token ids and outcomes, and returns proposals.
"""

from __future__ import annotations

import operator
import time
from itertools import accumulate
from dataclasses import dataclass, field

import torch

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # older transformers: fall back to crop + select after branching
    DynamicLayer = None

from . import defaults
from .lm import LM, KVCache
from .sampling import SamplingParams, sample, warp
from .speculative import KPlan

__all__ = ["Proposal", "StaleRound", "DraftSession", "AcceptanceModel", "default_fanout", "predict_outcomes",
           "sparse_proposal", "forward_branches"]


@dataclass
class Proposal:
    """Draft tokens for one round, with the sparse proposal q' they were sampled from."""

    round: int
    token_ids: list[int]  # d_1..d_k (k may be smaller than asked: early stop / budget)
    q_ids: list[list[int]] = field(default_factory=list)  # per position, support of q' (just [] when greedy)
    q_probs: list[list[float]] = field(default_factory=list)  # per position, q' probabilities (sum to 1)
    cache_hit: bool = False  # True when the outcome was one of the pre-drafted branches
    late: bool = False  # a hit whose branch was still being drafted (or had to be drafted on) after the outcome

    def cut(self, n: int) -> "Proposal":
        """The first n drafts (the first n draws of a longer draw: still a draw from q')."""
        if len(self.token_ids) <= n:
            return self
        return Proposal(self.round, self.token_ids[:n], self.q_ids[:n], self.q_probs[:n], self.cache_hit, self.late)


class StaleRound(ValueError):
    """An outcome for a round that is not the current one (late, duplicated or from the future)."""


class AcceptanceModel:
    """What fan-out pays: measured acceptance per draft position and the rank of realised outcomes.

    The probability that a round of k drafts ends at position i (i drafts accepted, then t*) is
    a_0..a_{i-1} (1 - a_i), and a_0..a_{k-1} at the bonus position k, where a_i is the measured
    acceptance of the draft at position i+1 given the ones before it. Given where it ends, t* is
    the draft's rank-f candidate there (without d_{i+1} at a rejection) with a measured
    probability, kept apart for recovered and bonus tokens. A branch (i, f) is a hit with
    probability P(i) P(f | i); `fanout` spends the budget on the likeliest ones.

    Priors, worth `prior_n` observations each (so an unmeasured pair gets the fixed geometric
    default and a measured one its own): acceptance `accept` at every position; a bonus token is
    the rank-f candidate with probability 2^-(f+1), a recovered one with 2^-(f+2) (the recovered
    token is one the draft ranked below its own pick, which it ranks less reliably; the rest of
    its mass is beyond every candidate). One model serves the sequences of one draft worker's
    stream (one target/draft pair). Not yet: a budget from measured step costs (it is fixed,
    `defaults.FANOUT_BUDGET`, with `FANOUT_MIN_GAIN` as each branch's price).

    Where the round's drafts come with the draft's own probability of each (`conf`, its confidence
    q_i in d_{i+1}), a_i is instead the measured acceptance of drafts of that confidence
    (`CONF_BINS` bins over [0, 1], each with the prior `accept`, so an unmeasured pair fans out as
    by position, and the bins learn the draft's calibration against the target): one round's doubtful
    draft (the last one, when the draft stopped early at q < stop_prob) is where it is likely
    rejected, so its position gets the branches that a per-position average would spread out.
    """

    RANKS = 64  # ranks tracked per kind; candidates beyond them are never worth a branch
    POSITIONS = 65  # draft positions 0..64 (k <= 64)
    CONF_BINS = 10  # bins of the draft's confidence q in a draft: [0, 0.1), ..., [0.9, 1]

    def __init__(self, accept: float = 0.8, prior_n: float = 8.0):
        if not 0 < accept < 1:
            raise ValueError(f"accept must be in (0, 1), got {accept}")
        if prior_n <= 0:
            raise ValueError(f"prior_n must be > 0, got {prior_n}")
        self.prior_accept, self.prior_n = accept, prior_n
        self.offered = [0] * self.POSITIONS  # rounds that verified a draft at position i + 1
        self.kept = [0] * self.POSITIONS  # ... and accepted it
        self.rank_counts = {kind: [0] * self.RANKS for kind in (False, True)}  # bonus? -> counts by rank
        self.ranked = {False: 0, True: 0}
        self.conf_offered = [0] * self.CONF_BINS  # drafts verified, by the draft's confidence bin
        self.conf_kept = [0] * self.CONF_BINS  # ... and accepted

    @staticmethod
    def _prior_rank(bonus: bool, f: int) -> float:
        return 0.5 ** (f + 1) if bonus else 0.5 ** (f + 2)

    def observe(self, drafted: int, accepted: int, conf: list[float] | None = None) -> None:
        """One verified round: `accepted` of `drafted` drafts kept; conf: the draft's probability of
        each draft (when known), for the acceptance by confidence."""
        for i in range(min(accepted + 1, drafted, self.POSITIONS)):
            self.offered[i] += 1
            self.kept[i] += i < accepted
        if conf is not None and len(conf) >= drafted:
            for i in range(min(accepted + 1, drafted)):
                b = self._bin(conf[i])
                self.conf_offered[b] += 1
                self.conf_kept[b] += i < accepted

    def _bin(self, q: float) -> int:
        return min(max(int(q * self.CONF_BINS), 0), self.CONF_BINS - 1)

    def conf_accept_rate(self, q: float) -> float:
        """Acceptance of a draft the draft gave probability q (posterior mean of its bin)."""
        b, n0 = self._bin(q), self.prior_n
        return (self.conf_kept[b] + n0 * self.prior_accept) / (self.conf_offered[b] + n0)

    def observe_rank(self, bonus: bool, rank: int) -> None:
        """Where the draft ranked the realised t* among its candidates (0 = its first choice)."""
        self.ranked[bonus] += 1
        if 0 <= rank < self.RANKS:
            self.rank_counts[bonus][rank] += 1

    def accept_rate(self, i: int) -> float:
        """Acceptance of the draft at position i + 1 given the ones before it (posterior mean)."""
        n0 = self.prior_n
        return (self.kept[i] + n0 * self.prior_accept) / (self.offered[i] + n0)

    def rank_probs(self, bonus: bool) -> list[float]:
        """P(t* is the rank-f candidate), f = 0..RANKS-1 (posterior mean)."""
        n0, n, counts = self.prior_n, self.ranked[bonus], self.rank_counts[bonus]
        return [(counts[f] + n0 * self._prior_rank(bonus, f)) / (n + n0) for f in range(self.RANKS)]

    def outcome_probs(self, k: int, conf: list[float] | None = None) -> list[float]:
        """P(a round of k drafts ends at position i), i = 0..k (k = the bonus position); from the
        acceptance by confidence when the drafts' `conf` is given, else by position."""
        out, reach = [], 1.0
        for i in range(k):
            a = self.conf_accept_rate(conf[i]) if conf is not None else self.accept_rate(i)
            out.append(reach * (1 - a))
            reach *= a
        return out + [reach]

    def fanout(self, k: int, budget: int, min_gain: float = 0.0, conf: list[float] | None = None) -> list[int]:
        """F_0..F_k maximising P(hit) - min_gain * branches, with at most `budget` branches (conf:
        the round's draft confidences, see the class docstring).

        P(hit) = sum_i P(i) P(rank < F_i | i). Exact (a knapsack over positions; a position's
        top-F rule takes candidates in rank order, so a measured rank-1 outcome is bought with
        rank 0); ties go to the later positions.
        """
        if not 0 <= k < self.POSITIONS:
            raise ValueError(f"k must be in [0, {self.POSITIONS - 1}], got {k}")
        if budget < 0:
            raise ValueError(f"fan-out budget must be >= 0, got {budget}")
        if conf is not None and len(conf) != k:
            raise ValueError(f"conf needs one probability per draft ({k}), got {len(conf)}")
        P = self.outcome_probs(k, conf)
        covered = {b: [0.0, *accumulate(self.rank_probs(b))] for b in (False, True)}  # P(rank < F), F = 0..RANKS
        best = [(0.0, [])] * (budget + 1)  # [b]: the best (value, F_{i+1}..F_k) with at most b branches
        for i in range(k, -1, -1):
            cov, new = covered[i == k], []
            for b in range(budget + 1):
                top = (-1.0, [])
                for f in range(min(b, self.RANKS) + 1):
                    v = best[b - f][0] + P[i] * cov[f] - min_gain * f
                    if v > top[0] + 1e-12:
                        top = (v, [f, *best[b - f][1]])
                new.append(top)
            best = new
        return best[budget][1]

    def stats(self) -> dict:
        """The fitted acceptance per position (first 10), per confidence bin, and P(rank 0) of bonus
        and recovered tokens."""
        return {"accept": [round(self.accept_rate(i), 3) for i in range(10)],
                "accept_by_conf": [round(self.conf_accept_rate((b + 0.5) / self.CONF_BINS), 3) for b in range(self.CONF_BINS)],
                "bonus_top1": round(self.rank_probs(True)[0], 3), "recovered_top1": round(self.rank_probs(False)[0], 3)}


def default_fanout(k: int, budget: int = 8, accept: float = 0.8) -> list[int]:
    """The fan-out F_0..F_k of an unmeasured pair: `AcceptanceModel(accept).fanout(k, budget)`.

    The outcome lands at position i < k with probability a^i (1 - a) and at the bonus position k
    with probability a^k; a rejection position's candidates count half, and each further
    candidate of a position half as much as the one before. So the sum is `budget`, the bonus
    position gets the most, and late positions of a long draft may get none.
    """
    return AcceptanceModel(accept).fanout(k, budget)


def predict_outcomes(step_probs: torch.Tensor, draft_ids: list[int], fanout: list[int]) -> list[tuple[int, int]]:
    """The outcomes (i, t) worth pre-drafting for: i accepted drafts, then token t.

    step_probs [k+1, V]: the draft's distribution after S + d_1..d_i for i = 0..k.
    For each i, the top-F_i tokens of step_probs[i], excluding d_{i+1} when i < k (it cannot be
    the recovered token) and tokens of probability 0. Returns the keys (i, t) ordered by i, then
    by decreasing probability (ties: lower id first).
    """
    k = len(draft_ids)
    if step_probs.shape[0] != k + 1 or len(fanout) != k + 1:
        raise ValueError(f"need k+1={k + 1} rows of step_probs and fanout entries, "
                         f"got {step_probs.shape[0]} and {len(fanout)}")
    keys = []
    for i in range(k + 1):
        f = min(int(fanout[i]), step_probs.shape[1])
        if f <= 0:
            continue
        p = step_probs[i].float().clone()  # [V]
        if i < k:
            p[draft_ids[i]] = -1.0
        v, ids = p.topk(min(f + 1, p.shape[0]))  # one spare so ties at the edge sort by id
        cand = sorted(((-float(pv), int(t)) for pv, t in zip(v, ids) if pv > 0))[:f]
        keys += [(i, t) for _, t in cand]
    return keys


def sparse_proposal(probs: torch.Tensor, top: int) -> tuple[list[int], list[float], torch.Tensor]:
    """Truncate a warped distribution [V] to its top `top` tokens, renormalised: (ids, probs, dense q' [V]).

    Zero-probability tokens are dropped from the support. The dense q' holds exactly the
    reported probabilities, so the verifier rebuilds the very distribution that was sampled.
    """
    ids, ps, dense = _sparse_rows(probs[None], top)
    return ids[0], ps[0], dense[0]


def _sparse_rows(probs: torch.Tensor, top: int) -> tuple[list[list[int]], list[list[float]], torch.Tensor]:
    """`sparse_proposal` for every row of probs [B, V] at once: (ids, probs, dense q' [B, V])."""
    v, ids = probs.float().topk(min(top, probs.shape[-1]), dim=-1)  # [B, top]
    v = v / v.sum(-1, keepdim=True)  # zeros stay zero and leave the support below
    dense = torch.zeros(probs.shape, dtype=torch.float32).scatter_(-1, ids, v)  # [B, V]
    keep = v > 0  # [B, top]
    return ([r[m].tolist() for r, m in zip(ids, keep)], [r[m].tolist() for r, m in zip(v, keep)], dense)


@torch.inference_mode()
def forward_branches(cache: KVCache, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Feed one token per branch to a batched cache; return float32 logits [B, V].

    ids [B] tokens, pos [B] their positions (rotary), mask [B, cache.length + 1]: 1 where the
    branch may attend (its cache columns, and the new token itself), 0 where it may not. The
    token goes to cache column `cache.length` for every branch: transformers builds the causal
    part in cache-column space (query offset = cache length) and ANDs the 2-D mask in, so a
    branch sees exactly the columns its mask keeps, while positions come from `pos` only.
    """
    dev = cache.device
    out = cache.model(input_ids=ids[:, None].to(dev), attention_mask=mask.to(dev), position_ids=pos[:, None].to(dev),
                      past_key_values=cache.cache, use_cache=True, logits_to_keep=1)
    cache.length += 1
    return out.logits[:, -1].float().cpu()


def _truncate(cache: KVCache, length: int) -> None:
    """Crop every layer to `length` tokens (robust to a forward that failed half-way)."""
    for layer in cache.cache.layers:
        n = layer.get_seq_length()
        if n > length:
            layer.crop(length - n)
    cache.length = min(cache.length, length)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class DraftSession:
    """One sequence on the draft side: proposals, outcomes and the speculation cache.

    Call `first_proposal(plan)` once, then for every proposal sent: `speculate()` (while the
    target verifies; or `speculate_step()` repeatedly, one forward each, answering other work in
    between), then `on_outcome(round, accepted, token, plan)`, which returns the next proposal.
    A plan is the target's `KPlan` for the proposal asked for (None: k = the session's k always).
    `hits` / `misses` count outcomes answered from a pre-drafted branch / drafted just-in-time;
    `late_hits`, among the hits, those whose branch was still being drafted (or had to be drafted
    on) after the outcome; `draft_s` / `spec_s` the seconds spent drafting after outcomes /
    speculating.
    """

    def __init__(self, lm: LM, prompt_ids: list[int], sampling: SamplingParams | None = None, k: int = defaults.K,
                 fanout: list[int] | None = None, speculate: bool = True, seed: int = 0,
                 q_top: int = defaults.Q_TOP, stop_prob: float = 0.0, max_new_tokens: int | None = None,
                 acceptance: AcceptanceModel | None = None, fanout_budget: int = defaults.FANOUT_BUDGET):
        V = lm.vocab_size
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token of prompt")
        bad = [t for t in prompt_ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {V}), got {bad[:5]}")
        if not 1 <= k <= 64:
            raise ValueError(f"k (draft length) must be between 1 and 64, got {k}")
        if fanout is not None and (len(fanout) != k + 1 or not all(isinstance(f, int) and f >= 0 for f in fanout)):
            raise ValueError(f"fanout must be k+1={k + 1} non-negative ints (F_0..F_k), got {fanout}")
        if q_top < 1:
            raise ValueError(f"q_top must be >= 1, got {q_top}")
        if not 0 <= stop_prob < 1:
            raise ValueError(f"stop_prob must be in [0, 1), got {stop_prob}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if fanout_budget < 0:
            raise ValueError(f"fanout_budget must be >= 0, got {fanout_budget}")
        self.lm, self.sp = lm, sampling or SamplingParams()
        self.k, self.fanout, self.speculating = k, (list(fanout) if fanout is not None else None), speculate
        self.acceptance = acceptance if acceptance is not None else AcceptanceModel()
        self.fanout_budget = fanout_budget
        self.q_top, self.stop_prob, self.max_new_tokens = q_top, stop_prob, max_new_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.cache = lm.new_cache()
        self.ids: list[int] = []  # the tokens self.cache holds (batch 1 between calls)
        self.seq = list(prompt_ids)  # committed tokens
        self.n_prompt = len(prompt_ids)
        self.round = -1  # round of the last proposal sent
        self.sent: Proposal | None = None
        self.plan = KPlan(k, k, k)  # the target's plan for `sent`: its k and the round after's
        self.rows: list[torch.Tensor] = []  # logits [V] after seq + d_1..d_i, i = 0.., for `sent`
        self.table: dict[tuple[int, int, int], tuple[Proposal, bool]] = {}  # (round, i, t) -> (branch, final)
        self.spec_round = -1  # round whose outcomes `table` covers
        self.conf: tuple[int, list[float]] | None = None  # (round, the draft's probability of each draft of `sent`)
        self._branches: _Branches | None = None  # speculation in progress (branches being drafted)
        self.hits = self.late_hits = self.misses = 0
        self.speculations = self.branches = 0  # rounds speculated for, and the branches they drafted
        self.draft_s = self.spec_s = 0.0

    # ---- public protocol ------------------------------------------------------------------

    def first_proposal(self, plan: KPlan | None = None) -> Proposal:
        """Round 0, drafted after the prompt: plan.k drafts (None: the session's k)."""
        if self.sent is not None:
            raise ValueError("first_proposal was already sent: answer outcomes with on_outcome")
        plan = self._check_plan(plan)
        self.round = 0
        self.plan = plan
        self.sent = self._draft_jit(self._budget(len(self.seq), plan.k))
        return self.sent

    def speculate(self) -> None:
        """Pre-draft the next proposal for the likely outcomes of the proposal just sent (all of it)."""
        while self.speculate_step():
            pass

    def speculate_step(self) -> bool:
        """One forward of speculation for the proposal just sent; True while more remains.

        The first step runs the glue forward and predicts the branches, each later one drafts one
        token of every open branch; the last stores them. Returns False at once when there is
        nothing (more) to do: speculation off, the round already speculated, no branch worth it.
        """
        if not self.speculating or self.sent is None or self.spec_round == self.round + 1:
            return False
        t0 = time.perf_counter()
        try:
            if self._branches is None:
                return self._begin_speculation()
            if self._branches.step():
                return True
            self.table = {(self.round + 1, i, t): entry for (i, t), entry in zip(self._branches.keys,
                                                                                  self._branches.results())}
            self._branches.restore()
            self._branches = None
            self.spec_round = self.round + 1
            return False
        finally:
            self.spec_s += time.perf_counter() - t0

    def on_outcome(self, round: int, accepted: int, token: int, plan: KPlan | None = None) -> Proposal:
        """Commit the verified outcome of `round` and return the proposal for the next round.

        plan: the target's KPlan for that proposal (None: the session's k). Served from a finished
        branch when the outcome was pre-drafted (cut to plan.k, or drafted on to it), from the
        branch in progress when it is still being drafted, else drafted just-in-time.
        """
        accepted, token, plan = self._check_outcome(round, accepted, token, plan)
        # nothing changed above this line: a bad outcome leaves the session as it was
        self._observe(accepted, token)
        self.seq += self.sent.token_ids[:accepted] + [token]
        self.round += 1
        n = self._budget(len(self.seq), plan.k)
        entry, branches = self.table.get((self.round, accepted, token)), self._branches
        self.table, self.rows, self._branches, self.plan = {}, [], None, plan
        if entry is not None:
            prop, final = entry
            # pre-drafted to a shorter plan: draw on after its last token (at most miss_k in all)
            m = max(len(prop.token_ids), plan.jit(n))
            self.sent = prop.cut(n) if len(prop.token_ids) >= m or final else self._draft_jit(m, prop)
        elif branches is not None and (accepted, token) in branches.index:
            b = branches.index[accepted, token]
            self.sent = branches.finish(b, min(n, max(len(branches.toks[b]), plan.jit(n))))
        else:
            if branches is not None:
                branches.restore()
            self.misses += 1
            self.sent = self._draft_jit(plan.jit(n))
            return self.sent
        self.hits += 1
        self.late_hits += self.sent.late
        return self.sent

    @property
    def hit_rate(self) -> float:
        """Outcomes that were pre-drafted for (finished or late) over all outcomes."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    # ---- drafting -------------------------------------------------------------------------

    def _check_outcome(self, round: int, accepted: int, token: int, plan: KPlan | None) -> tuple[int, int, KPlan]:
        """Validate an outcome of `round` against the proposal sent: (accepted, token, plan), or
        StaleRound / ValueError naming what is wrong. Changes nothing."""
        if self.sent is None:
            raise StaleRound(f"outcome for round {round} before any proposal: Start the sequence "
                             "(first_proposal) first")
        if round != self.round:
            raise StaleRound(f"outcome for round {round}, but the current round is {self.round}")
        k_sent = len(self.sent.token_ids)
        try:
            accepted, token = operator.index(accepted), operator.index(token)
        except TypeError as e:
            raise ValueError(f"accepted and token must be ints, got {accepted!r}, {token!r}") from e
        if not 0 <= accepted <= k_sent:
            raise ValueError(f"accepted must be in [0, {k_sent}] (drafts sent in round {round}), got {accepted}")
        if not 0 <= token < self.lm.vocab_size:
            raise ValueError(f"token must be in [0, {self.lm.vocab_size}), got {token}")
        return accepted, token, self._check_plan(plan)

    def _check_plan(self, plan: KPlan | None) -> KPlan:
        if plan is None:
            return KPlan(self.k, self.k, self.k)
        if not isinstance(plan, KPlan):
            raise ValueError(f"plan must be a KPlan, got {plan!r}")
        return plan

    def _budget(self, committed: int, k: int | None = None) -> int:
        """Draft length for a sequence of `committed` tokens: k (the session's when None), or less near max_new_tokens."""
        k = self.k if k is None else k
        if self.max_new_tokens is None:
            return k
        return max(0, min(k, self.max_new_tokens - (committed - self.n_prompt) - 1))

    def _observe(self, accepted: int, token: int) -> None:
        """Feed the acceptance model: how far the sent proposal got, and where the draft ranked t*."""
        d = self.sent.token_ids
        self.acceptance.observe(len(d), accepted, self._sent_conf(None))
        if accepted < len(self.rows):  # the draft's logits at that position (computed while drafting or glueing)
            row = self.rows[accepted]
            better = row > row[token]
            if accepted < len(d):
                better[d[accepted]] = False  # the rejected draft is never a recovered candidate
            self.acceptance.observe_rank(accepted == len(d), int(better.sum()))

    def _fanout(self, kd: int, conf: list[float] | None = None) -> list[int]:
        """F_0..F_kd for a proposal of kd drafts: the fixed fan-out mapped onto it, or the fitted one
        (for drafts of confidences `conf` when given)."""
        if self.fanout is not None:  # F_i for the rejection positions it names, its last entry for the bonus
            F = self.fanout
            return [F[i] if i < len(F) - 1 else 0 for i in range(kd)] + [F[-1]]
        return self.acceptance.fanout(kd, self.fanout_budget, defaults.FANOUT_MIN_GAIN, conf)

    def _sent_conf(self, step_probs: torch.Tensor | None) -> list[float] | None:
        """The draft's probability of each draft of `sent`: kept from its speculation (step_probs
        [>= k, V], the draft's distributions there), else from the logits of `rows` (None when those
        are not all computed)."""
        d = self.sent.token_ids
        if self.conf is not None and self.conf[0] == self.round:
            return self.conf[1]
        if step_probs is None:
            if len(self.rows) < len(d):
                return None
            step_probs = torch.stack([self._rank(r) for r in self.rows[: len(d)]]) if d else None
        conf = step_probs[torch.arange(len(d)), torch.tensor(d, dtype=torch.long)].tolist() if d else []
        self.conf = (self.round, conf)
        return conf

    def _begin_speculation(self) -> bool:
        """Glue (step_probs for every position of the sent proposal), predict, and set up the branches."""
        d = self.sent.token_ids
        need = len(d) + 1 - len(self.rows)
        if need > 0:  # 1. glue: the rows of step_probs not computed while drafting (all k+1 after a hit)
            self.rows = self.rows + list(self._sync(self.seq + d, need))
        step_probs = torch.stack([self._rank(r) for r in self.rows[: len(d) + 1]])  # [k+1, V]
        keys = predict_outcomes(step_probs, d, self._fanout(len(d), self._sent_conf(step_probs)))  # 2. predict
        self.speculations += 1
        self.branches += len(keys)
        if not keys:
            self.table, self.spec_round = {}, self.round + 1
            return False
        # 3. branch: planned to the target's k for the round after, never past the budget
        limits = [self._budget(len(self.seq) + i + 1, 64) for i, _ in keys]
        budgets = [min(self.plan.after(i == len(d)), lim) for (i, _), lim in zip(keys, limits)]
        self._branches = _Branches(self, keys, budgets, limits)
        return True

    def _rank(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution used to rank candidate outcomes: softmax at T=1 when greedy, else warped."""
        if self.sp.greedy:
            return torch.softmax(logits.float(), -1)
        return warp(logits, self.sp.temperature, self.sp.top_k, self.sp.top_p)

    def _pick(self, logits: torch.Tensor) -> list[tuple[int, list[int], list[float], bool]]:
        """Draw one draft token per row of logits [B, V]: (token, q' ids, q' probs, stop after it)."""
        B = logits.shape[0]
        if self.sp.greedy:
            t = logits.argmax(-1)  # [B]
            conf = torch.softmax(logits.float(), -1).gather(-1, t[:, None])[:, 0] if self.stop_prob > 0 else None
            return [(int(t[b]), [], [], conf is not None and float(conf[b]) < self.stop_prob) for b in range(B)]
        q = warp(logits, self.sp.temperature, self.sp.top_k, self.sp.top_p)  # [B, V]
        ids, ps, dense = _sparse_rows(q, self.q_top)
        t = [sample(dense[b], self.gen) for b in range(B)]  # q' is what the verifier will see
        return [(t[b], ids[b], ps[b], self.stop_prob > 0 and float(q[b, t[b]]) < self.stop_prob) for b in range(B)]

    def _sync(self, ids: list[int], keep: int) -> torch.Tensor:
        """Make the cache hold `ids`, re-feeding from the common prefix; logits [keep, V] of the last positions."""
        m = min(_common_prefix(self.ids, ids), len(ids) - keep)
        self.cache.crop(m)
        logits = self.cache.forward(ids[m:], keep=keep)
        self.ids = list(ids)
        return logits

    def _draft_jit(self, n: int, prefix: Proposal | None = None) -> Proposal:
        """Draft n tokens after the committed prefix (same rule as speculative.draft_step).

        prefix: a pre-drafted branch shorter than n: its tokens are kept as drawn and drafting
        goes on after them (a late hit); else a miss.
        """
        t0 = time.perf_counter()
        d = list(prefix.token_ids) if prefix else []
        qi, qp = (list(prefix.q_ids), list(prefix.q_probs)) if prefix else ([], [])
        if n == 0 and not d:  # nothing to draft (miss_k = 0, or the budget): answer with no forward
            self.rows = []
            return Proposal(self.round, [])
        self.rows = list(self._sync(self.seq + d, len(d) + 1))  # rows i = 0..len(d)
        logits = self.rows[-1]
        while len(d) < n:
            t, ids, ps, stop = self._pick(logits[None])[0]
            d.append(t), qi.append(ids), qp.append(ps)
            if stop or len(d) == n:
                break
            logits = self._sync(self.seq + d, 1)[-1]
            self.rows.append(logits)
        # rows: i = 0..len(d)-1 (the cache holds seq + d_1..d_{n-1}; n = 0: row 0); speculate's glue adds row n
        self.draft_s += time.perf_counter() - t0
        greedy = self.sp.greedy
        return Proposal(self.round, d, [] if greedy else qi, [] if greedy else qp,
                        cache_hit=prefix is not None, late=prefix is not None)


class _Branches:
    """The branches of one speculation, drafted one batched forward (`step`) at a time.

    The session's cache holds S + d_1..d_k (length L, batch 1). Branch (i, t) puts t at
    position |S|+i and must not see cache columns |S|+i .. L-1 (d_{i+1}..d_k). budgets[b]: the
    tokens branch b is drafted to (the plan's k); limits[b]: the most it may ever hold (the
    session's budget), so a branch that reached its limit or stopped early is final.
    """

    def __init__(self, sess: DraftSession, keys: list[tuple[int, int]], budgets: list[int], limits: list[int]):
        B, P, L = len(keys), len(sess.seq), sess.cache.length
        assert L == len(sess.ids) == P + len(sess.sent.token_ids)
        self.sess, self.keys, self.budgets, self.limits, self.P, self.L = sess, keys, budgets, limits, P, L
        self.index = {key: b for b, key in enumerate(keys)}
        self.spec_round = sess.round + 1
        self.toks: list[list[int]] = [[] for _ in range(B)]
        self.qi: list[list[list[int]]] = [[] for _ in range(B)]
        self.qp: list[list[list[float]]] = [[] for _ in range(B)]
        self.stopped = [False] * B  # ended early after a token the draft doubts
        self.open = [n > 0 for n in budgets]
        self.steps = 0  # batched forwards so far (branch b's tokens sit at columns L.. of its row)
        self.pos = torch.tensor([P + i for i, _ in keys])  # [B] position of each branch's token t
        self.mask = torch.ones(B, L, dtype=torch.long)  # [B, L] prefix columns each branch sees
        for b, (i, _) in enumerate(keys):
            self.mask[b, P + i:L] = 0
        self.x = torch.tensor([t for _, t in keys])  # [B] the tokens the next step feeds
        # DynamicLayer.update concatenates into new tensors, so the batch-1 tensors survive the
        # branch steps untouched: keep references and put them back (no copy) afterwards
        layers = sess.cache.cache.layers
        self.saved = ([(ly.keys, ly.values) for ly in layers]
                      if DynamicLayer and all(type(ly) is DynamicLayer for ly in layers) else None)
        self.batched = False

    def step(self) -> bool:
        """One batched forward over every branch (one more token for each open one); True while any is open."""
        if not any(self.open):
            return False
        cache, B = self.sess.cache, len(self.keys)
        if not self.batched:
            cache.expand(B)
            self.batched = True
        mask = torch.cat([self.mask, torch.ones(B, self.steps + 1, dtype=torch.long)], 1)  # [B, L+steps+1]
        logits = forward_branches(cache, self.x, self.pos + self.steps, mask)  # [B, V]
        self.steps += 1
        live = [b for b in range(B) if self.open[b]]
        for b, (t, ids, ps, stop) in zip(live, self.sess._pick(logits[live])):
            self.toks[b].append(t), self.qi[b].append(ids), self.qp[b].append(ps)
            self.stopped[b] = stop
            self.open[b] = not stop and len(self.toks[b]) < self.budgets[b]
        self.x = torch.tensor([tb[-1] if tb else 0 for tb in self.toks])  # finished branches feed filler
        return any(self.open)

    def results(self) -> list[tuple[Proposal, bool]]:
        """Every branch as (its proposal, final: it cannot grow, having stopped early or reached its limit)."""
        greedy = self.sess.sp.greedy
        return [(Proposal(self.spec_round, self.toks[b], [] if greedy else self.qi[b], [] if greedy else self.qp[b],
                          cache_hit=True), self.stopped[b] or len(self.toks[b]) >= self.limits[b])
                for b in range(len(self.keys))]

    def finish(self, b: int, n: int) -> Proposal:
        """Draft branch b alone on to n tokens (the outcome picked it mid-speculation); restore; return it.

        The proposal is `late` when it needed drafting after the outcome (it had fewer than n tokens).
        """
        sess, cache = self.sess, self.sess.cache
        i, t = self.keys[b]
        toks, qi, qp = self.toks[b], self.qi[b], self.qp[b]
        t0 = time.perf_counter()
        late = len(toks) < n and not self.stopped[b]
        if late:
            if self.batched:
                cache.select(b)  # batch 1: this branch's row (prefix, then its own columns and fillers)
                self.batched = False
            while len(toks) < n and not self.stopped[b]:
                m, C = len(toks), cache.length
                mask = torch.zeros(1, C + 1, dtype=torch.long)  # its prefix, its own tokens, the new one
                mask[0, : self.P + i] = 1
                mask[0, self.L: self.L + m] = 1
                mask[0, C] = 1
                x = torch.tensor([toks[-1] if toks else t])
                logits = forward_branches(cache, x, torch.tensor([self.P + i + m]), mask)  # [1, V]
                tok, ids, ps, stop = sess._pick(logits)[0]
                toks.append(tok), qi.append(ids), qp.append(ps)
                self.stopped[b] = stop
        self.restore()
        sess.draft_s += time.perf_counter() - t0
        prop, _ = self.results()[b]
        prop.late = late
        return prop.cut(n)

    def restore(self) -> None:
        """Back to batch 1 holding S + d_1..d_k."""
        cache = self.sess.cache
        if self.saved is not None:
            for ly, (kk, vv) in zip(cache.cache.layers, self.saved):
                ly.keys, ly.values = kk, vv
            cache.length = self.L
        else:
            _truncate(cache, self.L)
            if self.batched:
                cache.select(0)
        self.batched = False
