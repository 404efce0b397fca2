"""ssd rows in the batching engine: each row's RemoteDrafter over a real gRPC speculation stream."""

import pytest
import torch

from specserve.engine.engine import Engine, run_to_completion
from specserve.engine.sampling import SamplingParams
from specserve.engine.sequence import Request, SpeculationParams
from specserve.pipeline.local_draft_worker import LocalDraftWorker
from specserve.pipeline.remote_drafter import DraftClient, RemoteDrafter

from test_batch_engine import ar_reference
from test_batch_sampling import V, chi2_pvalue, exact_two_token_law
from test_ssd_generate import law_pair

N_NEW = 24


@pytest.fixture(scope="module")
def prompts(tiny):
    tok = tiny["target"].tokenizer
    g = torch.Generator().manual_seed(5)
    text = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    return [[7], text, (text * 30)[:250], torch.randint(3, 500, (37,), generator=g).tolist(),
            tok("Once upon a time")["input_ids"]]


def ssd_request(client, target, ids, n=N_NEW, k=3, sp=None, seed=0, **kw):
    sp = sp or SamplingParams()
    drafter = RemoteDrafter(client, ids, target.vocab_size, sampling=sp, k=k, seed=seed, max_new_tokens=n)
    return Request(ids, n, sp, seed, spec=SpeculationParams("ssd", k), drafter=drafter, **kw)


def test_ssd_rows_of_a_batch_equal_their_batch_1_ar_runs(tiny, draft_clients, prompts):
    """ssd rows (a perfect and a random draft) beside sd and ar rows, ragged, two joining late, one
    aborted: every finished row equals ar at batch 1, the perfect draft hits its speculation cache."""
    target = tiny["target"]
    refs = [ar_reference(target, p, N_NEW) for p in prompts]
    eng = Engine(target, tiny["draft-random"], max_num_seqs=4, max_model_len=512)
    reqs = [ssd_request(draft_clients["draft-same"], target, prompts[0]),
            ssd_request(draft_clients["draft-random"], target, prompts[1], k=2),
            Request(prompts[2], N_NEW, spec=SpeculationParams("sd")),
            ssd_request(draft_clients["draft-same"], target, prompts[3], k=4)]
    late = {2: [Request(prompts[4], N_NEW, spec=SpeculationParams("ar"))],
            4: [ssd_request(draft_clients["draft-same"], target, prompts[4], k=3)]}
    ids = [eng.add(r) for r in reqs]
    res = {i: [] for i in ids}
    seqs = {i: eng.seqs[i] for i in ids}
    rnd = 0
    while eng.has_work() or late:
        for r in late.pop(rnd, []):
            rid = eng.add(r)
            res[rid], seqs[rid] = [], eng.seqs[rid]
        if rnd == 3:
            eng.abort(ids[3])
        for rid, chunk in eng.step():
            res[rid].extend(chunk.token_ids)
        rnd += 1
    order = list(res)
    got = [res[i] for i in order]
    assert got[:3] == refs[:3] and got[4:] == [refs[4], refs[4]]
    assert seqs[ids[3]].finish_reason == "abort" and got[3] == refs[3][:len(got[3])]
    perfect = seqs[ids[0]].stats
    assert perfect.acceptance_rate == 1.0 and perfect.draft_tokens > 0 and not perfect.fallback
    hits = sum(seqs[i].stats.cache_hits for i in (ids[0], order[-1]))
    tries = sum(seqs[i].stats.cache_hits + seqs[i].stats.cache_misses for i in (ids[0], order[-1]))
    assert tries > 0 and hits / tries >= 0.9, (hits, tries)
    assert seqs[ids[1]].stats.draft_tokens > 0 and seqs[ids[1]].stats.cache_misses > 0  # a random draft misses
    assert eng.trun.cache.num_free == 4 and not eng.seqs
    assert eng.stats.to_dict(eng)["mean_batch"] > 2


def test_a_killed_draft_worker_leaves_every_ssd_row_exact(tiny, tiny_dir, prompts):
    target = tiny["target"]
    refs = [ar_reference(target, p, 40) for p in prompts[:3]]
    worker = LocalDraftWorker(str(tiny_dir / "draft-same"), quantize=None)
    client = DraftClient(worker.address, timeout=5)
    try:
        eng = Engine(target, None, max_num_seqs=4, max_model_len=512)
        ids = [eng.add(ssd_request(client, target, p, n=40, k=2)) for p in prompts[:3]]
        res = {i: [] for i in ids}
        seqs = {i: eng.seqs[i] for i in ids}
        rnd = 0
        while eng.has_work():
            if rnd == 3:
                worker.proc.kill()
                worker.proc.wait()
            for rid, chunk in eng.step():
                res[rid].extend(chunk.token_ids)
            rnd += 1
    finally:
        client.close()
        worker.close()
    assert [res[i] for i in ids] == refs
    for i in ids:
        st = seqs[i].stats
        assert st.fallback.startswith("ar after round") and st.draft_tokens > 0, st.fallback


def test_ssd_sampling_at_batch_4_keeps_the_targets_law():
    """Temperature 1, tiny vocabulary: (t1, t2) of seeded ssd requests run 4 at a time (with a
    sampled sd companion) follow the target's exact law."""
    sp = SamplingParams(1.0)
    with law_pair(3) as (target, draft, client):
        eng = Engine(target, draft, max_num_seqs=4, max_model_len=64, max_queue_len=2000, probe=False)
        reqs = []
        for seed in range(600):
            reqs.append(ssd_request(client, target, [1, 2, 3], n=2, k=2, sp=sp, seed=seed))
            if seed % 3 == 0:
                reqs.append(Request([4, 0, 5], 3, sp, seed + 9, spec=SpeculationParams("sd", 2)))
        res = run_to_completion(eng, reqs)
    counts = torch.zeros(V * V)
    for ids, _, s in res.values():
        if s.spec.mode == "ssd":
            counts[ids[0] * V + ids[1]] += 1
    assert counts.sum() == 600 and eng.stats.to_dict(eng)["mean_batch"] > 2
    assert chi2_pvalue(counts, exact_two_token_law(target.model, [1, 2, 3], sp)) > 1e-3


def test_the_policy_answers_misses_without_drafts_when_a_jit_draft_would_stall_the_batch(tiny, draft_clients, prompts):
    """`scheduler.ssd_miss_k`: with a draft step as dear as a verify, a miss is answered at once with no
    drafts (KPlan.miss_k = 0: that row decodes plainly for a round); with a cheap one a miss is drafted
    just in time. Both stay exact."""
    from specserve.engine.scheduler import CostModel, LinearCost

    class Fixed(LinearCost):  # the given costs, not what the tiny models measure
        def observe(self, tokens, seconds):
            pass

    target = tiny["target"]
    refs = [ar_reference(target, p, N_NEW) for p in prompts[:4]]
    seen = {}
    for name, draft_s in (("dear", 1.0), ("cheap", 0.001)):
        cost = CostModel(Fixed(1.0, 0.0), Fixed(draft_s, 0.0))
        eng = Engine(target, tiny["draft-random"], max_num_seqs=4, max_model_len=512, cost=cost)
        res = run_to_completion(eng, [ssd_request(draft_clients[d], target, p, k=3)
                                      for d, p in zip(("draft-same", "draft-random") * 2, prompts[:4])])
        assert [r[0] for r in res.values()] == refs, name
        seen[name] = (eng.stats.miss_k_rounds, [r[2].stats for r in res.values()])
    dear, cheap = seen["dear"], seen["cheap"]
    # cheap: the rows' k (3), less where the budget cuts it (a random draft's misses are worth nothing)
    assert set(dear[0]) == {0} and max(cheap[0], key=cheap[0].get) == 3, (dear[0], cheap[0])
    # the random drafts' misses: answered with no drafts (those rows decoded plainly) when dear
    dear_drafts, cheap_drafts = (sum(st.draft_tokens for st in x[1][1::2]) for x in (dear, cheap))
    assert dear_drafts < cheap_drafts and all(st.cache_misses > 0 for st in dear[1][1::2]), (dear_drafts, cheap_drafts)


def test_ssd_miss_k_weighs_the_batchs_wait_against_the_missed_rows_gain():
    from specserve.engine.scheduler import CostModel, LinearCost, ssd_miss_k

    cost = CostModel(LinearCost(1.0, 0.0), LinearCost(0.05, 0.0))  # a draft step is 5% of a verify
    assert ssd_miss_k(cost, 5, [], [(0.8, 4, 0.7)]) == 4  # batch 1: the miss's draft pays
    assert ssd_miss_k(cost, 160, [2.5] * 31, [(0.8, 4, 0.7)]) == 0  # batch 32: 31 rows would wait for it
    assert ssd_miss_k(CostModel(LinearCost(1.0, 0.0), None), 5, [], [(0.8, 4, 0.7)]) is None
    assert ssd_miss_k(cost, 5, [], [(0.8, 4, 1.0)]) == 4  # never a miss: nothing to save, keep k


def test_ssd_rows_without_a_fixed_k_take_the_policys(tiny, draft_clients, prompts):
    """An ssd request without k gets its proposals' k from the engine (`KPolicy.choose_ssd`: only the
    verify is priced): a flat verify cost asks for long proposals, one that grows steeply with tokens
    turns a poor draft's speculation off (k = 0); a request's own k is kept either way. All exact."""
    from specserve.engine.scheduler import CostModel, LinearCost

    class Fixed(LinearCost):
        def observe(self, tokens, seconds):
            pass

    target = tiny["target"]
    refs = [ar_reference(target, p, N_NEW) for p in prompts[:3]]
    ks = {}
    for name, draft, fixed_s, per_token in (("flat", "draft-same", 1.0, 0.0), ("steep", "draft-random", 0.01, 1.0)):
        eng = Engine(target, None, max_num_seqs=4, max_model_len=512, k_max=6,
                     cost=CostModel(Fixed(fixed_s, per_token), None))
        reqs = []
        for p, k in zip(prompts[:3], (None, None, 2)):  # no early stop: a proposal is the k asked for
            d = RemoteDrafter(draft_clients[draft], p, target.vocab_size, k=k, max_new_tokens=N_NEW, stop_prob=0.0)
            reqs.append(Request(p, N_NEW, spec=SpeculationParams("ssd", k), drafter=d))
        res = run_to_completion(eng, reqs)
        assert [r[0] for r in res.values()] == refs, name
        st = [r[2].stats for r in res.values()]
        ks[name] = (eng.policy.k_ssd, [max(x.drafted_per_round) for x in st])
    assert ks["flat"][0] == 6 and ks["flat"][1][:2] == [6, 6] and ks["flat"][1][2] == 2, ks
    assert ks["steep"][0] == 0 and ks["steep"][1][2] == 2, ks


def test_ssd_rows_admitted_while_the_policy_has_ssd_speculation_off_start_later_exact(tiny, draft_clients, prompts):
    """A row admitted while the policy's ssd k is 0 has no proposal out: nothing is told to its
    drafter (there is no round to answer) until a round asks for drafts, and then its drafter starts
    from the tokens committed by then. Exact throughout."""
    from specserve.engine.scheduler import CostModel, LinearCost

    class Fixed(LinearCost):
        def observe(self, tokens, seconds):
            pass

    target = tiny["target"]
    refs = [ar_reference(target, p, N_NEW) for p in prompts[:2]]
    eng = Engine(target, None, max_num_seqs=4, max_model_len=512, cost=CostModel(Fixed(1.0, 0.0), None))
    eng.policy.k_ssd, eng.policy.hysteresis = 0, 1e9  # speculation off for ssd rows when they are admitted, kept
    reqs = [ssd_request(draft_clients["draft-same"], target, p, k=None) for p in prompts[:2]]
    ids = [eng.add(r) for r in reqs]
    seqs = [eng.seqs[i] for i in ids]
    res = {i: [] for i in ids}
    rnd = 0
    while eng.has_work():
        if rnd == 3:
            eng.policy.k_ssd = 4  # ... and on again: the rows start their drafters now
        for rid, chunk in eng.step():
            res[rid].extend(chunk.token_ids)
        rnd += 1
    assert [res[i] for i in ids] == refs
    for s in seqs:
        assert s.stats.drafted_per_round[:3] == [0, 0, 0] and max(s.stats.drafted_per_round) > 0, s.stats
        assert not s.stats.fallback


def test_an_ssd_row_whose_prompt_is_prefilled_in_chunks_starts_its_drafter_after_the_last_chunk(tiny, draft_clients,
                                                                                               prompts):
    """max_prefill_tokens=32: the 250-token ssd row drafts nothing while its prompt is fed, its
    drafter starts with the whole prompt in its last prefill round, and it stays exact (a perfect
    draft then hits its cache); the short ssd row beside it speculates throughout."""
    target = tiny["target"]
    refs = [ar_reference(target, p, N_NEW) for p in prompts[:3]]
    eng = Engine(target, None, max_num_seqs=4, max_model_len=512, max_prefill_tokens=32)
    res = run_to_completion(eng, [ssd_request(draft_clients["draft-same"], target, p, k=3) for p in prompts[:3]])
    assert [tokens for tokens, _, _ in res.values()] == refs
    seqs = [s for _, _, s in res.values()]
    assert eng.stats.prefill_chunks >= 250 // 32
    long = seqs[2].stats
    assert long.rounds < N_NEW and long.cache_hits > 0 and not long.fallback  # it speculated once its prompt was in
    assert seqs[0].stats.drafted_per_round[0] > 0  # the 1-token prompt drafts in its first round


def test_ssd_rows_work_with_the_per_sequence_draft_service_too(tiny, prompts):
    """A draft worker serving the per-sequence DraftService (any non-native draft model) gets the
    engine's Batch messages too: it answers each Batch with one Replies, and every row stays exact
    without falling back."""
    from specserve.pipeline.draft_server import serve

    target = tiny["target"]
    refs = [ar_reference(target, p, N_NEW) for p in prompts[:3]]
    server = serve(tiny["draft-same"], port=0, batched=False)
    try:
        assert not server.servicer.batched
        with DraftClient(server.address, timeout=20) as client:
            eng = Engine(target, None, max_num_seqs=4, max_model_len=512)
            res = run_to_completion(eng, [ssd_request(client, target, p, k=3) for p in prompts[:3]])
        assert [tokens for tokens, _, _ in res.values()] == refs
        for _, _, s in res.values():
            assert not s.stats.fallback and s.stats.draft_tokens > 0, s.stats.fallback
        assert server.servicer.stats()["hits"] > 0
    finally:
        server.stop(grace=None)
