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
