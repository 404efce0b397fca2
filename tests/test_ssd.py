"""The SSD drafter on tiny random models: outcome prediction, masked branch drafting, exactness."""

import copy
import random

import pytest
import torch

from specserve.engine import ssd
from specserve.engine.lm import LM
from specserve.engine.sampling import SamplingParams, rejection_sample, warp
from specserve.engine.speculative import KPlan, SpecConfig
from specserve.engine.single import generate
from specserve.engine.ssd import (AcceptanceModel, DraftSession, Proposal, StaleRound, default_fanout,
                                  forward_branches, predict_outcomes, sparse_proposal)
from specserve.models.tiny import tiny_model

from test_engine import V, chi2_pvalue, exact_two_token_law

PROMPTS = ["def add(a, b):\n    return", "Once upon a time, in a land far away, there"]
N = 40


@pytest.fixture(scope="module")
def prompts(tiny):
    tok = tiny["target"].tokenizer
    return [tok(p)["input_ids"] for p in PROMPTS]


def dense_q(prop: Proposal, V: int) -> torch.Tensor:
    """The verifier's view of q': [k, V] rebuilt from the sparse (ids, probs)."""
    q = torch.zeros(len(prop.token_ids), V)
    for i, (ids, ps) in enumerate(zip(prop.q_ids, prop.q_probs)):
        q[i, ids] = torch.tensor(ps)
    return q


def drive(target: LM, sess: DraftSession, prompt, n, sp=SamplingParams(), gen=None, bad=False, plans=None, steps=None):
    """A local target loop (speculative.py's steps 2-4) answering a DraftSession.

    plans(prev, full) -> the KPlan of the next proposal (prev None for round 0; full: every draft
    of the last round accepted); None sends no plans (the session's k). steps() -> how many
    speculation steps run before the outcome (the rest is cut off by it); None: all of them.
    Returns (tokens, stats): accepted and drafted token counts, and `partial_hits`, the cache hits
    on an outcome with a rejection (a branch that had to hide d_{j+1}..d_k from its attention).
    """
    tc, seq, out, acc, drafted, partial, support = target.new_cache(), list(prompt), [], 0, 0, 0, 0
    plan = plans(None, True) if plans else None
    prop = sess.first_proposal(plan)
    while True:
        if steps is None:
            sess.speculate()  # in the server this overlaps the verification below
        else:
            for _ in range(steps()):
                sess.speculate_step()
        d = prop.token_ids
        if plan is not None and sess.stop_prob == 0 and sess.max_new_tokens == n:  # exactly the target's k
            assert len(d) == min(plan.k, n - len(out) - 1), (plan, len(d), len(out))
        if sp.greedy:
            assert prop.q_ids == [] and prop.q_probs == []
        else:  # q' is a distribution over a support holding the drafted token
            assert len(prop.q_ids) == len(prop.q_probs) == len(d)
            assert all(t in ids and abs(sum(ps) - 1) < 1e-5 for t, ids, ps in zip(d, prop.q_ids, prop.q_probs))
            support = max([support] + [len(ids) for ids in prop.q_ids])
        logits = tc.forward(seq[tc.length:] + d, keep=len(d) + 1)  # [k+1, V]
        p = warp(logits, sp.temperature, sp.top_k, sp.top_p)
        q = dense_q(prop, target.vocab_size) if not sp.greedy and d else None
        j, t = rejection_sample(torch.tensor(d, dtype=torch.long), q, p, gen)
        tc.crop(len(seq) + j)
        seq += d[:j] + [t]
        out += d[:j] + [t]
        acc, drafted = acc + j, drafted + len(d)
        if len(out) >= n:
            return out, {"acc": acc, "drafted": drafted, "partial_hits": partial, "support": support}
        if bad:  # malformed outcomes are refused and change nothing
            with pytest.raises(StaleRound, match="round"):
                sess.on_outcome(prop.round + 1, j, t)
            with pytest.raises(StaleRound):
                sess.on_outcome(prop.round - 1, j, t)
            with pytest.raises(ValueError, match="accepted"):
                sess.on_outcome(prop.round, len(d) + 1, t)
            with pytest.raises(ValueError, match="accepted"):
                sess.on_outcome(prop.round, -1, t)
            for bad_token in (target.vocab_size, -1):
                with pytest.raises(ValueError, match="token"):
                    sess.on_outcome(prop.round, j, bad_token)
            with pytest.raises(ValueError, match="KPlan.k"):
                sess.on_outcome(prop.round, j, t, KPlan(65, 1, 1))
        plan = plans(plan, j == len(d)) if plans else None
        prop = sess.on_outcome(prop.round, j, t, plan)
        partial += prop.cache_hit and j < len(d)


def wavering(rng: random.Random, ks=(1, 2, 3)):
    """plans() of a target that changes its mind: every k (asked and announced) drawn from ks."""
    return lambda prev, full: KPlan(rng.choice(ks), rng.choice(ks), rng.choice(ks))


# ---- pure functions -----------------------------------------------------------------------------

def test_predict_outcomes_picks_top_tokens_per_position():
    step = torch.tensor([[0.10, 0.50, 0.20, 0.15, 0.05],   # i=0: d_1 = 1 is excluded
                         [0.40, 0.10, 0.30, 0.20, 0.00],   # i=1: F_1 = 0 skips it
                         [0.05, 0.05, 0.60, 0.25, 0.05],   # i=2: d_3 = 3 excluded
                         [0.30, 0.30, 0.00, 0.20, 0.20]])  # i=3 bonus: tie 0/1 -> lower id first
    keys = predict_outcomes(step, [1, 0, 3], [2, 0, 1, 3])
    assert keys == [(0, 2), (0, 3), (2, 2), (3, 0), (3, 1), (3, 3)]
    assert predict_outcomes(step, [1, 0, 3], [0, 0, 0, 0]) == []
    # a zero-probability token is never a branch, whatever the fan-out
    assert predict_outcomes(step[1:2], [], [5]) == [(0, 0), (0, 2), (0, 3), (0, 1)]


@pytest.mark.parametrize("k", [1, 2, 4, 8, 10])
def test_default_fanout(k):
    F = default_fanout(k)
    assert len(F) == k + 1 and sum(F) <= 8 and all(f >= 0 for f in F)
    assert F[-1] == max(F)
    assert default_fanout(k, budget=20)[0] >= 1
    assert sum(default_fanout(k, budget=3)) == 3


def test_fanout_is_refit_from_measured_acceptance():
    m = AcceptanceModel()
    assert m.fanout(4, 8) == default_fanout(4) == [1, 1, 1, 1, 4]  # unmeasured: the geometric prior
    assert m.fanout(4, 8, min_gain=0.01) == [1, 1, 1, 1, 4]
    # a pair whose drafts are all accepted and whose bonus token is the draft's first choice:
    # one branch covers it, and the budget is not spent on outcomes that do not happen
    for _ in range(200):
        m.observe(4, 4)
        m.observe_rank(True, 0)
    assert m.accept_rate(0) > 0.95 and m.rank_probs(True)[0] > 0.95
    assert m.fanout(4, 8, min_gain=0.01) == [0, 0, 0, 0, 1]
    assert m.fanout(4, 8) == [1, 1, 1, 1, 4]  # no price per branch: the budget is spent all the same
    # a pair that rejects the first draft and recovers the draft's second choice: that costs two
    # branches at position 0 (a position's candidates are taken in rank order)
    m = AcceptanceModel()
    for _ in range(200):
        m.observe(4, 0)
        m.observe_rank(False, 1)
    assert m.accept_rate(0) < 0.05 and m.accept_rate(1) == 0.8  # position 1 was never reached
    assert m.fanout(4, 8, min_gain=0.01) == [2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="budget"):
        m.fanout(4, -1)


def test_the_round_s_doubtful_draft_gets_the_branches_once_confidence_is_measured():
    """A draft whose confident tokens (q >= 0.9) are always accepted and whose doubtful ones (q < 0.5,
    where it stopped early) are rejected half the time: the per-position average spreads the budget,
    the acceptance by confidence puts it where this round's doubtful draft is."""
    m = AcceptanceModel()
    conf = [0.95, 0.95, 0.3]
    assert m.fanout(3, 8, conf=conf) == m.fanout(3, 8)  # unmeasured: confidence changes nothing yet
    for n in range(400):
        m.observe(3, 3 if n % 2 else 2, conf)  # position 2 (q = 0.3) rejected every other round
        m.observe_rank(n % 2 == 1, 0)
    assert m.conf_accept_rate(0.95) > 0.95 and abs(m.conf_accept_rate(0.3) - 0.5) < 0.05
    assert m.stats()["accept_by_conf"][9] > 0.95
    by_conf, by_pos = m.fanout(3, 8, 0.01, conf=conf), m.fanout(3, 8, 0.01)
    assert by_conf[:2] == [0, 0] and by_conf[2] >= 1 and by_conf[3] >= 1  # the confident positions never end a round
    # the same drafts, confident all through: the round ends at the bonus position, nowhere else
    assert m.fanout(3, 8, 0.01, conf=[0.95, 0.95, 0.95]) == [0, 0, 0, 1]
    p_conf = m.outcome_probs(3, conf)
    assert p_conf[0] < 0.05 and p_conf[1] < 0.05 and abs(p_conf[2] - 0.5) < 0.06 and sum(p_conf) == pytest.approx(1)
    assert by_pos != by_conf or m.outcome_probs(3) != p_conf  # what conf adds is not the position model
    with pytest.raises(ValueError, match="one probability per draft"):
        m.fanout(3, 8, conf=[0.5])


def test_sparse_proposal_is_exact_and_normalised():
    probs = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    ids, ps, dense = sparse_proposal(probs, 3)
    assert ids == [1, 3, 4] and abs(sum(ps) - 1) < 1e-6
    assert torch.allclose(dense, torch.tensor([0, 4 / 9, 0, 3 / 9, 2 / 9]))
    assert dense[ids].tolist() == ps  # the verifier rebuilds the exact q'
    assert sparse_proposal(probs, 10)[0] == [1, 3, 4, 0]  # zero mass leaves the support


# ---- the crux: a masked batch of branches equals each branch computed alone --------------------

@pytest.fixture(scope="module")
def sharp():
    """A target with peakier attention than the 0.02-init tiny models (position errors show in its
    argmax too), and a noisy copy of it as a draft that is right about half the time."""
    tm = tiny_model(512, seed=0, init_std=0.1)
    dm = copy.deepcopy(tm)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in dm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return {"target": LM(tm), "noisy": LM(dm)}


def test_forward_branches_matches_unbatched(sharp):
    lm = sharp["target"]
    S, d = [5, 17, 300, 42, 7, 99, 260], [11, 12, 13, 14]
    keys = [(0, 50), (1, 60), (2, 70), (3, 75), (4, 80), (4, 81)]
    follow = [[100 + b, 200 + b] for b in range(len(keys))]  # later steps: each branch's own tokens
    B, P, L = len(keys), len(S), len(S) + len(d)
    c = lm.new_cache()
    c.forward(S + d)
    c.expand(B)
    mask = torch.ones(B, L + 3, dtype=torch.long)  # [B, L+3]
    for b, (i, _) in enumerate(keys):
        mask[b, P + i:L] = 0  # branch (i, t) must not see d_{i+1}..d_k
    pos = torch.tensor([P + i for i, _ in keys])  # [B]
    x = torch.tensor([t for _, t in keys])  # [B]
    for s in range(3):
        got = forward_branches(c, x, pos + s, mask[:, : L + s + 1])  # [B, V]
        for b, (i, t) in enumerate(keys):
            with torch.inference_mode():
                want = lm.model(torch.tensor([S + d[:i] + [t] + follow[b][:s]])).logits[0, -1].float()
            assert torch.allclose(got[b], want, atol=1e-4), (s, keys[b], (got[b] - want).abs().max())
        if s < 2:
            x = torch.tensor([f[s] for f in follow])


@pytest.mark.parametrize("k, restore", [(2, "refs"), (4, "refs"), (4, "crop")])
def test_cached_branches_equal_fresh_jit_drafts(sharp, prompts, k, restore, monkeypatch):
    if restore == "crop":  # the fallback for cache layers other than DynamicLayer
        monkeypatch.setattr(ssd, "DynamicLayer", None)
    lm = sharp["target"]
    sess = DraftSession(lm, prompts[0], SamplingParams(), k=k, fanout=[2] * k + [3])
    d = sess.first_proposal().token_ids
    sess.speculate()
    assert len(sess.table) == 2 * k + 3 and sess.cache.length == len(prompts[0]) + k
    assert all(layer.keys.shape[0] == 1 for layer in sess.cache.cache.layers)  # batch 1 again
    for (r, i, t), (prop, final) in sess.table.items():
        assert r == 1 and prop.round == 1 and prop.cache_hit and len(prop.token_ids) == k
        assert i == k or t != d[i]
        fresh = DraftSession(lm, prompts[0] + d[:i] + [t], SamplingParams(), k=k, speculate=False)
        assert prop.token_ids == fresh.first_proposal().token_ids, (i, t)


# ---- k has one owner: the session drafts the target's k, and a cut is not a rejection ----------

def test_the_targets_k_is_drafted_and_a_short_round_is_not_a_rejection(tiny, prompts):
    """The issue-13 bug: the target cut a proposal of 4 to its own k = 2 and the draft then took
    "2 accepted" for a rejection at position 2, excluding d_3 there; when the bonus token was d_3
    (the draft agreeing with the target), the next round was a certain miss."""
    draft, ids = tiny["draft-random"], prompts[0]
    cont = [t for c in generate(draft, None, ids, 12, spec=SpecConfig(mode="ar")) for t in c.token_ids]
    sess = DraftSession(draft, ids, SamplingParams(), k=4)  # the session's own k is 4 ...
    p0 = sess.first_proposal(KPlan(2, 3, 1))  # ... but the target asks for 2, then 3 after a full accept
    assert p0.token_ids == cont[:2]
    sess.speculate()
    assert (1, 2, cont[2]) in sess.table  # the bonus position predicts d_3 itself
    assert len(sess.table[1, 2, cont[2]][0].token_ids) == 3  # drafted to the plan's next k
    p1 = sess.on_outcome(0, 2, cont[2], KPlan(3, 1, 1))
    assert p1.cache_hit and not p1.late and p1.token_ids == cont[3:6]
    # the target changed its mind: a shorter k is the branch cut, a longer one the branch drawn on
    sess.speculate()
    p2 = sess.on_outcome(1, 3, cont[6], KPlan(4, 1, 1))  # branches were drafted to 1 token
    assert p2.cache_hit and p2.late and p2.token_ids == cont[7:11]
    assert (sess.hits, sess.late_hits, sess.misses) == (2, 1, 0)
    # k = 0: no drafts this round, and the round after is still speculated for
    sess.speculate()
    p3 = sess.on_outcome(2, 4, cont[11], KPlan(0, 2, 2))
    assert p3.token_ids == [] and p3.cache_hit
    sess.speculate()
    assert sess.table and all(i == 0 for _, i, _ in sess.table)


# ---- end to end: a target loop driving the session is token-identical to AR --------------------

@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("pair", ["same", "random", "noisy"])
def test_greedy_ssd_is_token_identical_to_ar(tiny, sharp, prompts, k, pair):
    target, draft = {"same": (tiny["target"], tiny["draft-same"]), "random": (tiny["target"], tiny["draft-random"]),
                     "noisy": (sharp["target"], sharp["noisy"])}[pair]
    hits = misses = partial = 0
    for ids in prompts:
        ar = [t for c in generate(target, None, ids, N, spec=SpecConfig(mode="ar")) for t in c.token_ids]
        sess = DraftSession(draft, ids, SamplingParams(), k=k, max_new_tokens=N)
        out, st = drive(target, sess, ids, N)
        assert out == ar and len(out) == N
        assert sum(sess.acceptance.conf_offered) > 0  # the outcomes taught the acceptance by confidence
        hits, misses, partial = hits + sess.hits, misses + sess.misses, partial + st["partial_hits"]
        if pair == "same":  # every outcome is "all accepted + target argmax", which the draft predicts
            assert st["acc"] == st["drafted"]  # cached proposals are right, not just present
            assert sess.hit_rate > 0.8, (sess.hits, sess.misses)
    if pair == "noisy":  # rejections happen, and some are answered from masked branches
        assert partial >= 1 and hits >= (hits + misses) // 4, (hits, misses, partial)


@pytest.mark.parametrize("pair, restore", [("same", "refs"), ("noisy", "refs"), ("noisy", "crop")])
def test_greedy_ssd_with_a_wavering_k_and_interrupted_speculation(tiny, sharp, prompts, pair, restore, monkeypatch):
    """Every path an outcome can take: before speculation, mid-speculation (its branch drafted on
    alone, or dropped), after it; a branch cut to a shorter k or drawn on to a longer one."""
    if restore == "crop":
        monkeypatch.setattr(ssd, "DynamicLayer", None)
    target, draft = {"same": (tiny["target"], tiny["draft-same"]), "noisy": (sharp["target"], sharp["noisy"])}[pair]
    rng = random.Random(5)
    hits = late = misses = 0
    for ids in prompts:
        ar = [t for c in generate(target, None, ids, N, spec=SpecConfig(mode="ar")) for t in c.token_ids]
        sess = DraftSession(draft, ids, SamplingParams(), k=4, max_new_tokens=N)
        out, _ = drive(target, sess, ids, N, plans=wavering(rng, (1, 2, 3, 5)), steps=lambda: rng.randrange(6))
        assert out == ar
        assert all(layer.keys.shape[0] == 1 for layer in sess.cache.cache.layers)
        hits, late, misses = hits + sess.hits, late + sess.late_hits, misses + sess.misses
    assert late >= 1 and hits - late >= 1 and misses >= 1, (hits, late, misses)


@pytest.mark.parametrize("draft_name", ["draft-same", "draft-random"])
def test_no_speculation_means_no_hits_same_output(tiny, prompts, draft_name):
    target, ids = tiny["target"], prompts[1]
    ar = [t for c in generate(target, None, ids, N, spec=SpecConfig(mode="ar")) for t in c.token_ids]
    sess = DraftSession(tiny[draft_name], ids, SamplingParams(), k=3, speculate=False, max_new_tokens=N)
    out, _ = drive(target, sess, ids, N)
    assert out == ar and sess.hits == 0 and sess.misses > 0 and sess.spec_s == 0


def test_bad_outcomes_are_refused_and_the_session_goes_on(sharp, prompts):
    target, ids = sharp["target"], prompts[0]
    ar = [t for c in generate(target, None, ids, N, spec=SpecConfig(mode="ar")) for t in c.token_ids]
    sess = DraftSession(sharp["noisy"], ids, SamplingParams(), k=4, max_new_tokens=N)
    out, st = drive(target, sess, ids, N, bad=True)
    assert out == ar and sess.hits >= 1
    with pytest.raises(ValueError, match="first_proposal"):
        sess.first_proposal()


def test_early_stop_and_budget_shorten_proposals(tiny, prompts):
    target, ids = tiny["target"], prompts[1]
    ar = [t for c in generate(target, None, ids, 9, spec=SpecConfig(mode="ar")) for t in c.token_ids]
    drafted = {}
    for stop_prob in (0.0, 0.003):  # the tiny models are near-uniform over 512 tokens: p ~ 0.002
        sess = DraftSession(tiny["draft-random"], ids, SamplingParams(), k=5, stop_prob=stop_prob, max_new_tokens=9)
        out, st = drive(target, sess, ids, 9)
        assert out == ar and len(out) == 9
        drafted[stop_prob] = st["drafted"]
    assert drafted[0.003] < drafted[0.0]


@pytest.mark.parametrize("kwargs, field", [({"fanout": [1, 2]}, "fanout"), ({"fanout": [1, -1, 2, 3, 4]}, "fanout"),
                                           ({"k": 0}, "k"), ({"q_top": 0}, "q_top"), ({"stop_prob": 1.0}, "stop_prob"),
                                           ({"max_new_tokens": 0}, "max_new_tokens"), ({"prompt_ids": []}, "prompt"),
                                           ({"prompt_ids": [1, 10 ** 6]}, "prompt token ids")])
def test_bad_session_arguments(tiny, kwargs, field):
    args = {"prompt_ids": [1, 2, 3], "sampling": SamplingParams(), **kwargs}
    with pytest.raises(ValueError, match=field):
        DraftSession(tiny["draft-random"], **args)


# ---- sampling: the first two tokens through SSD follow the target's exact law -------------------



def test_ssd_sampling_with_truncated_q_matches_target_law():
    sp = SamplingParams(1.0)
    target = LM(tiny_model(V, seed=1, init_std=0.5))
    draft = LM(tiny_model(V, seed=2, layers=1, init_std=0.5))
    prompt, draws = [1, 2, 3], 1000
    counts, hits, misses, support = torch.zeros(V * V), 0, 0, 0
    for seed in range(draws):
        sess = DraftSession(draft, prompt, sp, k=2, fanout=[2, 2, 2], seed=seed, q_top=3, max_new_tokens=3)
        out, st = drive(target, sess, prompt, 3, sp, torch.Generator().manual_seed(10 ** 6 + seed))
        counts[out[0] * V + out[1]] += 1
        hits, misses, support = hits + sess.hits, misses + sess.misses, max(support, st["support"])
    law = exact_two_token_law(target.model, prompt, sp)
    assert support == 3  # q' really is truncated (V = 6)
    assert hits > 500 and misses >= 10  # both the cache and the just-in-time path were used (~900 / ~75)
    assert chi2_pvalue(counts, law) > 1e-3
    other = exact_two_token_law(tiny_model(V, seed=3, init_std=0.5), prompt, sp)
    assert chi2_pvalue(counts, other) < 1e-6  # the check has power


def test_ssd_sampling_law_holds_whatever_k_the_target_asks_for_and_when():
    """The target's k differs from what it announced (branches cut and drawn on), and outcomes
    arrive before, during and after speculation: the law of the first two tokens is the target's."""
    sp = SamplingParams(1.0)
    target = LM(tiny_model(V, seed=1, init_std=0.5))
    draft = LM(tiny_model(V, seed=2, layers=1, init_std=0.5))
    prompt, draws, rng = [1, 2, 3], 1000, random.Random(0)
    counts, late, hits = torch.zeros(V * V), 0, 0
    for seed in range(draws):
        sess = DraftSession(draft, prompt, sp, k=2, seed=seed, q_top=3, max_new_tokens=4)
        out, _ = drive(target, sess, prompt, 4, sp, torch.Generator().manual_seed(10 ** 6 + seed),
                       plans=wavering(rng, (1, 2, 3)), steps=lambda: rng.randrange(5))
        counts[out[0] * V + out[1]] += 1
        late, hits = late + sess.late_hits, hits + sess.hits
    assert late > 100 and hits - late > 100, (hits, late)  # drawn on, and served as drafted
    assert chi2_pvalue(counts, exact_two_token_law(target.model, prompt, sp)) > 1e-3
