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

import hashlib
from itertools import accumulate

import torch

from .device import draw, to_device

__all__ = ["SamplingParams", "warp", "sample", "rejection_sample", "warp_rows", "batched_rejection_sample",
           "PLACEHOLDER", "resume_seed"]


def resume_seed(seed: int | None, position: int) -> int | None:
    """The seed of a generation resumed after `position` committed output tokens (None: unseeded).

    A continuation must not replay the draws its first attempt made from `seed` (they decided the
    tokens it continues from, so reusing them would tie the continuation to them and break the
    target's law); mixing in the position gives fresh draws, the same ones for the same resume point.
    """
    if seed is None or position == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits, as the API's seeds


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


# ---- batched: many sequences per call (continuous batching) ------------------------------------

PLACEHOLDER = -1  # output_ids entry after a row's last committed token (its rejected tail)


def warp_rows(logits: torch.Tensor, params: list[SamplingParams], counts: list[int]) -> torch.Tensor:
    """Warp logits [M, V] whose rows belong to sequences: sequence b owns counts[b] consecutive rows
    and warps them with params[b]. Rows with equal params are warped in one call. Returns [M, V]."""
    assert sum(counts) == logits.shape[0], f"counts sum to {sum(counts)}, logits have {logits.shape[0]} rows"
    groups: dict[tuple, list[int]] = {}
    start = 0
    for sp, c in zip(params, counts):
        groups.setdefault((sp.temperature, sp.top_k, sp.top_p), []).extend(range(start, start + c))
        start += c
    if len(groups) == 1:
        return warp(logits, *next(iter(groups)))
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # [M, V]
    for key, rows in groups.items():
        idx = to_device(rows, logits.device)
        out[idx] = warp(logits[idx], *key)
    return out


def batched_rejection_sample(
    draft_ids: torch.Tensor,
    num_drafts: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generators: list[torch.Generator | None],
    greedy: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rejection_sample` for B sequences at once, with ragged draft lengths.

    draft_ids    [N] long       the rows' drafts back to back; row b has num_drafts[b] = k_b (may be 0).
    draft_probs  [N, V] | None  q of each draft token; None = point masses (greedy or n-gram drafts).
    target_probs [N + B, V]     row b's k_b + 1 target rows back to back (the last is the bonus position).
    generators   [B]            row b's draws use generators[b] only, so a seeded sequence gets the
                                same tokens whatever its companions.
    greedy       [B] | None     rows whose target probs are one-hot: no random number is drawn.

    Returns (n_accepted [B], next_token [B], output_ids [B, max_k + 1]); output_ids[b] is
    d_1..d_n, the recovered or bonus token, then PLACEHOLDER. Everything stays on target_probs'
    device and nothing is read back to the host (the caller reads the outputs once): the index
    arithmetic is done in host ints and copied once (`device.to_device`), draws use `device.draw`.
    Row by row this equals rejection_sample given the same generator state, with one difference
    in generator use only: a non-greedy row whose final distribution is a point mass draws one
    multinomial sample (rejection_sample skips it; the token is the same).
    """
    B, dev = len(num_drafts), target_probs.device
    greedy = greedy or [False] * B
    assert target_probs.shape[0] == sum(num_drafts) + B, "target_probs needs k_b + 1 rows per sequence"
    K, N = max(num_drafts, default=0), sum(num_drafts)  # host ints: no read from the device
    d_off = list(accumulate([0] + list(num_drafts[:-1])))  # [B] first draft of each row
    t_off = [d + b for b, d in enumerate(d_off)]  # [B] first target row of each row
    row_of = [b for b, k in enumerate(num_drafts) for _ in range(k)]  # [N]
    j_of = [j for k in num_drafts for j in range(k)]  # [N] draft index within its row
    t_row = [t_off[b] + j for b, j in zip(row_of, j_of)]  # [N] target row of each draft
    ix = to_device(row_of + j_of + t_row + list(num_drafts) + d_off + t_off, dev)  # one host -> device copy
    row_of, j_of, t_row = ix[:N], ix[N:2 * N], ix[2 * N:3 * N]
    kd, d_off, t_off = ix[3 * N:3 * N + B], ix[3 * N + B:3 * N + 2 * B], ix[3 * N + 2 * B:]
    draft_ids = draft_ids.to(dev)
    flat = torch.arange(N, device=dev)
    p = target_probs[t_row, draft_ids]  # [N]
    q = torch.ones(N, device=dev) if draft_probs is None else draft_probs[flat, draft_ids].float()  # [N]
    u = [torch.zeros(k, device=dev) if g_b else torch.rand(k, generator=gen, device=dev)
         for k, gen, g_b in zip(num_drafts, generators, greedy) if k]
    u = torch.cat(u) if u else torch.empty(0, device=dev)  # [N]
    ok = torch.zeros(B, K, dtype=torch.long, device=dev)  # [B, K], 0 past each row's k_b
    ok[row_of, j_of] = (u * q < p).long()
    n = ok.cumprod(1).sum(1) if K else torch.zeros(B, dtype=torch.long, device=dev)  # [B] accepted
    rows = torch.arange(B, device=dev)
    base = target_probs[t_off + n]  # [B, V] p at the first rejected (or bonus) position
    rejected = n < kd  # [B]
    at = (d_off + torch.minimum(n, (kd - 1).clamp(min=0))).clamp(max=max(N - 1, 0))  # [B]
    residual = base.clone()  # [B, V]
    if N:
        if draft_probs is None:
            residual.index_put_((rows, draft_ids[at]), base.new_zeros(()))  # p - one_hot(d), clipped at 0
            # (a Python 0.0 here would be lifted from the host: no host data outside to_device)
        else:
            residual = (residual - draft_probs[at].float()).clamp_(min=0.0)
    total = residual.sum(-1, keepdim=True)  # [B, 1]
    use_res = rejected[:, None] & (total > 0)  # [B, 1] p == q up to rounding: draw from p
    dist = torch.where(use_res, residual / total.clamp(min=1e-30), base)  # [B, V]
    token = dist.argmax(-1)  # [B]
    for b, (gen, g_b) in enumerate(zip(generators, greedy)):
        if not g_b:
            token[b] = draw(dist[b], gen)  # = multinomial(dist[b], 1), without its host reads
    out = torch.full((B, K + 1), PLACEHOLDER, dtype=torch.long, device=dev)  # [B, K+1]
    if N:
        keep = j_of < n[row_of]  # [N]
        out[row_of, j_of] = torch.where(keep, draft_ids, PLACEHOLDER)
    out[rows, n] = token
    return n, token, out
