"""Sampling as pure functions: warp logits into probabilities, and rejection-sample a draft.

Vocabulary (as in vLLM's rejection sampler):
  accepted  -- a draft token the target keeps.
  recovered -- the token sampled from norm(max(0, p - q)) at the first rejected position.
  bonus     -- the token sampled from the target's own distribution after all k drafts were kept.

Every round therefore yields `n_accepted + 1` tokens: the accepted drafts plus one recovered or
bonus token. Greedy decoding is the temperature-0 case: `warp` returns a one-hot on the argmax,
and rejection sampling reduces to a prefix match against the target's argmax. A point-mass
drafter (n-gram, fallback) is the case where q is one-hot.

This module knows nothing about models, caches or tokenizers: tensors in, tensors out.
"""

from __future__ import annotations

import torch

__all__ = ["SamplingParams", "warp", "sample", "rejection_sample"]


class SamplingParams:
    """Validated warping parameters; `temperature == 0` means greedy."""

    __slots__ = ("temperature", "top_k", "top_p")

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
        if temperature is None or not temperature >= 0:  # also catches NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is None or top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if top_p is None or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __repr__(self) -> str:
        return f"SamplingParams(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p})"


def warp(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Turn logits [..., V] into probabilities [..., V] (float32).

    temperature 0 -> one-hot on the argmax (ties go to the lowest id, like torch.argmax).
    Otherwise softmax(logits / T) restricted to the top_k tokens (0 = all) and to the smallest
    set whose mass reaches top_p (1 = all), renormalised.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # Shift the max to 0 first: a tiny temperature then sends the others to -inf (the greedy limit)
    # instead of overflowing to inf - inf = NaN. Softmax, top-k and top-p are shift-invariant.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = (cum - sorted_p) >= top_p  # mass before this token already reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token id from probs [V]; a one-hot needs no random number."""
    if probs.max() >= 1.0:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def rejection_sample(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Verify k draft tokens against the target; return (n_accepted, next_token).

    draft_ids    [k]       long, the proposal d_1..d_k (k may be 0).
    draft_probs  [k, V]    q_i, the distribution each d_i was sampled from; None = point mass.
    target_probs [k+1, V]  p_i, the target's warped distribution at each draft position, plus
                           one more row for the bonus position.

    d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)). At the first rejection the
    recovered token comes from norm(max(0, p_i - q_i)); if all k are accepted the bonus token
    comes from p_{k+1}. The output tokens are distributed exactly as sampling from p alone.
    """
    k = draft_ids.shape[0]
    assert target_probs.shape[0] == k + 1, f"target_probs needs k+1={k + 1} rows, got {target_probs.shape[0]}"
    rows = torch.arange(k)
    p = target_probs[rows, draft_ids]  # [k]
    q = torch.ones(k) if draft_probs is None else draft_probs[rows, draft_ids].float()  # [k]
    u = torch.rand(k, generator=generator) if k else torch.empty(0)  # [k]
    ok = u * q < p  # u < p/q without dividing; p >= q always accepts
    n = int(ok.long().cumprod(0).sum()) if k else 0
    if n == k:
        return k, sample(target_probs[k], generator)  # bonus
    residual = target_probs[n].clone()
    if draft_probs is None:
        residual[draft_ids[n]] = 0.0  # p - one_hot(d), clipped at 0
    else:
        residual = (residual - draft_probs[n].float()).clamp_(min=0.0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding: any draw from p is correct
        return n, sample(target_probs[n], generator)
    return n, sample(residual / total, generator)  # recovered
