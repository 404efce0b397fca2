"""The draft side of speculative speculative decoding (SSD): a drafter with a speculation cache.

A sequence alternates between the two sides. The target commits tokens S; the draft proposes
d_1..d_k (round r); the target verifies and reports the outcome (r, j, t*): j in 0..k accepted
drafts and t*, the recovered (j < k) or bonus (j = k) token. The committed sequence becomes
S + d_1..d_j + t*. SSD uses the time the target spends verifying: right after proposal r goes
out, `DraftSession.speculate` guesses the likely outcomes and drafts proposal r+1 for each, so a
correct guess (a cache hit) is answered with no model work at all. A miss drafts just-in-time.

Speculation, after sending d_1..d_k (the cache holds S + d_1..d_{k-1}):
  1. glue     -- one forward over d_k gives the draft's distribution at position k; with the
                 k distributions computed while drafting, step_probs [k+1, V].
  2. predict  -- `predict_outcomes` takes the top-F_i tokens at each position i, without
                 d_{i+1} (a token the target would have accepted cannot be the recovered one).
  3. branch   -- the cache of S + d_1..d_k is repeated B times along the batch axis; branch
                 (i, t) feeds t at position |S|+i with an attention mask that hides the cache
                 columns of d_{i+1}..d_k. k batched one-token forwards draft k tokens for all
                 branches at once.
  4. restore  -- the batch-1 tensors of S + d_1..d_k are put back (the branch steps built new
                 ones), and the proposals are stored under (r+1, i, t).
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
fresh draw from q' given the committed prefix. Greedy proposals carry empty q lists.

This module does not know about networks, processes, threads, the target model or when the
target will answer: it takes a loaded draft LM, token ids and outcomes, and returns proposals.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field

import torch

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # older transformers: fall back to crop + select after branching
    DynamicLayer = None

from . import defaults
from .lm import LM, KVCache
from .sampling import SamplingParams, sample, warp

__all__ = ["Proposal", "StaleRound", "DraftSession", "default_fanout", "predict_outcomes",
           "sparse_proposal", "forward_branches"]


@dataclass
class Proposal:
    """Draft tokens for one round, with the sparse proposal q' they were sampled from."""

    round: int
    token_ids: list[int]  # d_1..d_k (k may be smaller than asked: early stop / budget)
    q_ids: list[list[int]] = field(default_factory=list)  # per position, support of q' (just [] when greedy)
    q_probs: list[list[float]] = field(default_factory=list)  # per position, q' probabilities (sum to 1)
    cache_hit: bool = False  # True when served from the speculation cache


class StaleRound(ValueError):
    """An outcome for a round that is not the current one (late, duplicated or from the future)."""


def default_fanout(k: int, budget: int = 8, accept: float = 0.8) -> list[int]:
    """Fan-out F_0..F_k: how many candidate tokens to pre-draft for at each position.

    Model: the outcome lands at position i < k with probability a^i (1 - a) and at the bonus
    position k with probability a^k (acceptance rate a = `accept`). A rejection position's
    candidates count half (the recovered token is one the draft ranked *below* its own pick,
    which it ranks less reliably than its top choice), and each further candidate of a
    position half as much as the one before. Candidates go greedily to the largest gain, so
    the sum is `budget`, the bonus position gets the most, and late positions of a long draft
    may get none. This is a prior; a server can refit `accept` from measured acceptance.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if budget < 0:
        raise ValueError(f"fan-out budget must be >= 0, got {budget}")
    w = [0.5 * accept ** i * (1 - accept) for i in range(k)] + [accept ** k]  # [k+1]
    F = [0] * (k + 1)
    for _ in range(budget):
        i = max(range(k + 1), key=lambda i: (w[i] * 0.5 ** F[i], i))  # ties go to the later position
        F[i] += 1
    return F


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

    Call `first_proposal()` once, then for every proposal sent: `speculate()` (while the target
    verifies), then `on_outcome(round, accepted, token)`, which returns the next proposal.
    `hits` / `misses` count outcomes answered from the cache / drafted just-in-time;
    `draft_s` / `spec_s` the seconds spent drafting just-in-time / speculating.
    """

    def __init__(self, lm: LM, prompt_ids: list[int], sampling: SamplingParams | None = None, k: int = defaults.K,
                 fanout: list[int] | None = None, speculate: bool = True, seed: int = 0,
                 q_top: int = defaults.Q_TOP, stop_prob: float = 0.0, max_new_tokens: int | None = None):
        V = lm.vocab_size
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token of prompt")
        bad = [t for t in prompt_ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {V}), got {bad[:5]}")
        if not 1 <= k <= 64:
            raise ValueError(f"k (draft length) must be between 1 and 64, got {k}")
        fanout = default_fanout(k) if fanout is None else list(fanout)
        if len(fanout) != k + 1 or not all(isinstance(f, int) and f >= 0 for f in fanout):
            raise ValueError(f"fanout must be k+1={k + 1} non-negative ints (F_0..F_k), got {fanout}")
        if q_top < 1:
            raise ValueError(f"q_top must be >= 1, got {q_top}")
        if not 0 <= stop_prob < 1:
            raise ValueError(f"stop_prob must be in [0, 1), got {stop_prob}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.lm, self.sp = lm, sampling or SamplingParams()
        self.k, self.fanout, self.speculating = k, fanout, speculate
        self.q_top, self.stop_prob, self.max_new_tokens = q_top, stop_prob, max_new_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.cache = lm.new_cache()
        self.ids: list[int] = []  # the tokens self.cache holds (batch 1 between calls)
        self.seq = list(prompt_ids)  # committed tokens
        self.n_prompt = len(prompt_ids)
        self.round = -1  # round of the last proposal sent
        self.sent: Proposal | None = None
        self.rows: list[torch.Tensor] = []  # logits [V] after seq + d_1..d_i, i = 0.., for `sent`
        self.table: dict[tuple[int, int, int], Proposal] = {}  # (round, i, t) -> pre-drafted proposal
        self.spec_round = -1  # round whose outcomes `table` covers
        self.hits = self.misses = 0
        self.draft_s = self.spec_s = 0.0

    # ---- public protocol ------------------------------------------------------------------

    def first_proposal(self) -> Proposal:
        """Round 0, drafted after the prompt."""
        if self.sent is not None:
            raise ValueError("first_proposal was already sent: answer outcomes with on_outcome")
        self.round = 0
        self.sent = self._draft_jit()
        return self.sent

    def speculate(self) -> None:
        """Pre-draft the next proposal for the likely outcomes of the proposal just sent."""
        if not self.speculating or self.sent is None or self.spec_round == self.round + 1:
            return
        t0 = time.perf_counter()
        self.spec_round = self.round + 1
        self.table = {}
        d = self.sent.token_ids
        X = self.seq + d
        # 1. glue: the rows of step_probs not computed while drafting (all k+1 after a hit)
        need = len(d) + 1 - len(self.rows)
        if need > 0:
            self.rows = self.rows + list(self._sync(X, need))
        step_probs = torch.stack([self._rank(r) for r in self.rows])  # [k+1, V]
        # 2. predict: the bonus position uses F_k even when this proposal is shorter than k
        fan = self.fanout[: len(d)] + [self.fanout[self.k]]
        keys = predict_outcomes(step_probs, d, fan)
        if keys:
            # 3. branch: draft for every predicted outcome at once
            budgets = [self._budget(len(self.seq) + i + 1) for i, _ in keys]
            props = self._draft_branches(keys, budgets)
            # 4. store
            self.table = {(self.spec_round, i, t): p for (i, t), p in zip(keys, props)}
        self.spec_s += time.perf_counter() - t0

    def on_outcome(self, round: int, accepted: int, token: int) -> Proposal:
        """Commit the verified outcome of `round` and return the proposal for the next round."""
        if self.sent is None:
            raise StaleRound(f"outcome for round {round} before any proposal: call first_proposal first")
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
        # nothing changed above this line: a bad outcome leaves the session as it was
        self.seq += self.sent.token_ids[:accepted] + [token]
        self.round += 1
        hit = self.table.get((self.round, accepted, token))
        self.table = {}
        self.rows = []
        if hit is not None:
            self.hits += 1
            self.sent = hit
            return hit
        self.misses += 1
        self.sent = self._draft_jit()
        return self.sent

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    # ---- drafting -------------------------------------------------------------------------

    def _budget(self, committed: int) -> int:
        """Draft length for a sequence of `committed` tokens: k, or less near max_new_tokens."""
        if self.max_new_tokens is None:
            return self.k
        return max(0, min(self.k, self.max_new_tokens - (committed - self.n_prompt) - 1))

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

    def _draft_jit(self) -> Proposal:
        """Draft just-in-time after the committed prefix (same rule as speculative.draft_step)."""
        t0 = time.perf_counter()
        n = self._budget(len(self.seq))
        logits = self._sync(self.seq, 1)[-1]  # [V]
        self.rows = [logits]
        d, qi, qp = [], [], []
        for i in range(n):
            t, ids, ps, stop = self._pick(logits[None])[0]
            d.append(t), qi.append(ids), qp.append(ps)
            if stop or i == n - 1:
                break
            logits = self._sync(self.seq + d, 1)[-1]
            self.rows.append(logits)
        # rows: i = 0..max(len(d)-1, 0) (the cache holds seq + d_1..d_{n-1}); speculate's glue adds row n
        self.draft_s += time.perf_counter() - t0
        return Proposal(self.round, d, qi if not self.sp.greedy else [], qp if not self.sp.greedy else [])

    def _draft_branches(self, keys: list[tuple[int, int]], budgets: list[int]) -> list[Proposal]:
        """Draft budgets[b] tokens for every branch (i, t) in batched forwards over a shared prefix.

        The cache holds S + d_1..d_k (length L, batch 1). Branch (i, t) puts t at position |S|+i
        and must not see cache columns |S|+i .. L-1 (d_{i+1}..d_k).
        """
        B, K, P, L = len(keys), max(budgets), len(self.seq), self.cache.length
        assert L == len(self.ids) == P + len(self.sent.token_ids)
        toks: list[list[int]] = [[] for _ in range(B)]
        qi: list[list[list[int]]] = [[] for _ in range(B)]
        qp: list[list[list[float]]] = [[] for _ in range(B)]
        if K == 0:
            return [Proposal(self.spec_round, [], [], [], cache_hit=True) for _ in range(B)]
        pos = torch.tensor([P + i for i, _ in keys])  # [B] position of each branch's token t
        mask = torch.ones(B, L + K, dtype=torch.long)  # [B, L+K] cache columns each branch sees
        for b, (i, _) in enumerate(keys):
            mask[b, P + i:L] = 0
        x = torch.tensor([t for _, t in keys])  # [B]
        open_ = [n > 0 for n in budgets]
        # DynamicLayer.update concatenates into new tensors, so the batch-1 tensors survive the
        # branch steps untouched: keep references and put them back (no copy) afterwards
        layers = self.cache.cache.layers
        saved = [(ly.keys, ly.values) for ly in layers] if DynamicLayer and all(type(ly) is DynamicLayer for ly in layers) else None
        self.cache.expand(B)
        try:
            for s in range(K):
                logits = forward_branches(self.cache, x, pos + s, mask[:, : L + s + 1])  # [B, V]
                live = [b for b in range(B) if open_[b]]
                for b, (t, ids, ps, stop) in zip(live, self._pick(logits[live])):
                    toks[b].append(t), qi[b].append(ids), qp[b].append(ps)
                    open_[b] = not stop and len(toks[b]) < budgets[b]
                if not any(open_):
                    break
                x = torch.tensor([tb[-1] if tb else 0 for tb in toks])  # finished branches feed filler
        finally:
            # 4. restore: back to batch 1 holding S + d_1..d_k
            if saved is not None:
                for ly, (kk, vv) in zip(layers, saved):
                    ly.keys, ly.values = kk, vv
                self.cache.length = L
            else:
                _truncate(self.cache, L)
                self.cache.select(0)
        greedy = self.sp.greedy
        return [Proposal(self.spec_round, toks[b], [] if greedy else qi[b], [] if greedy else qp[b], cache_hit=True)
                for b in range(B)]
