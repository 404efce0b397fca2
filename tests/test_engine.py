"""`generate()` (one request through a one-slot engine) on tiny random models: greedy exactness,
stopping rules, sampling distribution, bad input."""

import pytest
import torch
from scipy.stats import chisquare

from specserve.engine.lm import LM, load_model
from specserve.engine.sampling import SamplingParams, warp
from specserve.engine.scheduler import CostModel, LinearCost
from specserve.engine.speculative import SpecConfig, Stats
from specserve.engine.single import generate
from specserve.models.tiny import tiny_model

PROMPTS = ["def add(a, b):\n    return", "The quick brown fox", "Once upon a time, in a land far away, there"]


def cheap_draft() -> CostModel:
    """Costs under which the policy starts out drafting (a nearly free draft); the rounds then
    refine them with real timings (on the tiny pair a draft step costs about a verify)."""
    return CostModel(LinearCost(1.0, 0.0), LinearCost(0.01, 0.0))



def run(target, draft, ids, mode="sd", k=None, n=48, sampling=None, seed=0, stop=(), cost=None, stop_prob=0.0):
    st = Stats()
    spec = SpecConfig(mode=mode, k=k, stop_prob=stop_prob)
    chunks = list(generate(target, draft, ids, n, sampling, spec, seed, stop, st, cost=cost))
    return [t for c in chunks for t in c.token_ids], st, chunks


@pytest.fixture(scope="module")
def prompts(tiny):
    tok = tiny["target"].tokenizer
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("k, stop_prob", [(1, 0), (3, 0), (5, 0), (None, 0), (5, 0.003)])
@pytest.mark.parametrize("draft_name", ["draft-same", "draft-random"])
def test_greedy_sd_is_token_identical_to_ar(tiny, prompts, k, stop_prob, draft_name):
    """A fixed k drafts exactly k every round (the budget aside); None: the policy's k, here priced
    with a nearly free draft, so that it speculates on the tiny pair; the early stop (stop_prob: the
    tiny models give most tokens ~0.002) ends many drafts before k."""
    target, draft = tiny["target"], tiny[draft_name]
    for ids in prompts:
        ar, st_ar, _ = run(target, None, ids, mode="ar")
        sd, st, _ = run(target, draft, ids, k=k, cost=cheap_draft() if k is None else None, stop_prob=stop_prob)
        assert sd == ar
        left = [48 - sum(st.accepted_per_round[:r]) - r - 1 for r in range(st.rounds)]  # the budget's cut
        if k is not None and not stop_prob:
            assert st.drafted_per_round == [min(k, b) for b in left]
        if stop_prob:
            assert all(d <= min(k, b) for d, b in zip(st.drafted_per_round, left))
            assert sum(d < min(k, b) for d, b in zip(st.drafted_per_round, left)) >= st.rounds // 4
        assert st.draft_tokens > 0
        assert len(ar) == 48 and st_ar.rounds == 48 and st_ar.draft_tokens == 0
        if draft_name == "draft-same":
            assert st.acceptance_rate == 1.0
            assert st.rounds < st_ar.rounds
        else:
            assert st.acceptance_rate < 0.3


def test_stream_chunks_and_text(tiny, prompts):
    target = tiny["target"]
    ids, st, chunks = run(target, tiny["draft-same"], prompts[0], k=3)
    assert len(chunks) == st.rounds and all(len(c.token_ids) >= 1 for c in chunks)
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c.text for c in chunks) == target.tokenizer.decode(ids, skip_special_tokens=True)
    assert st.new_tokens == len(ids) == 48
    assert st.accepted_tokens + st.rounds == st.new_tokens


def test_budget_cuts_mid_round(tiny, prompts):
    ar, _, _ = run(tiny["target"], None, prompts[1], mode="ar", n=7)
    sd, st, _ = run(tiny["target"], tiny["draft-same"], prompts[1], k=5, n=7)
    assert sd == ar and len(sd) == 7 and st.finish_reason == "length"


def test_eos_stops_both_modes_at_the_same_token(tiny, tiny_dir, prompts):
    ar, _, _ = run(tiny["target"], None, prompts[2], mode="ar")
    target = load_model(str(tiny_dir / "target"), dtype="float32")  # a private copy to change
    target.model.generation_config.eos_token_id = ar[9]
    first = ar.index(ar[9])
    for mode, draft in (("ar", None), ("sd", tiny["draft-same"]), ("sd", tiny["draft-random"])):
        out, st, chunks = run(target, draft, prompts[2], mode=mode, k=4)
        assert out == ar[: first + 1] and st.finish_reason == "eos" and chunks[-1].finish_reason == "eos"


def test_stop_string_cuts_text_and_tokens_identically(tiny, prompts):
    target, tok = tiny["target"], tiny["target"].tokenizer
    ar, _, _ = run(target, None, prompts[0], mode="ar")
    full = tok.decode(ar, skip_special_tokens=True)
    stop = full[20:24]
    assert stop.strip(), "pick a visible stop string"
    results = []
    for mode, draft, k in (("ar", None, None), ("sd", tiny["draft-same"], 5), ("sd", tiny["draft-random"], 2)):
        out, st, chunks = run(target, draft, prompts[0], mode=mode, k=k, stop=[stop])
        text = "".join(c.text for c in chunks)
        assert st.finish_reason == "stop"
        assert text == full[: full.find(stop)] and stop not in text
        results.append(out)
    assert results[0] == results[1] == results[2]
    assert stop in tok.decode(results[0]) and stop not in tok.decode(results[0][:-1])


@pytest.mark.parametrize("mode, k", [("ar", None), ("sd", 3)])
def test_a_callers_kv_cache_carries_a_conversation_between_calls(tiny, prompts, mode, k):
    """target_cache (a long chat session's, on a replica): generate() prefills only past the prefix
    it holds, stays exact, and leaves that same cache object holding prompt + output."""
    target, draft = tiny["target"], tiny["draft-same"] if mode == "sd" else None
    kv = target.new_cache()
    out1, st1, _ = run(target, draft, prompts[0], mode=mode, k=k, n=12)
    st = Stats()
    assert [t for c in generate(target, draft, prompts[0], 12, spec=SpecConfig(mode=mode, k=k), stats=st,
                                target_cache=kv) for t in c.token_ids] == out1
    assert st.prefix_reused == 0 and kv.length >= len(prompts[0]) + 11  # the last token need not be cached
    turn2 = prompts[0] + out1 + prompts[1]
    ref, _, _ = run(target, None, turn2, mode="ar", n=12)
    held = kv.length
    st = Stats()
    got = [t for c in generate(target, draft, turn2, 12, spec=SpecConfig(mode=mode, k=k), stats=st, target_cache=kv)
           for t in c.token_ids]
    assert got == ref and st.prefix_reused == held
    assert kv.length >= len(turn2) + 11


# ---- sampling: the distribution of the first two tokens under sd equals ar's ------------------

V = 6


def exact_two_token_law(model, prompt, sp):
    """P(t1, t2) of the target alone, computed from its logits: [V * V]."""
    with torch.inference_mode():
        p1 = warp(model(torch.tensor([prompt])).logits[0, -1], sp.temperature, sp.top_k, sp.top_p)
        law = torch.zeros(V, V)
        for t1 in range(V):
            logits = model(torch.tensor([prompt + [t1]])).logits[0, -1]
            law[t1] = p1[t1] * warp(logits, sp.temperature, sp.top_k, sp.top_p)
    return law.flatten()


def two_token_counts(target, draft, prompt, sp, mode, draws, k=3, stop_prob=0.0):
    counts = torch.zeros(V * V)
    for seed in range(draws):
        out, _, _ = run(target, draft, prompt, mode=mode, k=k, n=3, sampling=sp, seed=seed,
                        cost=cheap_draft() if k is None and mode != "ar" else None, stop_prob=stop_prob)
        counts[out[0] * V + out[1]] += 1
    return counts


def chi2_pvalue(counts, law):
    expected = law * counts.sum()
    big = expected >= 5  # pool the rare cells into one bucket
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("sp, k, stop_prob", [(SamplingParams(1.0), 3, 0.0), (SamplingParams(0.8, top_k=4, top_p=0.9), 3, 0.0),
                                              (SamplingParams(1.0), None, 0.4)], ids=["t1", "warped", "policy-k-early-stop"])
def test_sd_sampling_matches_ar_distribution(sp, k, stop_prob):
    target = LM(tiny_model(V, seed=1, init_std=0.5))
    draft = LM(tiny_model(V, seed=2, layers=1, init_std=0.5))
    prompt = [1, 2, 3]
    law = exact_two_token_law(target.model, prompt, sp)
    ar = two_token_counts(target, None, prompt, sp, "ar", 1500)
    sd = two_token_counts(target, draft, prompt, sp, "sd", 1500, k, stop_prob)
    assert chi2_pvalue(ar, law) > 1e-3
    assert chi2_pvalue(sd, law) > 1e-3


def test_sd_sampling_with_a_wrong_law_fails_the_test():
    """The check above can fail: the same counts against another model's law are rejected."""
    sp = SamplingParams(1.0)
    target = LM(tiny_model(V, seed=1, init_std=0.5))
    other = tiny_model(V, seed=3, init_std=0.5)
    sd = two_token_counts(target, LM(tiny_model(V, seed=2, layers=1, init_std=0.5)), [1, 2, 3], sp, "sd", 1500)
    assert chi2_pvalue(sd, exact_two_token_law(other, [1, 2, 3], sp)) < 1e-6


# ---- bad input fails fast, naming the field and the fix ----------------------------------------

def test_vocab_mismatch_names_both_sizes(tiny, prompts):
    other = LM(tiny_model(600, seed=0), name="other")
    with pytest.raises(ValueError, match=r"draft vocabulary \(600 tokens.*target vocabulary \(512 tokens"):
        next(generate(tiny["target"], other, prompts[0]))


@pytest.mark.parametrize("kwargs, field", [({"k": 0}, "k"), ({"mode": "beam"}, "mode"), ({"k_max": 0}, "k_max"),
                                           ({"k_init": 9, "k_max": 8}, "k_init"), ({"stop_prob": 1.0}, "stop_prob")])
def test_bad_spec_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SpecConfig(**kwargs)


def test_bad_generate_inputs(tiny, prompts):
    t, d = tiny["target"], tiny["draft-same"]
    with pytest.raises(ValueError, match="prompt is empty"):
        next(generate(t, d, []))
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(generate(t, d, prompts[0], max_new_tokens=0))
    with pytest.raises(ValueError, match="needs a draft"):
        next(generate(t, None, prompts[0], spec=SpecConfig(mode="sd")))
    with pytest.raises(ValueError, match="context window"):
        next(generate(t, d, [5] * 5000))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        next(generate(t, d, [1, 9999]))


def test_missing_model_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(str(missing))


def test_device_choice_is_checked_and_auto_falls_back_to_the_cpu(tiny_dir):
    import torch

    from specserve.engine.lm import load_model, resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto", quantize="int8") == "cpu"  # dynamic int8 runs on the CPU only
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="CPU-only"):
        resolve_device("cuda:0", quantize="int8")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    lm = load_model(str(tiny_dir / "draft-same"), device="auto")
    cache = lm.new_cache()
    logits = cache.forward([1, 2, 3])
    assert logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape[0] == 3
