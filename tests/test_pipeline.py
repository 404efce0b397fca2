"""The speculation pipeline: DraftService without gRPC, then DraftClient <-> draft server over gRPC.

Over gRPC the target side verifies every proposal with the tiny target exactly like
speculative.py (warp + rejection_sample, crop the cache), so greedy output must equal the
target's own autoregressive output whatever the (random) draft proposes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from specserve.engine.sampling import SamplingParams, rejection_sample, warp
from specserve.engine.speculative import SpecConfig
from specserve.engine.single import generate
from specserve.engine.ssd import DraftSession
from specserve.pipeline.draft_server import DraftService, Inbox, serve, serve_stream
from specserve.pipeline.remote_drafter import DraftClient, DraftError, DraftUnavailable, RemoteProposal
from specserve.pipeline.wire import PROTOCOL, message_seq, pb, spec_params

PROMPT = [17, 301, 42, 7, 99, 256, 3]
E = pb.Error


def _start(seq, prompt=PROMPT, **params):
    return pb.TargetMessage(start=pb.Start(seq=seq, prompt_ids=prompt, params=spec_params(**params)))


def _outcome(seq, round, accepted, token, plan=None, speculate=None):
    return pb.TargetMessage(outcome=pb.Outcome(seq=seq, round=round, accepted=accepted, token=token, plan=plan,
                                               speculate=speculate))


def _stop(seq):
    return pb.TargetMessage(stop=pb.Stop(seq=seq))


def _one(replies, kind):
    assert len(replies) == 1, replies
    assert replies[0].WhichOneof("kind") == kind, replies[0]
    return getattr(replies[0], kind)


def _ar(lm, prompt, n):
    return [t for c in generate(lm, None, prompt, max_new_tokens=n, spec=SpecConfig(mode="ar")) for t in c.token_ids]


# ---------------------------------------------------------------------- DraftService, no gRPC

def test_service_start_outcome_and_cache_hit(tiny):
    draft = tiny["draft-random"]
    cont = _ar(draft, PROMPT, 10)  # the draft's own greedy continuation
    svc = DraftService(draft)
    p0 = _one(svc.handle(_start("a", k=4)), "proposal")
    assert (p0.seq, p0.round, list(p0.token_ids), len(p0.q), p0.cache_hit) == ("a", 0, cont[:4], 0, False)
    assert p0.draft_s > 0
    # outcome "all 4 accepted, bonus = the draft's next greedy token" is the likeliest guess
    assert svc.speculate("a") == []
    p1 = _one(svc.handle(_outcome("a", 0, 4, cont[4])), "proposal")
    assert (p1.round, list(p1.token_ids), p1.cache_hit) == (1, cont[5:9], True)
    # without speculation, the same kind of outcome is drafted just-in-time
    p2 = _one(svc.handle(_outcome("a", 1, 1, 5)), "proposal")
    assert p2.round == 2 and not p2.cache_hit and len(p2.token_ids) == 4
    assert (svc.hits, svc.misses) == (1, 1)
    assert svc.handle(_stop("a")) == [] and svc.sessions == {}
    assert svc.stats()["hits"] == 1  # counters survive the session


def test_the_target_sets_k_and_speculation_per_round(tiny):
    draft = tiny["draft-random"]
    svc = DraftService(draft)
    plan = pb.KPlan(k=2, if_accepted=3, if_rejected=1)
    p0 = _one(svc.handle(pb.TargetMessage(start=pb.Start(seq="a", prompt_ids=PROMPT, params=spec_params(k=4),
                                                         plan=plan))), "proposal")
    assert len(p0.token_ids) == 2  # the plan's k, not params.k
    p1 = _one(svc.handle(_outcome("a", 0, 0, 1, pb.KPlan(k=5, if_accepted=1, if_rejected=1), speculate=False)),
              "proposal")
    assert len(p1.token_ids) == 5
    assert svc.speculate_step("a") == ([], False)  # the target turned speculation off for this round
    assert svc.sessions["a"].table == {}
    p2 = _one(svc.handle(_outcome("a", 1, 0, 1, speculate=True)), "proposal")  # no plan: params.k
    assert len(p2.token_ids) == 4 and svc.speculate("a") == [] and svc.sessions["a"].table


@pytest.mark.parametrize("service", ["DraftService", "BatchDraftService"])
def test_service_errors_are_per_sequence(tiny, service):
    from specserve.pipeline import draft_server

    svc = getattr(draft_server, service)(tiny["draft-random"])  # the checks are shared: both say the same
    p0 = _one(svc.handle(_start("a")), "proposal")
    k = len(p0.token_ids)
    cases = [
        (_outcome("a", 5, 0, 1), "a", E.STALE_ROUND),
        (_outcome("nope", 0, 0, 1), "nope", E.UNKNOWN_SEQUENCE),
        (_outcome("a", 0, k + 1, 1), "a", E.INVALID_ARGUMENT),  # more accepted than drafted
        (_outcome("a", 0, 0, 10 ** 6), "a", E.INVALID_ARGUMENT),  # token outside the vocabulary
        (_outcome("a", 0, 0, 1, pb.KPlan(k=65, if_accepted=4, if_rejected=4)), "a", E.INVALID_ARGUMENT),
        (_start("a"), "a", E.INVALID_ARGUMENT),  # already open
        (_start("b", top_p=2.0), "b", E.INVALID_ARGUMENT),
        (_start("b", k=0), "b", E.INVALID_ARGUMENT),
        (_start("b", prompt=[]), "b", E.INVALID_ARGUMENT),
        (_start("b", prompt=[1, 99999]), "b", E.INVALID_ARGUMENT),
        (_start("", ), "", E.INVALID_ARGUMENT),
        (pb.TargetMessage(), "", E.INVALID_ARGUMENT),
    ]
    for msg, seq, code in cases:
        err = _one(svc.handle(msg), "error")
        assert (err.seq, E.Code.Name(err.code)) == (seq, E.Code.Name(code)), (msg, err)
        assert err.message
    assert "Outcome.plan.k is 65: ask for at most 64" in _one(svc.handle(cases[4][0]), "error").message
    assert list(svc.sessions) == ["a"]  # failed Starts opened nothing
    # the sequence survived every error
    p1 = _one(svc.handle(_outcome("a", 0, 0, 1)), "proposal")
    assert p1.round == 1
    assert svc.handle(_stop("a")) == [] and svc.handle(_stop("a")) == []  # Stop is idempotent
    assert _one(svc.handle(_outcome("a", 1, 0, 1)), "error").code == E.UNKNOWN_SEQUENCE


def test_the_per_sequence_service_answers_a_batch_with_one_replies(tiny):
    svc = DraftService(tiny["draft-random"])
    batch = pb.TargetMessage(batch=pb.Batch(starts=[_start("a").start, _start("b").start, _start("").start]))
    r = _one(svc.handle(batch), "replies")
    assert sorted(p.seq for p in r.proposals) == ["a", "b"] and [e.code for e in r.errors] == [E.INVALID_ARGUMENT]
    assert sorted(svc.sessions) == ["a", "b"]


class _ScriptedInbox(Inbox):
    """An inbox that hands out `later` messages only when the loop would block (the target's answer)."""

    def __init__(self, now, later):
        super().__init__()
        self.later = list(later)
        self.blocked = 0
        for m in now:
            self.put(m)

    def get(self, block):
        msg = super().get(block=False)
        if msg is None and block:
            self.blocked += 1
            self.arrived = time.perf_counter()
            if self.later:
                return self.later.pop(0)
            return Inbox.CLOSED
        return msg


class _PacedInbox(Inbox):
    """Messages that arrive while the loop works: (polls, msg) comes `polls` inbox reads after the
    previous one (at once when the loop would block). Records the speculation steps run so far
    when each message arrives (`steps_at`)."""

    def __init__(self, svc, script):
        super().__init__()
        self.svc, self.script, self.wait, self.steps_at = svc, list(script), None, {}

    def get(self, block):
        if not self.script:
            return Inbox.CLOSED if block else None
        polls, msg = self.script[0]
        self.wait = polls if self.wait is None else self.wait
        if self.wait > 0 and not block:
            self.wait -= 1
            return None
        self.script.pop(0)
        self.wait, self.arrived = None, time.perf_counter()
        self.steps_at[msg.WhichOneof("kind"), message_seq(msg)] = self.svc.spec_steps
        return msg


def test_serve_stream_speculates_only_while_waiting(tiny):
    draft = tiny["draft-random"]
    cont = _ar(draft, PROMPT, 5)
    # the outcome arrives after the loop ran out of messages: speculation ran, the outcome hits
    svc = DraftService(draft)
    out = list(serve_stream(svc, _ScriptedInbox([_start("a", k=4)], [_outcome("a", 0, 4, cont[4])])))
    assert [m.proposal.cache_hit for m in out] == [False, True]
    assert svc.sessions == {}  # the end of the stream frees everything
    # the outcome is already waiting when the proposal goes out: no speculation, a miss
    svc = DraftService(draft)
    out = list(serve_stream(svc, _ScriptedInbox([_start("a", k=4), _outcome("a", 0, 4, cont[4])], [])))
    assert [m.proposal.cache_hit for m in out] == [False, False]
    # two sequences: waiting messages are answered before anyone speculates
    svc = DraftService(draft)
    inbox = _ScriptedInbox([_start("a"), _start("b"), _outcome("a", 0, 0, 1)], [_outcome("b", 0, 4, cont[4])])
    out = list(serve_stream(svc, inbox))
    assert [(m.proposal.seq, m.proposal.round, m.proposal.cache_hit) for m in out] == [
        ("a", 0, False), ("b", 0, False), ("a", 1, False), ("b", 1, True)]


def test_speculation_yields_to_an_arriving_outcome_within_one_step(tiny):
    """b's outcome arrives while a is being speculated for: it is answered from b's cache before a's
    next step, and a's speculation resumes where it was (its own outcome then hits too)."""
    draft = tiny["draft-random"]
    cont = _ar(draft, PROMPT, 10)
    svc = DraftService(draft)
    inbox = _PacedInbox(svc, [(0, _start("b", k=4)), (99, _start("a", k=4)),  # a after b's speculation
                              (2, _outcome("b", 0, 4, cont[4])), (99, _outcome("a", 0, 4, cont[4]))])
    seen = []
    for m in serve_stream(svc, inbox):
        p = m.proposal
        seen.append((p.seq, p.round, p.cache_hit, p.late, svc.spec_steps))
        if (p.seq, p.round) == ("b", 1):
            assert svc.sessions["a"]._branches is not None  # a's speculation is in progress, paused
    assert [s[:4] for s in seen] == [("b", 0, False, False), ("a", 0, False, False), ("b", 1, True, False),
                                     ("a", 1, True, False)]
    assert seen[2][4] == inbox.steps_at["outcome", "b"]  # no draft step between b's arrival and its answer
    st = svc.stats()
    assert st["hit_answers"] == 2 and st["hit_answer_s"] > 0 and st["miss_answers"] == 0


def test_an_outcome_mid_speculation_finishes_its_branch_or_drafts_just_in_time(tiny):
    draft = tiny["draft-random"]
    cont = _ar(draft, PROMPT, 16)
    with torch.inference_mode():  # the token the draft finds least likely: no branch predicts it
        worst = int(draft.model(torch.tensor([PROMPT + cont[:5]])).logits[0, -1].argmin())
    svc = DraftService(draft)
    # a's outcome comes after the glue and one branch step: its branch is drafted on alone (a late
    # hit); the next one is an outcome no branch predicted, mid-speculation: dropped, drafted just-in-time
    inbox = _PacedInbox(svc, [(0, _start("a", k=4)), (2, _outcome("a", 0, 4, cont[4])),
                              (3, _outcome("a", 1, 0, worst))])
    out = [m.proposal for m in serve_stream(svc, inbox)]
    assert [(p.round, p.cache_hit, p.late) for p in out] == [(0, False, False), (1, True, True), (2, False, False)]
    assert list(out[1].token_ids) == cont[5:9]  # what a just-in-time draft would have given
    fresh = DraftSession(draft, PROMPT + cont[:5] + [worst], SamplingParams(), k=4).first_proposal()
    assert list(out[2].token_ids) == fresh.token_ids
    st = svc.stats()
    assert (st["hits"], st["late_hits"], st["misses"]) == (1, 1, 1)
    assert st["late_answers"] == 1 and st["miss_answers"] == 1


def test_a_failing_sequence_does_not_stall_the_others(tiny, monkeypatch):
    draft = tiny["draft-random"]
    cont = _ar(draft, PROMPT, 5)
    svc = DraftService(draft)
    real = DraftSession.speculate_step

    def broken(self):
        if self is svc.sessions.get("bad"):
            raise RuntimeError("injected")
        return real(self)

    monkeypatch.setattr(DraftSession, "speculate_step", broken)
    inbox = _PacedInbox(svc, [(0, _start("bad")), (0, _start("ok")), (99, _outcome("ok", 0, 4, cont[4])),
                              (0, _outcome("bad", 0, 0, 1))])
    out = list(serve_stream(svc, inbox))
    kinds = [(m.WhichOneof("kind"), message_seq(m)) for m in out]
    assert kinds == [("proposal", "bad"), ("proposal", "ok"), ("error", "bad"), ("proposal", "ok"), ("error", "bad")]
    assert out[2].error.code == E.INTERNAL and "injected" in out[2].error.message
    assert out[3].proposal.cache_hit and out[4].error.code == E.UNKNOWN_SEQUENCE


# ---------------------------------------------------------------------- over gRPC

@pytest.fixture(scope="module")
def draft_address(tiny):
    server = serve(tiny["draft-random"], port=0, host="127.0.0.1")
    yield server.address
    server.stop(grace=None)


def _dense(prop: RemoteProposal, V: int) -> torch.Tensor | None:
    if not prop.q_ids:
        return None
    q = torch.zeros(len(prop.token_ids), V)
    for i, (ids, ps) in enumerate(zip(prop.q_ids, prop.q_probs)):
        q[i, ids] = torch.tensor(ps)
    return q


def remote_generate(client, target, seq, prompt, max_new_tokens, sp=SamplingParams(), k=4, seed=0, stats=None):
    """The target's verify loop (speculative.py steps 2-5) with the draft behind `client`."""
    gen = torch.Generator().manual_seed(seed)
    tc, ids, out, eos = target.new_cache(), list(prompt), [], target.eos_ids
    params = spec_params(sp.temperature, sp.top_k, sp.top_p, k=k, seed=seed, max_new_tokens=max_new_tokens)
    prop = client.start(seq, prompt, params)
    try:
        while True:
            d = prop.token_ids
            assert len(d) <= min(k, max_new_tokens - len(out) - 1), "the draft ignored its budget"
            logits = tc.forward(ids[tc.length:] + d, keep=len(d) + 1)  # 2. verify
            p = warp(logits, sp.temperature, sp.top_k, sp.top_p)
            n, t = rejection_sample(torch.tensor(d, dtype=torch.long), _dense(prop, target.vocab_size), p, gen)
            tc.crop(len(ids) + n)  # 4. crop
            new = d[:n] + [t]
            if stats is not None:
                stats.append((len(d), n, prop.cache_hit))
            done = False
            for i, tok in enumerate(new):  # 5. emit, cut at EOS / budget
                if tok in eos:
                    new, done = new[: i + 1], True
                    break
            if len(out) + len(new) >= max_new_tokens:
                new, done = new[: max_new_tokens - len(out)], True
            ids += new
            out += new
            if done:
                return out
            prop = client.outcome(seq, prop.round, n, t)
    finally:
        client.stop(seq)


def test_info(draft_address, tiny):
    with DraftClient(draft_address) as client:
        info = client.info(timeout=5)
        assert (info.vocab_size, info.model, info.dtype) == (512, "draft-random", "float32")
        assert info.version and info.eos_ids and info.protocol == PROTOCOL == 3
        assert client.check_vocab(512) == info
        with pytest.raises(ValueError, match="vocabulary of 512"):
            client.check_vocab(1000)


def test_a_draft_of_another_protocol_is_refused(tiny, monkeypatch):
    from specserve.pipeline import draft_server

    monkeypatch.setattr(draft_server, "PROTOCOL", 1)  # a draft worker from before the target owned k
    server = serve(tiny["draft-random"], port=0)
    try:
        with DraftClient(server.address) as client:
            with pytest.raises(ValueError, match="protocol 1 but this target speaks 3: run the same specserve"):
                client.check_vocab(512)
    finally:
        server.stop(grace=None)


def test_remote_greedy_equals_autoregressive(draft_address, tiny):
    target, n = tiny["target"], 40
    stats = []
    with DraftClient(draft_address, timeout=30) as client:
        assert remote_generate(client, target, "s1", PROMPT, n, stats=stats) == _ar(target, PROMPT, n)
        # the same client serves a second sequence after the first one stopped
        assert remote_generate(client, target, "s2", PROMPT[:3], 12) == _ar(target, PROMPT[:3], 12)
    assert len(stats) > 1 and any(k > 0 for k, _, _ in stats)


def test_speculation_hits_over_grpc_and_stream_cleanup(tiny):
    """draft-same is the target: every outcome is "all accepted + the argmax", the top guess."""
    target = tiny["target"]
    server = serve(tiny["draft-same"], port=0)
    try:
        stats = []
        with DraftClient(server.address, timeout=30) as client:
            assert remote_generate(client, target, "h", PROMPT, 30, stats=stats) == _ar(target, PROMPT, 30)
        assert all(n == k for k, n, _ in stats)
        hits = sum(h for *_, h in stats)
        assert hits >= 1, stats  # speculation ran between proposal and outcome (normally every round)
        deadline = time.monotonic() + 10
        while server.servicer.stats()["streams_open"] and time.monotonic() < deadline:
            time.sleep(0.05)
        st = server.servicer.stats()
        assert (st["streams"], st["streams_open"], st["sequences_open"], st["hits"]) == (1, 0, 0, hits), st
    finally:
        server.stop(grace=None)


def test_two_sequences_multiplexed_on_one_stream(draft_address, tiny):
    target, n = tiny["target"], 30
    prompts = {"x": PROMPT, "y": [5, 6, 7, 8, 400, 12]}
    got, errors = {}, []
    with DraftClient(draft_address, timeout=30) as client:
        def run(seq):
            try:
                got[seq] = remote_generate(client, target, seq, prompts[seq], n)
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in prompts]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        streams = {id(s) for s in client._seqs.values()} | {id(client._stream)}
    assert not errors, errors
    assert len(streams) == 1  # one stream carried both sequences
    for s, prompt in prompts.items():
        assert got[s] == _ar(target, prompt, n), s


def test_remote_sampling_carries_exact_sparse_q(draft_address, tiny):
    target = tiny["target"]
    sp = SamplingParams(temperature=0.8, top_k=50)
    with DraftClient(draft_address, timeout=30) as client:
        prop = client.start("t", PROMPT, spec_params(0.8, 50, k=3, q_top=8, seed=1))
        assert len(prop.q_ids) == len(prop.q_probs) == len(prop.token_ids) == 3
        for tok, ids, ps in zip(prop.token_ids, prop.q_ids, prop.q_probs):
            assert tok in ids and 0 < len(ids) <= 8 and abs(sum(ps) - 1) < 1e-5
        client.stop("t")
        # the wire carries q' bit for bit: the same session run locally proposes the same
        local = DraftSession(tiny["draft-random"], PROMPT, sp, k=3, q_top=8, seed=1).first_proposal()
        assert (prop.token_ids, prop.q_ids, prop.q_probs) == (local.token_ids, local.q_ids, local.q_probs)
        out = remote_generate(client, target, "u", PROMPT, 20, sp=sp, k=3, seed=3)
    assert len(out) == 20 and all(0 <= t < target.vocab_size for t in out)


def test_errors_over_grpc_keep_the_stream(draft_address, tiny):
    with DraftClient(draft_address, timeout=30) as client:
        p0 = client.start("e", PROMPT, {"k": 2})
        with pytest.raises(DraftError) as ei:
            client.outcome("e", 7, 0, 1)
        assert ei.value.code == "STALE_ROUND" and isinstance(ei.value, DraftUnavailable)
        with pytest.raises(DraftError, match="INVALID_ARGUMENT"):
            client.outcome("e", 0, len(p0.token_ids) + 1, 1)
        with pytest.raises(DraftError, match="INVALID_ARGUMENT"):
            client.start("bad", PROMPT, {"top_p": 0.0, "k": 2})
        client.stop("bad")
        p1 = client.outcome("e", 0, 0, 1)  # the sequence and the stream still work
        assert p1.round == 1 and p1.draft_s >= 0
        with pytest.raises(ValueError, match="not open"):
            client.outcome("never", 0, 0, 1)
        client.stop("e")


def test_stopped_server_raises_draft_unavailable_then_reconnects(tiny):
    server = serve(tiny["draft-random"], port=0)
    port = int(server.address.rsplit(":", 1)[1])
    client = DraftClient(server.address, timeout=30)
    try:
        p0 = client.start("k", PROMPT)
        server.stop(grace=None).wait(5)
        t0 = time.monotonic()
        with pytest.raises(DraftUnavailable, match="broke"):
            client.outcome("k", p0.round, 0, 1, timeout=5)
        assert time.monotonic() - t0 < 5
        with pytest.raises(DraftUnavailable):  # a new stream to a dead server fails too
            client.start("k2", PROMPT, timeout=5)
        client.stop("k")
        client.stop("k2")
        # a draft back on the same port: the next start opens a new stream (after gRPC's backoff)
        server = serve(tiny["draft-random"], port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.start("k3", PROMPT, timeout=5).round == 0
                break
            except DraftUnavailable:
                client.stop("k3")
                assert time.monotonic() < deadline, "the client did not reconnect within 20 s"
                time.sleep(0.2)
    finally:
        client.close()
        server.stop(grace=None)


def test_draft_worker_process_killed_mid_sequence(tiny_dir, tiny):
    """run_draft_worker in a real process: LISTENING line, a deadline while frozen, kill -9."""
    code = ("import sys; from specserve.pipeline.draft_server import run_draft_worker; "
            "sys.exit(run_draft_worker(sys.argv[1], port=0, threads=1))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_dir / "draft-random")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the worker is up (or dies)
        assert line.startswith("LISTENING 127.0.0.1:"), (line, proc.poll(), proc.stderr.read() if proc.poll() else "")
        address = line.split()[1]
        with DraftClient(address, timeout=60) as client:
            assert client.info().vocab_size == 512
            p0 = client.start("w", PROMPT)
            p1 = client.outcome("w", p0.round, 0, 1)
            os.kill(proc.pid, signal.SIGSTOP)  # alive but silent: the deadline fires
            t0 = time.monotonic()
            with pytest.raises(DraftUnavailable, match="within 1 s"):
                client.outcome("w", p1.round, 0, 1, timeout=1.0)
            assert 0.9 < time.monotonic() - t0 < 3
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(DraftUnavailable):
                client.outcome("w", p1.round, 0, 1, timeout=10)
            assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
