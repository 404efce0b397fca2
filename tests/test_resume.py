"""Streams survive a target replica's failure, without Ray: RouterCore over in-process replicas that fail on cue.

A failure before the first chunk sends the request again; after it the router resumes the rest
from the tokens the client already has (GenParams.resume_ids). Checked here: every call kind and
mode continues exactly (tokens, text, stats), a stop string across the boundary, the target's law
when sampling, one replica's death resuming all (and only) its streams of a batch, and the limits:
all replicas down is UNAVAILABLE naming what was tried, refusals and cancelled calls are not
retried. tests/test_reliability.py kills a real Serve replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch

from specserve.engine import sampling as sampling_mod
from specserve.engine.engine import Engine, run_to_completion
from specserve.engine.lm import LM
from specserve.engine.sampling import SamplingParams
from specserve.engine.sequence import Request, SpeculationParams
from specserve.engine.speculative import SpecConfig
from specserve.engine.single import generate
from specserve.engine.text import TextStream
from specserve.models.tiny import tiny_model
from specserve.serving.api import ApiError, GenParams, QueueFull, pb
from specserve.serving.replica import SessionCache, TargetReplica
from specserve.serving.router import RouterCore
from specserve.sessions import MemorySessionStore

from test_batch_sampling import V, chi2_pvalue, exact_two_token_law
from test_serving_core import ar_ids, collect, draft_server, pool, replica, run  # noqa: F401 (fixtures)

MODES = {"ar": pb.MODE_AR, "sd": pb.MODE_SD, "ssd": pb.MODE_SSD}


class Flaky:
    """A TargetCall like the Router's Serve handle, over in-process replicas that fail on cue.

    Call i goes to replicas[i % len] and fails after `fail_after[i]` chunks (0: before any; None or
    past the list: never); `fail_after` may instead be a function of the call's GenParams. `kill(name)` makes that replica's running streams fail at their next
    chunk and its later calls fail at once, as a dead Serve replica's do.
    """

    def __init__(self, replicas, pool, fail_after=(), error=ConnectionError):
        self.replicas, self.pool, self.error = list(replicas), pool, error
        self.fail_after = fail_after if callable(fail_after) else list(fail_after)
        self.caches = {r.replica: {} for r in self.replicas}
        self.calls: list[tuple[str, GenParams]] = []
        self.dead: set[str] = set()

    def kill(self, name: str) -> None:
        self.dead.add(name)

    async def __call__(self, p: GenParams, sid: str):
        i = len(self.calls)
        live = [r for r in self.replicas if r.replica not in self.dead] or self.replicas
        r = live[i % len(live)]
        self.calls.append((r.replica, p))
        if callable(self.fail_after):
            cut = self.fail_after(p)
        else:
            cut = self.fail_after[i] if i < len(self.fail_after) else None
        session = self.caches[r.replica].setdefault(sid, SessionCache()) if sid else None
        n = 0
        if cut == 0 or r.replica in self.dead:
            raise self.error(f"replica {r.replica} is gone")
        async with contextlib.aclosing(r.generate(p, session, self.pool)) as chunks:  # a dead replica stops
            async for chunk in chunks:
                if n == cut or r.replica in self.dead:
                    raise self.error(f"replica {r.replica} died")
                n += 1
                yield chunk


def idle(replica, timeout_s: float = 5.0) -> bool:
    """Whether `replica` runs nothing within `timeout_s` (an aborted batched request leaves at the next round)."""
    deadline = time.monotonic() + timeout_s
    while replica.active and time.monotonic() < deadline:
        time.sleep(0.02)
    return replica.active == 0


def _decode(lm, ids):
    return lm.tokenizer.decode(ids, skip_special_tokens=True)


def _req(prompt, n, mode="ar", **kw):
    return pb.GenerateRequest(prompt=prompt, max_tokens=n, speculation=pb.SpeculationParams(mode=MODES[mode]), **kw)


# ---------------------------------------------------------------------------- the engine's continuation


def _straddling_stop(lm, ids, lo: int = 10):
    """(cut, stop): a 4-character stop string from 2 characters before token `cut` ends to 2 after,
    found nowhere earlier in the text (None when the output has no clean boundary)."""
    text = _decode(lm, ids)
    for cut in range(lo, len(ids) - lo):
        at = len(_decode(lm, ids[:cut]))
        stop = text[at - 2:at + 2]
        if len(stop) == 4 and "\ufffd" not in stop and text.find(stop) == at - 2:
            return cut, stop
    pytest.skip("no clean boundary in this output")


def test_a_resumed_text_stream_joins_the_released_text_and_finds_a_straddling_stop(tiny):
    lm = tiny["target"]
    ids = ar_ids(tiny, "The quick brown fox", 80)
    whole = _decode(lm, ids)
    cut = len(ids) // 2
    released, _ = TextStream(lm.tokenizer).push(ids[:cut])
    rest = TextStream(lm.tokenizer)
    rest.resume(ids[:cut], released)
    assert released + rest.push(ids[cut:], final=True)[0] == whole
    cut, stop = _straddling_stop(lm, ids)
    released, _ = TextStream(lm.tokenizer, [stop]).push(ids[:cut])
    assert whole.startswith(released) and not released.endswith(stop[:2])  # the stop's start was held back
    rest = TextStream(lm.tokenizer, [stop])
    rest.resume(ids[:cut], released)
    delta, keep = rest.push(ids[cut:], final=True)
    plain = TextStream(lm.tokenizer, [stop])
    assert (released + delta, keep) == plain.push(ids, final=True) and keep is not None
    with pytest.raises(ValueError, match="same model"):
        TextStream(lm.tokenizer).resume(ids[:cut], "not this text")


@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_generate_and_the_engine_resumed_anywhere_equal_the_undisturbed_run(tiny, mode):
    lm = tiny["target"]
    draft = tiny["draft-random"] if mode == "sd" else None
    prompt = lm.encode("The quick brown fox")
    spec = SpecConfig(mode=mode)
    whole = list(generate(lm, draft, prompt, 40, spec=spec))
    ids = [t for c in whole for t in c.token_ids]
    text = "".join(c.text for c in whole)
    for n in (1, 7, 23, 39):
        released = TextStream(lm.tokenizer).push(ids[:n])[0]  # what a client had been sent
        rest = list(generate(lm, draft, prompt, 40, spec=spec, resume_ids=ids[:n], resume_text=released))
        assert ids[:n] + [t for c in rest for t in c.token_ids] == ids, n
        assert released + "".join(c.text for c in rest) == text
        eng = Engine(lm, tiny["draft-random"], max_num_seqs=2, max_model_len=128, probe=False)
        [(out, chunks, seq)] = run_to_completion(eng, [Request(prompt, 40, spec=SpeculationParams(mode),
                                                               resume_ids=ids[:n], resume_text=released)]).values()
        assert ids[:n] + out == ids and chunks[-1].finish_reason == "length"
        assert released + "".join(c.text for c in chunks) == text
        assert (seq.stats.new_tokens, seq.stats.prompt_tokens) == (40, len(prompt))
    with pytest.raises(ValueError, match="whole budget"):
        next(generate(lm, None, prompt, 4, spec=SpecConfig(mode="ar"), resume_ids=ids[:4]))


# ---------------------------------------------------------------------------- RouterCore resumes


async def _call(core, kind, mode, prompt, n, **kw):
    """(chunks, the Session afterwards or None) of one call of `kind`."""
    req = _req(prompt, n, mode, **kw)
    if kind == "generate":
        reply = await core.generate(req)
        return [pb.GenerateChunk(token_ids=reply.token_ids, text=reply.text, stats=reply.stats)], None
    if kind == "stream":
        return await collect(core.generate_stream(req)), None
    if kind == "openai-chat":
        return await collect(core.chat_messages(req, [{"role": "user", "content": prompt}])), None
    chunks = await collect(core.chat(pb.ChatRequest(message=prompt, max_tokens=n, speculation=req.speculation,
                                                    stop=req.stop)))
    s = await core.get_session(pb.GetSessionRequest(session_id=chunks[0].session_id,
                                                    session_token=chunks[0].session_token))
    return chunks, s


@pytest.mark.parametrize("kind, mode", [("generate", "ar"), ("stream", "sd"), ("stream", "ssd"),
                                        ("chat", "ar"), ("chat", "ssd"), ("openai-chat", "sd")])
def test_a_failure_mid_stream_is_resumed_exactly(tiny, replica, pool, kind, mode):
    prompt, n = "def add(a, b):", 60

    async def main():
        undisturbed, _ = await _call(RouterCore(MemorySessionStore(), Flaky([replica], pool)), kind, mode, prompt, n)
        flaky = Flaky([replica], pool, fail_after=[0, 3, 0, 2])  # restarting, died after 3, restarting, after 2
        chunks, session = await _call(RouterCore(MemorySessionStore(), flaky, backoff_s=0.01), kind, mode, prompt, n)
        return undisturbed, chunks, session, flaky

    undisturbed, chunks, session, flaky = run(main())
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == [t for c in undisturbed for t in c.token_ids] and len(ids) == n
    assert "".join(c.text for c in chunks) == "".join(c.text for c in undisturbed) == _decode(tiny["target"], ids)
    st = chunks[-1].stats
    assert (st.resumed, st.new_tokens, st.mode, st.finish_reason) == (2, n, mode, "length")
    if kind != "generate":
        assert st.rounds == len(chunks) and all(not c.HasField("stats") for c in chunks[:-1])
    sent = [p.resume_ids for _, p in flaky.calls]  # each resume carries exactly what the client had
    assert len(sent) == 5 and sent[0] == sent[1] == [] and len(sent[2]) == len(sent[3]) > 0
    assert sent[3] == ids[:len(sent[3])] and sent[4] == ids[:len(sent[4])] and len(sent[4]) > len(sent[3])
    assert all(p.max_tokens == n and p.mode == mode for _, p in flaky.calls)
    if session is not None:  # the turn stayed one turn, exactly what the client received
        assert [t.role for t in session.turns] == ["user", "assistant"] and not session.busy
        assert session.turns[1].complete and session.turns[1].tokens == n
        assert session.turns[1].content == "".join(c.text for c in chunks)
    assert idle(replica)


def test_a_stop_string_across_the_resume_boundary_still_stops(tiny, replica, pool):
    lm = tiny["target"]
    prompt, n = "The quick brown fox", 80
    ids = ar_ids(tiny, prompt, n)
    cut, stop = _straddling_stop(lm, ids)
    text = _decode(lm, ids)

    async def main():
        req = _req(prompt, n, "ar", stop=[stop])
        plain = await collect(RouterCore(MemorySessionStore(), Flaky([replica], pool)).generate_stream(req))
        core = RouterCore(MemorySessionStore(), Flaky([replica], pool, fail_after=[cut]), backoff_s=0.0)
        return plain, await collect(core.generate_stream(req))

    plain, resumed = run(main())
    assert [t for c in resumed for t in c.token_ids] == [t for c in plain for t in c.token_ids]
    assert "".join(c.text for c in resumed) == "".join(c.text for c in plain) == text[:text.find(stop)]
    assert resumed[-1].stats.finish_reason == "stop" and resumed[-1].stats.resumed == 1


# ---------------------------------------------------------------------------- sampling keeps the law


@pytest.fixture(scope="module")
def law_pair():
    return LM(tiny_model(V, seed=1, init_std=0.5)), LM(tiny_model(V, seed=3, layers=1, init_std=0.5))


def _resumed_counts(law_pair, pool, batched: bool, mode: str, draws: int = 1500) -> torch.Tensor:
    """Counts of (t1, t2) of `draws` seeded requests for [1, 2, 3], each failing after its first chunk."""
    target, draft = law_pair
    engine = Engine(target, draft, max_num_seqs=8, max_model_len=64, max_queue_len=2 * draws, probe=False) \
        if batched else None
    w = TargetReplica(target, draft, replica="law", engine=engine)
    flaky = Flaky([w], pool, fail_after=lambda p: None if p.resume_ids else 1)  # every first attempt fails
    core = RouterCore(MemorySessionStore(), flaky, backoff_s=0.0)

    async def one(seed):
        return await core.generate(pb.GenerateRequest(
            prompt_ids=[1, 2, 3], max_tokens=2, sampling=pb.Sampling(temperature=1.0, seed=seed),
            speculation=pb.SpeculationParams(mode=MODES[mode], k=1 if mode == "sd" else None)))

    async def many():
        return await asyncio.gather(*(one(seed) for seed in range(draws)))

    try:
        replies = run(many())
    finally:
        w.close()
    counts = torch.zeros(V * V)
    for r in replies:
        counts[r.token_ids[0] * V + r.token_ids[1]] += 1
    resumed = sum(r.stats.resumed for r in replies)
    assert resumed > (draws * 0.9 if mode == "ar" else draws * 0.2), resumed  # sd: a full accept ends in 1 chunk
    return counts


@pytest.mark.parametrize("batched, mode", [(True, "ar"), (True, "sd"), (False, "ar")],
                         ids=["batched-ar", "batched-sd", "per-sequence-ar"])
def test_sampling_across_a_resume_keeps_the_targets_law(law_pair, pool, batched, mode):
    sp = SamplingParams(1.0)
    law = exact_two_token_law(law_pair[0].model, [1, 2, 3], sp)
    assert chi2_pvalue(_resumed_counts(law_pair, pool, batched, mode), law) > 1e-3


def test_the_law_test_fails_when_a_resume_replays_its_seed(law_pair, pool, monkeypatch):
    """The check above can fail: resuming with the first attempt's own seed ties t2 to t1's draw."""
    monkeypatch.setattr("specserve.engine.sequence.resume_seed", lambda seed, position: seed)
    law = exact_two_token_law(law_pair[0].model, [1, 2, 3], SamplingParams(1.0))
    assert chi2_pvalue(_resumed_counts(law_pair, pool, True, "ar"), law) < 1e-6
    assert sampling_mod.resume_seed(7, 3) != 7 and sampling_mod.resume_seed(None, 3) is None


# ---------------------------------------------------------------------------- batches, limits


def test_one_replica_dying_resumes_all_its_streams_and_no_other(tiny, pool):
    lm = tiny["target"]
    reps = [TargetReplica(lm, tiny["draft-same"], replica=name,
                          engine=Engine(lm, tiny["draft-same"], max_num_seqs=4, max_model_len=256, probe=False))
            for name in ("r0", "r1")]
    flaky = Flaky(reps, pool)
    core = RouterCore(MemorySessionStore(), flaky, backoff_s=0.01)
    prompts = ["def add(a, b):", "The quick brown fox", "class Stack:", "x = [1, 2, 3]"] * 2
    got: dict[int, list] = {}

    async def one(i):
        chunks = []
        async for c in core.generate_stream(_req(prompts[i], 120, "ar" if i % 2 else "sd")):
            chunks.append(c)
            if i == 0 and len(chunks) == 5:
                flaky.kill("r0")  # r0's batch dies together: every stream it runs fails at its next chunk
        got[i] = chunks

    async def main():
        await asyncio.gather(*(one(i) for i in range(8)))

    try:
        run(main())
    finally:
        for r in reps:
            r.close()
    first_replica = [name for name, _ in flaky.calls[:8]]
    assert sorted(first_replica) == ["r0"] * 4 + ["r1"] * 4
    for i, chunks in got.items():
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == ar_ids(tiny, prompts[i], 120), i
        assert "".join(c.text for c in chunks) == _decode(lm, ids)
        st = chunks[-1].stats
        assert st.replica == "r1" and st.resumed == (first_replica[i] == "r0"), (i, first_replica[i], st)


@pytest.mark.parametrize("after", [0, 4])
def test_all_replicas_down_is_unavailable_naming_what_was_tried(replica, pool, after):
    flaky = Flaky([replica], pool, fail_after=[None, after] + [0] * 50)  # a first turn, then all down
    core = RouterCore(MemorySessionStore(), flaky, retries=3, backoff_s=0.01)
    ar = pb.SpeculationParams(mode=pb.MODE_AR)

    async def main():
        first = await collect(core.chat(pb.ChatRequest(message="hello", max_tokens=5, speculation=ar)))
        sid, tok = first[0].session_id, first[0].session_token
        got = []
        with pytest.raises(ApiError) as e:
            async for c in core.chat(pb.ChatRequest(session_id=sid, session_token=tok, message="more", max_tokens=40,
                                                    speculation=ar)):
                got.append(c)
        return got, e.value, await core.get_session(pb.GetSessionRequest(session_id=sid, session_token=tok))

    got, err, s = run(main())
    assert len(got) == after and err.code == "UNAVAILABLE" and len(flaky.calls) == 1 + 4
    assert "4 failures in a row" in err.message and "3 times, with backoff" in err.message, err.message
    assert ("resumed the generation after the" if after else "sent the request again") in err.message
    assert "ConnectionError" in err.message and "retry the request later" in err.message
    assert not s.busy and [t.content for t in s.turns[:1]] == ["hello"]
    if after:  # nothing half-written: the turn ended holding exactly what the client received
        assert [t.role for t in s.turns] == ["user", "assistant"] * 2 and not s.turns[3].complete
        assert s.turns[3].tokens == sum(len(c.token_ids) for c in got)
        assert s.turns[3].content == "".join(c.text for c in got)
    else:  # nothing committed: no trace of the turn
        assert [t.role for t in s.turns] == ["user", "assistant"]
    assert idle(replica)


def test_refusals_are_not_retried_but_a_full_queue_is_once_resuming(replica, pool):
    async def refused(code_error, after):
        flaky = Flaky([replica], pool, fail_after=[after, None], error=lambda msg: code_error)
        core = RouterCore(MemorySessionStore(), flaky, backoff_s=0.0)
        try:
            return await collect(core.generate_stream(_req("hi", 20))), len(flaky.calls)
        except ApiError as e:
            return e, len(flaky.calls)

    bad, calls = run(refused(ApiError("INVALID_ARGUMENT", "no"), 0))
    assert isinstance(bad, ApiError) and bad.code == "INVALID_ARGUMENT" and calls == 1
    full, calls = run(refused(QueueFull("queue full"), 0))  # before any chunk: the client hears 429 at once
    assert isinstance(full, QueueFull) and calls == 1
    chunks, calls = run(refused(QueueFull("queue full"), 3))  # chunks went out already: wait and resume
    assert calls == 2 and chunks[-1].stats.resumed == 1 and chunks[-1].stats.new_tokens == 20


def test_a_cancelled_request_is_never_resumed(replica, pool):
    flaky = Flaky([replica], pool, fail_after=[2])
    core = RouterCore(MemorySessionStore(), flaky, backoff_s=0.5)

    async def main():
        got = []

        async def consume():
            async for c in core.generate_stream(_req("hi", 50)):
                got.append(c)

        task = asyncio.create_task(consume())
        while len(flaky.calls) < 1 or len(got) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the router is waiting to resume
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.7)  # past the backoff: nothing was sent again
        return got

    got = run(main())
    assert len(got) == 2 and len(flaky.calls) == 1


def test_a_failure_after_the_last_chunk_is_not_resumed(replica, pool):
    async def target(p, sid):
        async for c in replica.generate(p, None, pool):
            yield c
        raise ConnectionError("the stream's end broke")

    reply = run(RouterCore(MemorySessionStore(), target).generate(_req("hi", 6)))
    assert len(reply.token_ids) == 6 and reply.stats.resumed == 0
