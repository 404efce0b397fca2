"""The cost model and the k policy (synthetic costs), and the scheduler's queues (no models)."""

import pytest

from specserve.engine.scheduler import CostModel, KPolicy, LinearCost, MeasuredCost, QueueFull, Scheduler, expected_tokens
from specserve.engine.sequence import Request, Sequence, SpeculationParams


def policy(target_c0, target_c1, draft_c0, draft_c1, k=0, hysteresis=0.05, k_max=8):
    cost = CostModel(LinearCost(target_c0, target_c1), LinearCost(draft_c0, draft_c1))
    return KPolicy(cost, k_max=k_max, hysteresis=hysteresis, k=k)


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_linear_cost_learns_from_observations_and_keeps_its_prior_without_them():
    c = LinearCost(1.0, 0.1, span=40)
    assert c.predict(10) == pytest.approx(2.0)
    for _ in range(200):
        for n in (1, 8, 24, 40):
            c.observe(n, 0.3 + 0.02 * n)
    c0, c1 = c.coefficients()
    assert c0 == pytest.approx(0.3, rel=0.15) and c1 == pytest.approx(0.02, rel=0.15)  # the prior still weighs a little


def test_k_falls_to_0_when_verification_is_expensive_for_the_acceptance():
    # every verified token costs as much as the fixed part: drafts never pay off at a = 0.6
    p = policy(1.0, 1.0, 0.1, 0.01, k=4)
    assert p.choose([(0.6, None)] * 8) == 0
    assert p.rate(0, [(0.6, None)] * 8) > p.rate(1, [(0.6, None)] * 8)


def test_k_rises_when_verification_is_cheap_and_acceptance_high():
    p = policy(1.0, 0.001, 0.05, 0.001, k=0)
    k = p.choose([(0.9, None)] * 4)
    assert k >= 4
    # the same costs with a poor draft: a shorter k
    assert policy(1.0, 0.001, 0.05, 0.001).choose([(0.3, None)] * 4) < k


def test_k_falls_as_the_batch_grows_on_a_compute_bound_forward():
    # 1.5B-like: a forward costs 0.34 s + 0.025 s per token; a draft step 0.1 s + 0.005 s per row
    ks = [policy(0.34, 0.025, 0.1, 0.005).choose([(0.8, None)] * b) for b in (1, 8, 32)]
    assert ks[0] > ks[1] > ks[2] and ks[0] >= 3


def test_hysteresis_holds_k_against_noise():
    p = policy(1.0, 0.05, 0.2, 0.01, k=3, hysteresis=0.10)
    rows = [(0.7, None)] * 4
    best = max(range(9), key=lambda k: p.rate(k, rows))
    assert abs(best - 3) <= 1 and p.rate(best, rows) < 1.10 * p.rate(3, rows)
    for a in (0.68, 0.72, 0.69, 0.71, 0.7):  # acceptance jitters around 0.7
        assert p.choose([(a, None)] * 4) == 3
    no_h = policy(1.0, 0.05, 0.2, 0.01, k=3, hysteresis=0.0)
    assert no_h.choose(rows) == best  # without hysteresis it moves to the (slightly) better k
    assert p.choose([(0.1, None)] * 4) < 3  # a real change still moves it


def test_fixed_k_rows_are_costed_and_no_draft_means_k_0():
    p = policy(1.0, 0.001, 0.05, 0.001, k=2)
    assert p.choose([(0.9, 5)] * 3) == 2  # only fixed rows: nothing to choose, the state stays
    no_draft = KPolicy(CostModel(LinearCost(1.0, 0.1)), k=0)
    assert no_draft.choose([(0.9, None)]) == 0


def seq(n_prompt=3, k=None, mode="sd", max_new=4):
    return Sequence(Request([1] * n_prompt, max_new, spec=SpeculationParams(mode, k)), None, {0}, 10, 64)


def test_scheduler_admits_by_free_slots_and_aborts_at_the_round_boundary():
    s = Scheduler(max_num_seqs=2, max_queue_len=3, policy=policy(1.0, 0.001, 0.05, 0.001, k=3), speculate=True)
    a, b, c = seq(), seq(k=1), seq(mode="ar")
    for x in (a, b, c):
        s.add(x)
    with pytest.raises(QueueFull, match=r"queue full: 3 requests waiting \(max_queue_len\); retry later or raise max_queue_len"):
        s.add(seq())
    out = s.schedule(free_slots=2)
    assert out.prefill == [a, b] and out.running == [a, b] and list(s.waiting) == [c]
    assert out.draft_lens == [min(out.k, a.remaining - 1), 1] and out.preempted == []
    s.abort(b.id)
    assert s.running == [a, b]  # not before the next round
    out = s.schedule(free_slots=0)
    assert out.aborted == [b] and b.finish_reason == "abort" and out.prefill == [c] and out.running == [a, c]
    assert out.draft_lens[1] == 0  # an ar request never drafts
    a.finish("length")
    assert s.update_from_output(out.running, [1, 0], [2, 0]) == [a] and s.running == [c]


def test_max_prefill_tokens_chunks_a_long_prompt_and_admits_the_next_ones_after_it():
    s = Scheduler(max_num_seqs=4, max_queue_len=8, policy=policy(1, 0, 0, 0), speculate=True, max_prefill_tokens=10)
    big, small1, small2 = seq(30), seq(4), seq(4)
    for x in (big, small1, small2):
        s.add(x)
    for _ in range(2):  # the engine advances `cached` by what each round fed
        out = s.schedule(4)
        assert out.running == [big] and out.feeds == [10] and out.draft_lens == [0]  # a chunk drafts nothing
        big.cached += 10
    out = s.schedule(4)  # the last piece: a whole row again, it speculates and commits its first token
    assert out.feeds == [10] and out.draft_lens[0] > 0 and not out.prefill
    big.cached, big.ids = 30, big.ids + [1]
    out = s.schedule(3)
    assert out.prefill == [small1, small2] and out.feeds == [1, 4, 4] and out.draft_lens[0] > 0
    assert Scheduler(1, 1, policy(1, 0, 0, 0), speculate=False, max_prefill_tokens=1)  # the least budget
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 1"):
        Scheduler(1, 1, policy(1, 0, 0, 0), speculate=False, max_prefill_tokens=0)


def test_prefill_feeds_share_the_budget_oldest_first():
    from specserve.engine.scheduler import prefill_feeds

    assert prefill_feeds([1, 30, 1, 8], 10) == [1, 10, 1, 1]  # decode rows always feed their token
    assert prefill_feeds([5, 8, 40], 20) == [5, 8, 7]
    assert prefill_feeds([1, 1], 1) == [1, 1]


def test_acceptance_is_smoothed_per_sequence():
    x = seq()
    a0 = x.acceptance
    for _ in range(10):
        x.observe_acceptance(4, 4)
    assert x.acceptance > 0.95 > a0
    for _ in range(20):  # a rejection round is one try, a clean sweep four: it falls more slowly
        x.observe_acceptance(0, 4)
    assert x.acceptance < 0.1
    x.observe_acceptance(0, 0)  # a round without drafts says nothing
    assert x.acceptance < 0.1


def test_measured_cost_keeps_the_flat_start_a_line_would_lose():
    c = MeasuredCost(LinearCost(1.0, 0.1))
    assert c.predict(5) == pytest.approx(1.5)  # no points yet: the prior
    for n, sec in ((1, 0.458), (3, 0.447), (5, 0.519), (8, 0.649), (24, 1.314), (40, 2.041)):  # 1.5B, 2 threads
        c.set_point(n, sec)
    assert c.predict(4) == pytest.approx((0.447 + 0.519) / 2)
    assert c.predict(16) == pytest.approx((0.649 + 1.314) / 2)
    assert c.predict(56) > 2.041 and c.predict(0) == pytest.approx(0.458)
    line = LinearCost(1.0, 0.1)
    for n, sec in ((1, 0.458), (3, 0.447), (5, 0.519), (8, 0.649), (24, 1.314), (40, 2.041)):
        line.observe(n, sec)
    assert abs(line.predict(1) - 0.458) > 0.05  # a straight line misprices the flat start by > 10%
    assert KPolicy(CostModel(c, LinearCost(0.066, 0.0))).choose([(0.86, None)]) >= 3  # batch 1 speculates
    c.observe(4, 1.0)  # a round's timing moves the curve by an EMA step, not all the way
    assert 0.483 < c.predict(4) < 0.6


def test_a_stalled_round_moves_the_cost_point_by_one_bounded_step():
    """A round slowed by another process (13x here) must not make k = 0 look better for a dozen rounds."""
    cost = MeasuredCost(LinearCost(0.15, 0.006))
    cost.set_point(8, 0.2)
    cost.observe(8, 2.7)
    assert cost.points[8] == pytest.approx(0.8 * 0.2 + 0.2 * 0.3)  # counted as 1.5x, not 13.5x
    for _ in range(10):  # a real, lasting change is still followed
        cost.observe(8, 0.4)
    assert cost.points[8] > 0.37


def test_choose_ssd_prices_only_the_verify():
    from specserve.engine.scheduler import CostModel, KPolicy, LinearCost

    flat = KPolicy(CostModel(LinearCost(1.0, 0.0), None), k_max=8)  # no draft model: ssd rows still choose
    assert flat.choose_ssd([(0.8, None)], 0, 0.0) == 8  # verifying more costs nothing: the longest k
    steep = KPolicy(CostModel(LinearCost(0.05, 0.05), None), k_max=8)
    assert steep.choose_ssd([(0.8, None)] * 32, 0, 0.0) == 0  # 32 rows, compute-bound: speculation off
    assert steep.choose_ssd([(0.8, 3)], 0, 0.0) == 0  # a fixed row leaves nothing to choose: state kept
    mid = KPolicy(CostModel(LinearCost(1.0, 0.1), None), k_max=8)
    assert 1 <= mid.choose_ssd([(0.8, None)], 0, 0.0) < 8
