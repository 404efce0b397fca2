"""The batching engine on tiny models: greedy exactness against batch-1 runs, stops, aborts, memory."""

import pytest
import torch

from specserve.engine.engine import Engine, run_to_completion
from specserve.engine.lm import LM, load_model
from specserve.engine.scheduler import QueueFull
from specserve.engine.sequence import Request, SpeculationParams
from specserve.engine.speculative import SpecConfig
from specserve.engine.single import generate

N_NEW = 20


def ar_reference(target, ids, n=N_NEW, stop=()):
    return [t for c in generate(target, None, ids, n, spec=SpecConfig(mode="ar"), stop=stop) for t in c.token_ids]


@pytest.fixture(scope="module")
def prompts(tiny):
    """Ragged prompts: 1 to 300 tokens (the tiny models' window is tiny['target'].max_len)."""
    tok = tiny["target"].tokenizer
    g = torch.Generator().manual_seed(0)
    text = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    out = [[5], text, (text * 40)[:300], torch.randint(3, 500, (41,), generator=g).tolist(),
           tok("The quick brown fox")["input_ids"], torch.randint(3, 500, (130,), generator=g).tolist()]
    assert max(len(p) for p in out) == 300 < tiny["target"].max_len
    return out


@pytest.fixture(scope="module")
def refs(tiny, prompts):
    return [ar_reference(tiny["target"], p) for p in prompts]


def spec(mode, k=None):
    return SpeculationParams(mode=mode, k=k)


def engine(tiny, draft=None, slots=4, **kw):
    kw.setdefault("stop_prob", 0.0)  # drafts of the planned k exactly; the early stop has its own test
    return Engine(tiny["target"], tiny[draft] if draft else None, max_num_seqs=slots, max_model_len=512, **kw)


CASES = [("ar", None, None), ("sd", "draft-same", 3), ("sd", "draft-random", 2), ("sd", "draft-random", None),
         ("sd", "draft-same", None)]


@pytest.mark.parametrize("mode, draft, k", CASES, ids=[f"{m}-{d}-k{k}" for m, d, k in CASES])
def test_every_row_of_a_batch_equals_its_batch_1_run(tiny, prompts, refs, mode, draft, k):
    """6 ragged prompts over 4 slots: two wait, then join while the others are mid-generation."""
    eng = engine(tiny, draft)
    res = run_to_completion(eng, [Request(p, N_NEW, spec=spec(mode, k)) for p in prompts[:4]],
                            join_at={3: [Request(prompts[4], N_NEW, spec=spec(mode, k))],
                                     5: [Request(prompts[5], N_NEW, spec=spec(mode, k))]})
    outs = [v[0] for v in res.values()]
    assert outs == refs
    assert eng.stats.to_dict(eng)["mean_batch"] > 2
    solo = [run_to_completion(engine(tiny, draft, slots=1), [Request(p, N_NEW, spec=spec(mode, k))])
            for p in prompts[:2]]
    assert [next(iter(r.values()))[0] for r in solo] == refs[:2]
    st = next(iter(res.values()))[2].stats
    assert st.rounds >= 1 and st.new_tokens == N_NEW and st.verify_s > 0 and 0 < st.ttft_s <= st.elapsed_s + 1e-3
    if draft == "draft-same" and k is not None:
        assert all(s.stats.acceptance_rate == 1.0 for _, _, s in res.values())
        assert eng.stats.accepted_tokens == eng.stats.draft_tokens > 0


def test_the_early_stop_ends_each_rows_draft_on_its_own_and_stays_exact(tiny, prompts, refs):
    """stop_prob 0.003 (the tiny draft gives most tokens ~0.002): in a batch with joins, each sd row
    ends its draft after a token it doubts, before k = 5, while the others go on drafting."""
    eng = engine(tiny, "draft-random", stop_prob=0.003)
    res = run_to_completion(eng, [Request(p, N_NEW, spec=spec("sd", 5)) for p in prompts[:4]],
                            join_at={3: [Request(prompts[4], N_NEW, spec=spec("sd", 5))],
                                     5: [Request(prompts[5], N_NEW, spec=spec("sd", 5))]})
    assert [v[0] for v in res.values()] == refs
    drafted = [d for _, _, s in res.values() for d in s.stats.drafted_per_round]
    assert max(drafted) <= 5 and sum(0 < d < 5 for d in drafted) >= len(drafted) // 4
    assert eng.stats.draft_tokens == sum(drafted)


CHUNK_CASES = [("ar", None, None), ("sd", "draft-same", 3), ("sd", "draft-random", None)]


@pytest.mark.parametrize("mode, draft, k", CHUNK_CASES, ids=[f"{m}-{d}-k{k}" for m, d, k in CHUNK_CASES])
def test_long_prompts_are_prefilled_in_chunks_while_the_others_decode_exactly(tiny, prompts, refs, mode, draft, k):
    """max_prefill_tokens=64: the 300- and 130-token prompts are fed over several rounds, no forward
    prefills more than 64 prompt tokens, the short rows commit tokens meanwhile, and every row
    equals its batch-1 ar run."""
    eng = engine(tiny, draft, max_prefill_tokens=64)
    fed, forward = [], eng.trun.forward

    def spy(slots, tokens, lens, keep):  # a row feeds lens - keep + 1 uncached tokens (keep = drafts + 1)
        fed.append(sum(n - kp + 1 for n, kp in zip(lens, keep) if n - kp > 0))
        return forward(slots, tokens, lens, keep)

    eng.trun.forward = spy
    reqs = [Request(p, N_NEW, spec=spec(mode, k)) for p in prompts[:4]]
    ids = [eng.add(r) for r in reqs]
    got, first_of_long = {i: [] for i in ids}, None
    for rnd in range(500):
        if rnd == 2:
            rid = eng.add(Request(prompts[5], N_NEW, spec=spec(mode, k)))  # joins while the long one prefills
            ids.append(rid)
            got[rid] = []
        for rid, chunk in eng.step():
            got[rid].extend(chunk.token_ids)
            if rid == ids[2] and first_of_long is None and chunk.token_ids:
                first_of_long = {i: len(got[i]) for i in ids[:2]}
        if not eng.has_work():
            break
    assert [got[i] for i in ids] == refs[:4] + [refs[5]]
    assert max(fed) <= 64 and eng.stats.prefill_chunks >= 300 // 64
    assert min(first_of_long.values()) >= 3  # the short rows decoded while the 300-token prompt was fed
    assert eng.trun.cache.num_free == 4 and not eng.seqs


def test_a_seeded_sampled_row_draws_the_same_tokens_whether_its_prompt_is_chunked_or_not(tiny, prompts):
    """A chunk round draws nothing from the row's generator (fixed k: the same draws per round after it)."""
    from specserve.engine.sampling import SamplingParams

    def run(budget):
        eng = engine(tiny, "draft-random", max_prefill_tokens=budget)
        res = run_to_completion(eng, [Request(prompts[5], N_NEW, SamplingParams(temperature=1.0), seed=7,
                                              spec=spec("sd", 2)), Request(prompts[1], N_NEW, spec=spec("ar"))])
        return [v[0] for v in res.values()], eng.stats.prefill_chunks

    (chunked, c1), (whole, c0) = run(16), run(512)
    assert c1 >= 130 // 16 and c0 == 0
    assert chunked == whole


def test_rows_finish_at_different_rounds_by_eos_stop_and_budget(tiny, tiny_dir, prompts, refs):
    target = load_model(str(tiny_dir / "target"), dtype="float32")  # a private copy to change
    eos = refs[1][9]
    target.model.generation_config.eos_token_id = eos
    tok = target.tokenizer
    full = tok.decode(refs[3], skip_special_tokens=True)
    stop = full[12:15]
    assert stop.strip() and eos not in refs[3][:12]
    for draft, k in ((None, None), (tiny["draft-same"], 4), (tiny["draft-random"], 2)):
        mode = "ar" if draft is None else "sd"
        eng = Engine(target, draft, max_num_seqs=4, max_model_len=512)
        reqs = [Request(prompts[1], N_NEW, spec=spec(mode, k)),  # eos
                Request(prompts[3], N_NEW, stop=[stop], spec=spec(mode, k)),  # stop string
                Request(prompts[5], 7, spec=spec(mode, k)),  # budget, cut mid-round
                Request(prompts[0], N_NEW, spec=spec(mode, k))]
        res = list(run_to_completion(eng, reqs).values())
        ids = [r[0] for r in res]
        reasons = [r[2].finish_reason for r in res]
        assert ids[0] == ar_reference(target, prompts[1])[: refs[1].index(eos) + 1] and reasons[0] == "eos"
        assert ids[1] == ar_reference(target, prompts[3], stop=[stop]) and reasons[1] == "stop"
        assert "".join(c.text for c in res[1][1]) == full[: full.find(stop)]
        assert ids[2] == ar_reference(target, prompts[5], 7) and reasons[2] == "length"
        assert [c.finish_reason for c in res[2][1]][-1] == "length"
        rounds = {r[2].stats.rounds for r in res}
        assert len(rounds) >= 2, "the rows should not all finish in the same round"


def test_abort_mid_batch_frees_the_slot_and_the_others_stay_exact(tiny, prompts, refs):
    eng = engine(tiny, "draft-random", slots=3)
    ids = [eng.add(Request(p, N_NEW, spec=spec("sd", 2))) for p in prompts[:3]]
    late = eng.add(Request(prompts[3], N_NEW, spec=spec("sd", 2)))  # waits for a slot
    got = {i: [] for i in ids + [late]}
    reasons = {}
    for rnd in range(200):
        if rnd == 3:
            eng.abort(ids[1])
            assert eng.trun.cache.num_free == 0  # takes effect at the next round boundary
        for rid, chunk in eng.step():
            got[rid].extend(chunk.token_ids)
            if chunk.finish_reason:
                reasons[rid] = chunk.finish_reason
        if rnd == 3:
            assert reasons[ids[1]] == "abort" and eng.scheduler.running[-1].id == late
        if not eng.has_work():
            break
    assert reasons == {ids[0]: "length", ids[1]: "abort", ids[2]: "length", late: "length"}
    assert got[ids[0]] == refs[0] and got[ids[2]] == refs[2] and got[late] == refs[3]
    assert got[ids[1]] == refs[1][: len(got[ids[1]])] and len(got[ids[1]]) < N_NEW
    assert eng.trun.cache.num_free == 3 and eng.drun.cache.num_free == 3 and not eng.seqs


def test_k_0_skips_the_draft_and_the_draft_catches_up_when_speculation_resumes(tiny, prompts, refs):
    from specserve.engine.scheduler import CostModel, LinearCost

    costly = CostModel(LinearCost(1.0, 0.0), LinearCost(5.0, 0.0))  # drafting never pays
    eng = engine(tiny, "draft-same", cost=costly, k_init=0)
    ids = [eng.add(Request(p, N_NEW, spec=spec("sd"))) for p in prompts[:3]]
    got = {i: [] for i in ids}
    for _ in range(6):
        for rid, chunk in eng.step():
            got[rid].extend(chunk.token_ids)
    assert eng.stats.draft_tokens == 0 and all(eng.drun.cache.length(eng.seqs[i].slot) == 0 for i in ids)
    eng.policy.cost = CostModel(LinearCost(1.0, 0.0), LinearCost(0.01, 0.0))  # now it is nearly free
    while eng.has_work():
        for rid, chunk in eng.step():
            got[rid].extend(chunk.token_ids)
    assert [got[i] for i in ids] == refs[:3]
    assert eng.policy.k > 0 and eng.stats.draft_tokens > 0 and eng.stats.accepted_tokens == eng.stats.draft_tokens


def only(res):
    (tokens, _, seq), = res.values()
    return tokens, seq


def test_a_session_key_parks_its_slot_and_the_next_turn_keeps_the_common_prefix(tiny, prompts):
    """Turn 2 = turn 1's prompt + output + a new message: only the new part is prefilled, and the
    output is the batch-1 run of the whole history; a history that diverges keeps what is common;
    a parked slot gives way when a request needs it."""
    target = tiny["target"]
    eng = engine(tiny, "draft-random", slots=2)
    res = run_to_completion(eng, [Request(prompts[1], N_NEW, spec=spec("sd"), cache_key="s1"),
                                  Request(prompts[3], N_NEW, spec=spec("sd"))])
    out1 = list(res.values())[0][0]
    assert list(eng.parked) == ["s1"] and eng.trun.cache.num_free == 1  # the keyless row's slot was freed
    history = prompts[1] + out1
    turn2 = history + prompts[4]
    tokens, seq = only(run_to_completion(eng, [Request(turn2, N_NEW, spec=spec("sd"), cache_key="s1")]))
    assert tokens == ar_reference(target, turn2)
    assert len(history) - 1 <= seq.stats.prefix_reused <= len(history)  # the last token may be uncached
    edited = prompts[1] + out1[:3] + prompts[0]  # the client changed the conversation after 3 tokens
    tokens, seq = only(run_to_completion(eng, [Request(edited, N_NEW, spec=spec("ar"), cache_key="s1")]))
    assert tokens == ar_reference(target, edited) and seq.stats.prefix_reused == len(prompts[1]) + 3
    # two keyless requests need both slots: the parked one is dropped, and the next turn prefills all
    run_to_completion(eng, [Request(p, 4, spec=spec("sd")) for p in prompts[2:4]])
    assert not eng.parked and eng.trun.cache.num_free == 2 and eng.drun.cache.num_free == 2
    tokens, seq = only(run_to_completion(eng, [Request(turn2, N_NEW, spec=spec("sd"), cache_key="s1")]))
    assert tokens == ar_reference(target, turn2) and seq.stats.prefix_reused == 0
    assert eng.drop_parked("s1") and not eng.drop_parked("s1") and eng.trun.cache.num_free == 2


def test_a_long_new_message_after_a_parked_prefix_is_prefilled_in_chunks_exactly(tiny, prompts):
    """Turn 2's new part (41 tokens) with 8 prompt tokens a round: it is fed in chunks from the end
    of the parked prefix, the sd draft keeps up chunk by chunk, and the output is the batch-1 run."""
    target = tiny["target"]
    eng = engine(tiny, "draft-same", slots=2, max_prefill_tokens=8)
    out1 = only(run_to_completion(eng, [Request(prompts[1], N_NEW, spec=spec("sd", 3), cache_key="s")]))[0]
    history = prompts[1] + out1
    turn2 = history + prompts[3]
    chunks0, fed, forward = eng.stats.prefill_chunks, [], eng.drun.forward

    def spy(slots, tokens, lens, keep):
        fed.append(sum(lens))
        return forward(slots, tokens, lens, keep)

    eng.drun.forward = spy
    tokens, seq = only(run_to_completion(eng, [Request(turn2, N_NEW, spec=spec("sd", 3), cache_key="s")]))
    assert tokens == ar_reference(target, turn2)
    assert seq.stats.prefix_reused >= len(history) - 1 and eng.stats.prefill_chunks - chunks0 >= 41 // 8 - 1
    # the draft was fed chunk by chunk too: a chunk, plus at most the k tokens its cache lagged the target's
    assert max(fed) <= 8 + 3 and seq.stats.acceptance_rate == 1.0


def test_drop_parked_unkeys_a_running_or_waiting_request_so_nothing_is_parked(tiny, prompts):
    """A session deleted while its turn runs (or waits): the turn frees its slot when it ends."""
    target = tiny["target"]
    eng = engine(tiny, "draft-random", slots=1)
    run_id = eng.add(Request(prompts[1], N_NEW, spec=spec("sd"), cache_key="s1"))
    wait_id = eng.add(Request(prompts[4], N_NEW, spec=spec("ar"), cache_key="s2"))  # no slot for it yet
    got = {run_id: [], wait_id: []}
    for rid, chunk in eng.step():
        got[rid].extend(chunk.token_ids)
    assert eng.seqs[run_id].slot is not None and eng.seqs[wait_id].slot is None
    assert not eng.drop_parked("s1") and not eng.drop_parked("s2")  # nothing parked yet: both un-keyed
    while eng.has_work():
        for rid, chunk in eng.step():
            got[rid].extend(chunk.token_ids)
    assert got[run_id] == ar_reference(target, prompts[1]) and got[wait_id] == ar_reference(target, prompts[4])
    assert not eng.parked and eng.trun.cache.num_free == 1 and eng.drun.cache.num_free == 1
    # the same key afterwards parks again (the key is not banned, only what it held is forgotten)
    run_to_completion(eng, [Request(prompts[1], 4, spec=spec("sd"), cache_key="s1")])
    assert list(eng.parked) == ["s1"]


def test_slot_cache_does_not_grow_over_200_requests(tiny):
    eng = engine(tiny, "draft-random", slots=8, max_queue_len=256)
    caches = (eng.trun.cache, eng.drun.cache)
    before = [(c.storage_ids(), c.bytes) for c in caches]
    g = torch.Generator().manual_seed(3)
    reqs = [Request(torch.randint(3, 500, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist(),
                    int(torch.randint(1, 6, (1,), generator=g)), spec=spec("sd" if i % 2 else "ar", 2))
            for i in range(200)]
    res = run_to_completion(eng, reqs)
    assert len(res) == 200 and all(s.finish_reason == "length" for _, _, s in res.values())
    assert [(c.storage_ids(), c.bytes) for c in caches] == before
    assert eng.trun.cache.num_free == 8 and not eng.seqs
    assert eng.stats.to_dict(eng)["mean_batch"] > 4


def test_a_full_queue_raises_naming_the_limit(tiny, prompts):
    eng = engine(tiny, None, slots=1, max_queue_len=2)
    for _ in range(2):
        eng.add(Request(prompts[0], 2, spec=spec("ar")))
    with pytest.raises(QueueFull, match=r"queue full: 2 requests waiting \(max_queue_len\); retry later or raise"):
        eng.add(Request(prompts[0], 2, spec=spec("ar")))
    eng.step()  # one is admitted: room again
    eng.add(Request(prompts[0], 2, spec=spec("ar")))


def test_bad_requests_name_the_field_and_the_fix(tiny, prompts):
    eng = engine(tiny, None, slots=1)
    with pytest.raises(ValueError, match="prompt is 600 tokens but max_model_len is 512: shorten the prompt or raise"):
        eng.add(Request([5] * 600, spec=spec("ar")))
    with pytest.raises(ValueError, match="needs a draft model"):
        eng.add(Request(prompts[0]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.add(Request(prompts[0], 0, spec=spec("ar")))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        eng.add(Request([1, 9999], spec=spec("ar")))
    with pytest.raises(ValueError, match="max_model_len is 4096 but the model's context window is 2048"):
        Engine(tiny["target"], max_model_len=4096)
    with pytest.raises(ValueError, match="mode must be ar, sd or ssd, got 'hf'"):
        SpeculationParams(mode="hf")
    with pytest.raises(ValueError, match=r"mode 'ssd' needs the request's drafter \(Request.drafter"):
        engine(tiny).add(Request(prompts[1], 4, spec=spec("ssd")))


def test_other_families_run_through_the_serial_fallback_exactly():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                       eos_token_id=None)).eval()
    lm = LM(model)
    eng = Engine(lm, lm, max_num_seqs=3, max_model_len=128)
    assert eng.capacity()["runner"] == "serial"
    ps = [[1, 2, 3], [7], list(range(10, 40))]
    res = run_to_completion(eng, [Request(p, 12, spec=spec("sd", 3)) for p in ps] + [Request(ps[0], 12, spec=spec("ar"))])
    outs = [v[0] for v in res.values()]
    assert outs == [ar_reference(lm, p, 12) for p in ps] + [ar_reference(lm, ps[0], 12)]
    chunked = Engine(lm, lm, max_num_seqs=3, max_model_len=128, max_prefill_tokens=8)  # the 30-token prompt in 4
    res = run_to_completion(chunked, [Request(p, 12, spec=spec("sd", 3)) for p in ps])
    assert [v[0] for v in res.values()] == outs[:3] and chunked.stats.prefill_chunks >= 3
