"""The draft side of SSD at batch: `DraftScheduler` (engine level, no gRPC) and the Batch protocol."""

import pytest
import torch

from specserve.engine.draft_scheduler import DraftScheduler
from specserve.engine.speculative import KPlan
from specserve.engine.ssd import DraftSession, StaleRound
from specserve.pipeline.draft_server import BatchDraftService, Inbox, serve_batched
from specserve.pipeline.remote_drafter import DraftClient
from specserve.pipeline.wire import pb, spec_params


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 9, 40, 120)]


def test_batched_proposals_equal_each_sequences_own_session(tiny, prompts):
    """Four ragged sequences answered together, round after round (misses drafted in lockstep, hits
    served from the tree): every proposal equals what a per-sequence DraftSession proposes for the
    same outcomes, and the misses of a round share their forwards."""
    lm = tiny["draft-random"]
    sched = DraftScheduler(lm, max_seqs=4, max_model_len=256)
    alone = {}
    jobs = {}
    for n, p in enumerate(prompts):
        jobs[f"s{n}"] = sched.open(f"s{n}", p, k=3).first_program(KPlan(3, 3, 3))
        alone[f"s{n}"] = DraftSession(lm, p, k=3)
    props = sched.answer(jobs)
    ref = {s: a.first_proposal(KPlan(3, 3, 3)) for s, a in alone.items()}
    assert {s: p.token_ids for s, p in props.items()} == {s: p.token_ids for s, p in ref.items()}
    g = torch.Generator().manual_seed(0)
    hits = 0
    for rnd in range(6):
        if rnd % 2:  # speculate on odd rounds only: even rounds are all misses, odd ones mostly hits
            while sched.speculating():
                assert sched.speculate_step() == {}
        f0 = sched.forwards
        outs = {}
        for s, prop in props.items():
            j = int(torch.randint(0, len(prop.token_ids) + 1, (1,), generator=g))
            # the draft's own next token at a rejection is a likely branch; a random one a sure miss
            tok = int(torch.randint(3, 500, (1,), generator=g)) if rnd % 3 == 0 else None
            outs[s] = (j, tok)
        jobs = {}
        for s, (j, tok) in outs.items():
            sess = sched.sessions[s]
            if tok is None:  # a likely outcome: the draft's own top token after j accepted
                keys = [key for key in sess.table if key[1] == j]
                tok = keys[0][2] if keys else 5
                outs[s] = (j, tok)
            jobs[s] = sess.outcome_program(rnd, j, tok, KPlan(3, 3, 3))
        props = sched.answer(jobs)
        for s, (j, tok) in outs.items():
            want = alone[s].on_outcome(rnd, j, tok, KPlan(3, 3, 3))
            assert props[s].token_ids == want.token_ids, (rnd, s)
            hits += props[s].cache_hit
        if rnd % 2 == 0:
            assert sched.forwards - f0 <= 3  # 4 misses of k = 3: 3 forwards, not 12
    assert hits >= 4


def test_a_branch_is_what_a_just_in_time_draft_of_its_outcome_gives(tiny, prompts):
    """The tree (branches over the shared prefix in one slot, at their true positions): for every
    pre-drafted outcome (i, t), the branch's tokens equal a fresh draft after S + d_1..d_i + t."""
    lm = tiny["draft-random"]
    sched = DraftScheduler(lm, max_seqs=2, max_model_len=256, fanout_budget=6)
    jobs = {"a": sched.open("a", prompts[2], k=4).first_program(KPlan(4, 3, 2)),
            "b": sched.open("b", prompts[1], k=4).first_program(KPlan(4, 3, 2))}
    sent = sched.answer(jobs)
    while sched.speculating():
        sched.speculate_step()
    for s, p in (("a", prompts[2]), ("b", prompts[1])):
        table = sched.sessions[s].table
        assert len(table) == 6
        for (rnd, i, t), (branch, final) in table.items():
            fresh = DraftSession(lm, p + sent[s].token_ids[:i] + [t], k=4)
            want = fresh.first_proposal(KPlan(len(branch.token_ids), 0, 0)).token_ids
            assert rnd == 1 and branch.token_ids == want, (s, i, t)
            assert len(branch.token_ids) == (3 if i == len(sent[s].token_ids) else 2)  # the plan's lengths


def test_bad_messages_fail_only_their_sequence(tiny, prompts):
    lm = tiny["draft-random"]
    sched = DraftScheduler(lm, max_seqs=2, max_model_len=64)
    sched.open("a", prompts[0], k=2)
    with pytest.raises(ValueError, match="already open"):
        sched.open("a", prompts[0])
    sched.open("b", prompts[1], k=2)
    with pytest.raises(ValueError, match="all 2 draft slots are in use .*--max-seqs"):
        sched.open("c", prompts[0])
    with pytest.raises(ValueError, match="k \\(draft length\\) must be between 1 and 64"):
        DraftScheduler(lm, max_seqs=1).open("x", prompts[0], k=0)
    sched.close("b")
    res = sched.answer({"a": sched.sessions["a"].first_program(None),
                        "c": sched.open("c", prompts[3], k=2).first_program(None)})  # 120 tokens > 64
    assert len(res["a"].token_ids) == 2
    assert isinstance(res["c"], ValueError) and "max_model_len=64: start the worker with a larger" in str(res["c"])
    with pytest.raises(StaleRound, match="current round is 0"):
        sched.sessions["a"].outcome_program(3, 0, 1, None)
    with pytest.raises(ValueError, match="accepted must be in \\[0, 2\\]"):
        sched.sessions["a"].outcome_program(0, 5, 1, None)


def _start(seq, prompt, k=2, **kw):
    return pb.Start(seq=seq, prompt_ids=prompt, params=spec_params(k=k, **kw))


def test_a_batch_gets_one_reply_with_a_proposal_or_an_error_per_sequence(tiny, prompts):
    svc = BatchDraftService(tiny["draft-same"], max_seqs=4, max_model_len=256)
    first = svc.handle(pb.TargetMessage(batch=pb.Batch(starts=[_start("a", prompts[1]), _start("b", prompts[2]),
                                                              _start("", prompts[0])])))
    assert len(first) == 1 and first[0].WhichOneof("kind") == "replies"
    r = first[0].replies
    assert sorted(p.seq for p in r.proposals) == ["a", "b"] and [e.code for e in r.errors] == [pb.Error.INVALID_ARGUMENT]
    while svc.speculating():
        svc.speculate_step()
    props = {p.seq: p for p in r.proposals}
    # a perfect draft: all accepted, its own next token is the bonus: both hit
    nxt = svc.handle(pb.TargetMessage(batch=pb.Batch(outcomes=[
        pb.Outcome(seq=s, round=0, accepted=len(props[s].token_ids),
                   token=next(t for (_, i, t) in svc.sessions[s].table if i == len(props[s].token_ids)))
        for s in ("a", "b")] + [pb.Outcome(seq="zz", round=0, accepted=0, token=1)])))
    r = nxt[0].replies
    assert all(p.cache_hit and p.round == 1 for p in r.proposals) and len(r.proposals) == 2
    assert [(e.seq, e.code) for e in r.errors] == [("zz", pb.Error.UNKNOWN_SEQUENCE)]
    assert svc.stats()["hits"] == 2 and svc.stats()["hit_answers"] == 2


def test_serve_batched_answers_what_arrived_together_in_one_run(tiny, prompts):
    """Single messages waiting in the inbox are answered together (one lockstep run)."""
    svc = BatchDraftService(tiny["draft-random"], max_seqs=4, max_model_len=256)
    inbox = Inbox()
    for n, p in enumerate(prompts):
        inbox.put(pb.TargetMessage(start=_start(f"s{n}", p, k=3, speculate=False)))
    inbox.close()
    out = list(serve_batched(svc, inbox))
    assert sorted(m.proposal.seq for m in out) == ["s0", "s1", "s2", "s3"]
    assert svc.scheduler.forwards == 3  # 4 Starts of k = 3: 3 batched forwards


def test_the_client_exchanges_a_batch_over_a_real_stream(tiny, prompts):
    from specserve.pipeline.draft_server import serve

    server = serve(tiny["draft-same"], port=0)
    try:
        assert server.servicer.batched
        with DraftClient(server.address, timeout=20) as client:
            res = client.exchange(starts=[("a", prompts[1], spec_params(k=3), KPlan(3, 3, 3)),
                                          ("b", prompts[2], spec_params(k=3), KPlan(2, 3, 3))])
            assert len(res["a"].token_ids) == 3 and len(res["b"].token_ids) == 2
            res2 = client.exchange(outcomes=[("a", 0, 3, 1, KPlan(1, 1, 1)), ("b", 4, 0, 1, KPlan(1, 1, 1))])
            assert res2["a"].round == 1 and len(res2["a"].token_ids) == 1
            assert "STALE_ROUND" in str(res2["b"])
            assert server.servicer.stats()["errors"] == 1
    finally:
        server.stop(grace=None)


def test_miss_k_0_answers_a_miss_at_once_and_a_hit_in_full(tiny, prompts):
    lm = tiny["draft-same"]
    sched = DraftScheduler(lm, max_seqs=2, max_model_len=256)
    first = sched.answer({"a": sched.open("a", prompts[2], k=3).first_program(KPlan(3, 3, 3)),
                          "b": sched.open("b", prompts[1], k=3).first_program(KPlan(3, 3, 3))})
    while sched.speculating():
        sched.speculate_step()
    bonus = next(t for (_, i, t) in sched.sessions["a"].table if i == 3)
    f0 = sched.forwards
    plan = KPlan(3, 3, 3, miss_k=0)
    res = sched.answer({"a": sched.sessions["a"].outcome_program(0, 3, bonus, plan),  # pre-drafted: a hit
                        "b": sched.sessions["b"].outcome_program(0, 0, 499, plan)})  # not pre-drafted: a miss
    assert res["a"].cache_hit and len(res["a"].token_ids) == 3
    assert not res["b"].cache_hit and res["b"].token_ids == [] and sched.forwards == f0
    assert len(first["b"].token_ids) == 3
    # the empty proposal's round: the speculation for it covers the bonus position only
    while sched.speculating():
        sched.speculate_step()
    assert {i for (_, i, _) in sched.sessions["b"].table} == {0}


def test_a_cache_key_parks_the_slot_and_the_next_turn_prefills_only_past_the_common_prefix(tiny, prompts):
    """Turn 2 of a conversation (turn 1's prompt + output + a new message) with the same key takes the
    parked slot: its first forward feeds only the new tokens, and it proposes what a fresh session
    proposes. A key whose history diverges keeps the common part; parked slots yield to new
    sequences when none is free."""
    lm = tiny["draft-random"]
    sched = DraftScheduler(lm, max_seqs=2, max_model_len=256)
    fed, forward = [], sched.runner.forward_rows

    def spy(rows, interrupt=None):
        fed.append(sum(len(r.tokens) for r in rows))
        return forward(rows, interrupt)

    sched.runner.forward_rows = spy
    turn1 = prompts[3]
    out = sched.answer({"t1": sched.open("t1", turn1, k=3, cache_key="chat").first_program(KPlan(3, 3, 3))})
    history = sched.sessions["t1"].held  # what the slot holds: the prompt and the drafts fed
    sched.close("t1")
    assert list(sched.parked) == ["chat"] and sched.runner.cache.num_free == 1
    turn2 = turn1 + out["t1"].token_ids[:2] + [7, 8, 9]
    fed.clear()
    got = sched.answer({"t2": sched.open("t2", turn2, k=3, cache_key="chat").first_program(KPlan(3, 3, 3))})
    assert sched.reused_tokens == len(turn1) + 2 <= len(history)
    assert fed[0] == len(turn2) - sched.reused_tokens  # the new message only
    assert got["t2"].token_ids == DraftSession(lm, turn2, k=3).first_proposal(KPlan(3, 3, 3)).token_ids
    sched.close("t2")
    # another sequence without a key, then one more: the parked slot is dropped for it
    sched.open("x", prompts[0], k=3)
    sched.open("y", prompts[1], k=3)
    assert not sched.parked and sched.runner.cache.num_free == 0
    with pytest.raises(ValueError, match="all 2 draft slots are in use"):
        sched.open("z", prompts[1], k=3)
    sched.close("x")
    sched.close("y")
    sched.answer({"k": sched.open("k", prompts[1], k=3, cache_key="gone").first_program(KPlan(3, 3, 3))})
    sched.close("k")
    assert sched.forget("gone") and not sched.forget("gone") and sched.runner.cache.num_free == 2


def test_a_start_with_a_cache_key_reuses_the_streams_parked_slot_over_grpc(tiny, prompts):
    from specserve.pipeline.draft_server import serve

    server = serve(tiny["draft-same"], port=0, max_seqs=2, max_model_len=256)
    try:
        with DraftClient(server.address, timeout=30) as client:
            first = client.start("a", prompts[2], spec_params(k=3), cache_key="conv")
            client.stop("a")  # the stream is ordered: the worker parks the slot before the next Start
            turn2 = prompts[2] + first.token_ids + [11]
            second = client.start("b", turn2, spec_params(k=3), cache_key="conv")
            reused = server.servicer.stats()["reused_tokens"]
            assert reused >= len(prompts[2]) and len(second.token_ids) == 3
            third = client.start("c", turn2, spec_params(k=3))  # no key: prefilled whole, the same proposal
            assert third.token_ids == second.token_ids and server.servicer.stats()["reused_tokens"] == reused
            client.stop("b")  # "conv" parked again
            client.stop("c")  # ... and one slot free
            client.forget("other")  # an unknown key: nothing happens
            assert client.start("d", [5, 6], spec_params(k=1)).round == 0  # (the stream is ordered: both applied)
            assert server.servicer.stats()["parked"] == 1
            client.forget("conv")  # the conversation was deleted: its slot goes now
            assert client.start("e", [5, 6], spec_params(k=1)).round == 0
            assert server.servicer.stats()["parked"] == 0
    finally:
        server.stop(grace=None)


def _interrupt_at(check: int):
    """An `interrupt` that answers True at its `check`-th question (0-based) and never again."""
    asked = iter(range(1 << 30))
    return lambda: next(asked) == check


def test_an_interrupted_speculation_step_is_run_again_and_changes_nothing(tiny, prompts):
    """A speculation forward abandoned between layers (glue or branch step) leaves every program
    waiting for the same row: the next step runs it again, and the branches come out exactly as
    without the interruption. (The tiny target as the draft: two layers, so the abandoned forward
    has written K/V for one.)"""
    lm = tiny["target"]
    scheds = [DraftScheduler(lm, max_seqs=2, max_model_len=256, fanout_budget=6) for _ in range(2)]
    for sched in scheds:
        sched.answer({"a": sched.open("a", prompts[2], k=4).first_program(KPlan(4, 3, 2)),
                      "b": sched.open("b", prompts[1], k=4).first_program(KPlan(4, 3, 2))})
    plain, cut = scheds
    while plain.speculating():
        assert plain.speculate_step() == {}
    n = 0
    while cut.speculating():  # every other step abandoned before its second layer
        assert cut.speculate_step(_interrupt_at(1) if n % 2 == 0 else None) == {}
        n += 1
    assert cut.spec_interrupted > 0 and cut.spec_steps - cut.spec_interrupted == plain.spec_steps
    assert cut.forwards == plain.forwards  # abandoned forwards are not counted as run
    for s in ("a", "b"):
        want = {key: (p.token_ids, final) for key, (p, final) in plain.sessions[s].table.items()}
        got = {key: (p.token_ids, final) for key, (p, final) in cut.sessions[s].table.items()}
        assert got == want and len(got) == 6


def test_the_runner_asks_interrupt_before_every_layer(tiny, prompts):
    from specserve.engine.runner import Interrupted, TreeRow

    lm = tiny["target"]  # two layers
    sched = DraftScheduler(lm, max_seqs=1, max_model_len=256)
    rows = [TreeRow.causal(0, prompts[1], 0, 1)]
    asked = []
    out = sched.runner.forward_rows(rows, lambda: asked.append(1) and False)
    assert len(asked) == lm.model.config.num_hidden_layers and out[0].shape[0] == 1
    with pytest.raises(Interrupted, match="before layer 1"):
        sched.runner.forward_rows(rows, _interrupt_at(1))
    assert torch.equal(sched.runner.forward_rows(rows)[0], out[0])  # run again whole: the same logits


class _ArrivingInbox(Inbox):
    """An Inbox whose `message` arrives while the loop is mid-forward: at the `at`-th look of a
    speculation forward's interrupt (counted over the whole stream)."""

    def __init__(self, message, at):
        super().__init__()
        self.message, self.at, self.asked = message, at, 0

    def peek(self):
        self.asked += 1
        if self.asked == self.at:
            self.put(self.message)
        return super().peek()


@pytest.mark.parametrize("predicted", [True, False])
def test_serve_batched_abandons_a_branch_step_only_for_outcomes_it_does_not_draft_on(tiny, prompts, predicted):
    """An outcome lands between two layers of a speculation branch step. One that step drafts on
    (the bonus branch, still open) lets it finish and is answered from the branch; one no branch
    predicted abandons the step and is drafted just-in-time at once. Either way the proposal is
    what a just-in-time draft after the outcome gives."""
    lm = tiny["draft-same"]
    svc = BatchDraftService(lm, max_seqs=2, max_model_len=256)
    first = svc.handle(pb.TargetMessage(start=_start("a", prompts[2], k=3)))[0].proposal
    d = list(first.token_ids)
    bonus = DraftSession(lm, prompts[2] + d, k=1).first_proposal(KPlan(1, 0, 0)).token_ids[0]
    accepted, token = (len(d), bonus) if predicted else (0, 499)
    outcome = pb.TargetMessage(outcome=pb.Outcome(seq="a", round=0, accepted=accepted, token=token))
    layers = lm.model.config.num_hidden_layers
    inbox = _ArrivingInbox(outcome, at=layers + 2)  # the glue forward runs whole; then the first branch step
    out = []
    for m in serve_batched(svc, inbox):
        out.append(m.proposal)
        inbox.close()
    assert [(p.round, p.cache_hit) for p in out] == [(1, predicted)]
    assert svc.stats()["spec_interrupted"] == (0 if predicted else 1)
    fresh = DraftSession(lm, prompts[2] + d[:accepted] + [token], k=3)
    assert list(out[0].token_ids) == fresh.first_proposal(KPlan(len(out[0].token_ids), 0, 0)).token_ids
