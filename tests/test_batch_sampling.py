"""Batched rejection sampling: equal to rejection_sample row by row; the law holds inside a batch."""

import pytest
import torch
from scipy.stats import chisquare

import specserve.engine.engine as engine_mod
from specserve.engine.engine import Engine, run_to_completion
from specserve.engine.lm import LM
from specserve.engine.sampling import (PLACEHOLDER, SamplingParams, batched_rejection_sample, rejection_sample, warp,
                                       warp_rows)
from specserve.engine.sequence import Request, SpeculationParams
from specserve.models.tiny import tiny_model

V = 6


def ragged_case(seed, ks, V=7, point_mass=False):
    g = torch.Generator().manual_seed(seed)
    qs = [torch.softmax(torch.randn(k, V, generator=g) * 2, -1) for k in ks]  # [k, V] each
    ps = [torch.softmax(torch.randn(k + 1, V, generator=g) * 2, -1) for k in ks]  # [k+1, V] each
    ds = [torch.multinomial(q, 1, generator=g)[:, 0] if k else torch.empty(0, dtype=torch.long) for q, k in zip(qs, ks)]
    return ds, (None if point_mass else qs), ps


@pytest.mark.parametrize("point_mass", [False, True])
def test_batched_sampler_equals_rejection_sample_row_by_row(point_mass):
    ks = [3, 0, 2, 5, 1]
    for trial in range(60):
        ds, qs, ps = ragged_case(trial, ks, point_mass=point_mass)
        gens = [torch.Generator().manual_seed(100 * trial + b) for b in range(len(ks))]
        n, tok, out = batched_rejection_sample(torch.cat(ds), ks, None if qs is None else torch.cat(qs),
                                               torch.cat(ps), gens)
        assert out.shape == (len(ks), max(ks) + 1)
        for b, k in enumerate(ks):
            g = torch.Generator().manual_seed(100 * trial + b)
            nb, tb = rejection_sample(ds[b], None if qs is None else qs[b], ps[b], g)
            assert (int(n[b]), int(tok[b])) == (nb, tb)
            assert out[b].tolist() == ds[b][:nb].tolist() + [tb] + [PLACEHOLDER] * (max(ks) - nb)
            residual = ps[b][nb] if nb == k else (ps[b][nb] - (qs[b][nb] if qs else 0)).clamp(min=0)
            if residual.max() < residual.sum():  # not a point mass: both drew the same numbers
                assert torch.equal(g.get_state(), gens[b].get_state())


def test_greedy_rows_draw_nothing_and_take_the_argmax():
    ds, _, ps = ragged_case(0, [2, 3])
    ps = [warp(torch.log(p), 0.0) for p in ps]  # one-hot targets
    ds = [p[:-1].argmax(-1) for p in ps]  # drafts that match, so all are accepted
    ds[1][1] = (ds[1][1] + 1) % 7  # row 1: its second draft is wrong
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    states = [g.get_state() for g in gens]
    n, tok, _ = batched_rejection_sample(torch.cat(ds), [2, 3], None, torch.cat(ps), gens, greedy=[True, True])
    assert n.tolist() == [2, 1] and tok.tolist() == [int(ps[0][2].argmax()), int(ps[1][1].argmax())]
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))


def test_warp_rows_warps_each_sequence_with_its_own_params():
    logits = torch.randn(5, 11)
    params = [SamplingParams(0.0), SamplingParams(0.7, top_k=3), SamplingParams(1.0, top_p=0.8)]
    out = warp_rows(logits, params, [2, 1, 2])
    rows = [0, 0, 1, 2, 2]
    for i, b in enumerate(rows):
        sp = params[b]
        torch.testing.assert_close(out[i], warp(logits[i], sp.temperature, sp.top_k, sp.top_p))


# ---- the law of a sequence's first two tokens inside a batch ------------------------------------

def exact_two_token_law(model, prompt, sp):
    with torch.inference_mode():
        p1 = warp(model(torch.tensor([prompt])).logits[0, -1], sp.temperature, sp.top_k, sp.top_p)
        law = torch.zeros(V, V)
        for t1 in range(V):
            law[t1] = p1[t1] * warp(model(torch.tensor([prompt + [t1]])).logits[0, -1], sp.temperature, sp.top_k,
                                    sp.top_p)
    return law.flatten()


def chi2_pvalue(counts, law):
    expected = law * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.fixture(scope="module")
def pair():
    # draft seed 3: far enough from the target that skipping the residual moves the law a lot
    return LM(tiny_model(V, seed=1, init_std=0.5)), LM(tiny_model(V, seed=3, layers=1, init_std=0.5))


def batched_counts(pair, sp, draws=1500):
    """Counts of (t1, t2) of `draws` seeded requests for prompt [1, 2, 3], each run among companions:
    other prompts, greedy and sampled, fixed and scheduler-chosen k, all in one engine."""
    target, draft = pair
    eng = Engine(target, draft, max_num_seqs=8, max_model_len=64, max_queue_len=4 * draws, probe=False)
    reqs = []
    for seed in range(draws):
        reqs.append(Request([1, 2, 3], 2, sampling=sp, seed=seed, spec=SpeculationParams("sd", k=3 if seed % 2 else None)))
        if seed % 3 == 0:
            reqs.append(Request([4, 0, 5, 2], 3, sampling=SamplingParams(0.0 if seed % 2 else 1.3), seed=seed + 7,
                                spec=SpeculationParams("sd" if seed % 4 else "ar", k=2)))
    res = run_to_completion(eng, reqs)
    counts = torch.zeros(V * V)
    for ids, _, s in res.values():
        if s.prompt_len == 3:
            counts[ids[0] * V + ids[1]] += 1
    assert counts.sum() == draws and eng.stats.to_dict(eng)["mean_batch"] > 4 and eng.stats.draft_tokens > draws
    return counts


@pytest.mark.parametrize("sp", [SamplingParams(1.0), SamplingParams(0.8, top_k=4, top_p=0.9)], ids=["t1", "warped"])
def test_sampling_inside_a_batch_keeps_the_targets_law(pair, sp):
    assert chi2_pvalue(batched_counts(pair, sp), exact_two_token_law(pair[0].model, [1, 2, 3], sp)) > 1e-3


def skip_the_residual(draft_ids, num_drafts, draft_probs, target_probs, generators, greedy=None):
    """A planted wrong sampler: at a rejection it samples from p instead of norm(max(0, p - q))."""
    B = len(num_drafts)
    n, tok, out = batched_rejection_sample(draft_ids, num_drafts, draft_probs, target_probs, generators, greedy)
    starts = torch.cumsum(torch.tensor(num_drafts), 0) - torch.tensor(num_drafts) + torch.arange(B)
    for b in range(B):
        if int(n[b]) < num_drafts[b]:
            tok[b] = torch.multinomial(target_probs[starts[b] + n[b]], 1, generator=generators[b])[0]
            out[b, n[b]] = tok[b]
    return n, tok, out


def test_the_law_test_fails_for_a_sampler_that_skips_the_residual(pair, monkeypatch):
    sp = SamplingParams(1.0)
    monkeypatch.setattr(engine_mod, "batched_rejection_sample", skip_the_residual)
    assert chi2_pvalue(batched_counts(pair, sp), exact_two_token_law(pair[0].model, [1, 2, 3], sp)) < 1e-6


@pytest.mark.parametrize("mode, k", [("ar", None), ("sd", 2)])
def test_a_seeded_request_gets_the_same_tokens_with_and_without_companions(tiny, mode, k):
    target, draft = tiny["target"], tiny["draft-random"]
    tok = target.tokenizer
    sp = SamplingParams(1.0, top_k=50)

    def req(text, seed, sampling=sp):
        return Request(tok(text)["input_ids"], 16, sampling=sampling, seed=seed, spec=SpeculationParams(mode, k))

    alone = run_to_completion(Engine(target, draft, max_num_seqs=4, max_model_len=256), [req("The quick brown", 5)])
    crowd = run_to_completion(Engine(target, draft, max_num_seqs=4, max_model_len=256),
                              [req("Once upon a time", 1), req("The quick brown", 5), req("def f(x):", 2, SamplingParams()),
                               req("x = 1", 3, SamplingParams(0.5))])
    mine = next(iter(alone.values()))[0]
    assert mine == list(crowd.values())[1][0]
    other = run_to_completion(Engine(target, draft, max_num_seqs=4, max_model_len=256), [req("The quick brown", 6)])
    assert next(iter(other.values()))[0] != mine  # the seed matters: the check above can fail
