"""warp and rejection_sample: hand-built cases, determinism, and distribution tests."""

import pytest
import torch
from scipy.stats import chisquare

from specserve.engine.sampling import SamplingParams, rejection_sample, sample, warp

V = 10


def one_hot(i: int, v: int = V) -> torch.Tensor:
    return torch.zeros(v).scatter_(0, torch.tensor([i]), 1.0)


def rows(*ids: int) -> torch.Tensor:
    return torch.stack([one_hot(i) for i in ids])


# ---- warp ------------------------------------------------------------------------------------

def test_warp_greedy_is_one_hot_on_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 5.0, 1.0, 0.0]])
    probs = warp(logits, temperature=0)
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]  # ties go to the lowest id


def test_warp_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(warp(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-6)
    assert torch.allclose(warp(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    # top_p=0.8: 0.5 + 0.3 reaches 0.8, the rest is cut
    assert torch.allclose(warp(logits, 1.0, top_p=0.8), torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    assert torch.allclose(warp(logits, 1.0, top_p=0.81), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-6)
    hot = warp(logits, 0.5)
    assert hot[0] > 0.5 and torch.isclose(hot.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
])
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


# ---- rejection_sample: hand-built cases --------------------------------------------------------

@pytest.mark.parametrize("t", [1e-30, 1e-45, 100.0])
def test_warp_extreme_temperatures_stay_distributions(t):
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-3], [0.0, 0.0, -5.0, 1e4]])
    p = warp(logits, temperature=t, top_p=0.9)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(2))
    if t < 1:  # the greedy limit: all mass on the argmax
        assert p.argmax(-1).tolist() == [1, 3] and (p.max(-1).values > 0.999).all()


def test_all_accepted_gives_bonus_token():
    d = torch.tensor([3, 1, 4])
    n, t = rejection_sample(d, rows(3, 1, 4), rows(3, 1, 4, 7))
    assert (n, t) == (3, 7)  # three accepted, bonus = argmax of the 4th row


def test_first_rejected_gives_recovered_target_token():
    d = torch.tensor([5, 1])
    n, t = rejection_sample(d, rows(5, 1), rows(3, 1, 4))
    assert (n, t) == (0, 3)


def test_second_rejected():
    n, t = rejection_sample(torch.tensor([3, 2, 9]), None, rows(3, 8, 9, 0))
    assert (n, t) == (1, 8)


def test_k_zero_is_a_plain_target_sample():
    assert rejection_sample(torch.tensor([], dtype=torch.long), None, rows(6)) == (0, 6)


def test_draft_at_least_as_likely_under_target_is_always_accepted():
    g = torch.Generator().manual_seed(0)
    p = torch.full((2, V), 1.0 / V)
    q = torch.full((1, V), 1.0 / V)
    q[0, 2] = 0.05  # q(d) < p(d): accepted with probability 1
    for _ in range(200):
        n, _t = rejection_sample(torch.tensor([2]), q, p, g)
        assert n == 1


def test_recovered_token_never_equals_a_rejected_point_mass_draft():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, V, generator=g), -1)
    for _ in range(300):
        n, t = rejection_sample(torch.tensor([4]), None, p, g)
        assert n == 1 or t != 4


def test_seeded_determinism():
    g0 = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(4, V, generator=g0), -1)
    q = torch.softmax(torch.randn(3, V, generator=g0), -1)
    d = torch.tensor([1, 2, 3])

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [rejection_sample(d, q, p, g) for _ in range(50)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


# ---- distribution tests ---------------------------------------------------------------------

def _recovered_from_p(draft_ids, draft_probs, target_probs, generator=None):
    """A deliberately wrong sampler: on rejection it resamples from p instead of max(0, p - q)."""
    n, _ = rejection_sample(draft_ids, draft_probs, target_probs, generator)
    if n == draft_ids.shape[0]:
        return n, _
    return n, sample(target_probs[n], generator)


def first_token_counts(sampler, p, q, n_draws, seed):
    """Draft d_1..d_k from q, verify, and count the first emitted token."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    k = q.shape[0]
    for _ in range(n_draws):
        d = torch.tensor([sample(q[i], g) for i in range(k)])
        n, t = sampler(d, q, p, g)
        counts[int(d[0]) if n > 0 else t] += 1
    return counts


def fixed_pq(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(k + 1, V, generator=g), -1)  # target, peaky
    q = torch.softmax(2 * torch.randn(k, V, generator=g), -1)  # a quite different draft
    return p, q


@pytest.mark.parametrize("k", [1, 3])
def test_output_distribution_matches_target(k):
    p, q = fixed_pq(k)
    counts = first_token_counts(rejection_sample, p, q, 20_000, seed=k)
    assert chisquare(counts, p[0] * counts.sum()).pvalue > 1e-3


def test_distribution_test_catches_a_wrong_sampler():
    p, q = fixed_pq(1)
    counts = first_token_counts(_recovered_from_p, p, q, 20_000, seed=1)
    assert chisquare(counts, p[0] * counts.sum()).pvalue < 1e-6


def test_point_mass_draft_distribution_matches_target():
    p, _ = fixed_pq(1, seed=3)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for i in range(20_000):
        d = torch.tensor([i % V])  # a deterministic drafter: q = one-hot(d)
        n, t = rejection_sample(d, None, p, g)
        counts[int(d[0]) if n else t] += 1
    # every draft token is equally often proposed, so the expected output law is still p_1
    assert chisquare(counts, p[0] * counts.sum()).pvalue > 1e-3
