"""The slot cache and the ragged batched forward, against transformers' own forward (fp32)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specserve.engine.kernels import bf16_packing_available, pack_linears
from specserve.engine.runner import make_runner, native_supported
from specserve.engine.slot_cache import CacheFull, SlotCache

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def random_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=512))
    else:  # qwen2: q/k/v bias, tied or not
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=kind == "qwen2-tied"))
    with torch.no_grad():
        for p in model.parameters():  # far from uniform logits: a wrong mask or position shows
            p.normal_(0, 0.1)
    return model.eval()


def reference(model, ids):
    with torch.inference_mode():
        return model(torch.tensor(ids)[None]).logits[0].float()  # [n, V]


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-tied", "llama", "gpt2"])
@pytest.mark.parametrize("packed", [False, True])
def test_ragged_forward_matches_transformers(kind, packed):
    model = random_model(kind)
    if packed:
        pack_linears(model)
    runner = make_runner(model, slots=4, max_len=400)
    assert runner.kind == ("serial" if kind == "gpt2" else "native")
    if kind == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (7, 1, 300)]
    slots = [runner.cache.alloc() for _ in prompts]
    slots = [slots[2], slots[0], slots[1]]  # rows need not be in slot order
    logits, koff = runner.forward(slots, torch.tensor(sum(prompts, [])), [len(p) for p in prompts],
                                  [len(p) for p in prompts])
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[koff[b]:koff[b + 1]], reference(model, p), atol=2e-5, rtol=1e-4)
        assert runner.cache.length(slots[b]) == len(p)
    # a second, ragged round: 3 / 5 / 1 new tokens, keeping 2 / 5 / 1 positions; then a rollback
    more = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 5, 1)]
    logits, koff = runner.forward(slots, torch.tensor(sum(more, [])), [3, 5, 1], [2, 5, 1])
    assert koff == [0, 2, 7, 8]
    for b, (p, m) in enumerate(zip(prompts, more)):
        ref = reference(model, p + m)[-(koff[b + 1] - koff[b]):]
        torch.testing.assert_close(logits[koff[b]:koff[b + 1]], ref, atol=2e-5, rtol=1e-4)
    runner.cache.set_length(slots[1], len(prompts[1]) + 2)  # drop 3 of row 1's 5 new tokens
    logits, _ = runner.forward([slots[1]], torch.tensor([7, 8]), [2], [2])
    torch.testing.assert_close(logits, reference(model, prompts[1] + more[1][:2] + [7, 8])[-2:], atol=2e-5, rtol=1e-4)


def test_fallback_is_chosen_for_other_families_and_says_why():
    assert "gpt2" in native_supported(random_model("gpt2"))
    assert native_supported(random_model("llama")) is None
    with pytest.raises(ValueError, match="native decoder cannot run"):
        make_runner(random_model("gpt2"), 2, 64, native=True)


def test_slot_cache_is_preallocated_and_rolls_back_by_length():
    cache = SlotCache(layers=2, kv_heads=2, head_dim=4, slots=3, max_len=16)
    ptrs, nbytes = cache.storage_ids(), cache.bytes
    assert nbytes == 2 * 2 * 3 * 2 * 16 * 4 * 4
    a, b = cache.alloc(), cache.alloc()
    k = torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 2, 4)  # [N=2, Hkv, D]
    cache.write(0, torch.tensor([a, b]), torch.tensor([5, 0]), k, -k)
    assert torch.equal(cache.k[0][a, :, 5], k[0]) and torch.equal(cache.v[0][b, :, 0], -k[1])
    cache.set_length(a, 6)
    cache.set_length(a, 2)  # rollback: a length, no copy
    assert cache.length(a) == 2 and int(cache.lengths[a]) == 2 and torch.equal(cache.k[0][a, :, 5], k[0])
    cache.free(a)
    assert cache.alloc() == a and cache.length(a) == 0
    cache.alloc()
    with pytest.raises(CacheFull, match="all 3 slots are in use"):
        cache.alloc()
    with pytest.raises(CacheFull, match="max_model_len=16"):
        cache.set_length(b, 17)
    assert cache.storage_ids() == ptrs and cache.bytes == nbytes
    assert cache.capacity() == {"max_num_seqs": 3, "max_model_len": 16, "cache_bytes": nbytes, "free_slots": 0}


def test_a_row_past_max_model_len_is_refused_naming_the_fix():
    runner = make_runner(random_model("qwen2"), slots=1, max_len=8)
    s = runner.cache.alloc()
    with pytest.raises(ValueError, match="exceed max_model_len=8: shorten the request or raise max_model_len"):
        runner.forward([s], torch.zeros(9, dtype=torch.long), [9], [1])


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_tree_rows_see_their_fork_of_the_shared_prefix_at_true_positions(kind):
    """`forward_rows`: branches over one slot's prefix (each seeing the prefix up to its fork, its own
    earlier tokens and itself, written to scratch columns) give transformers' logits of each
    branch's own sequence; a causal row beside them equals `forward`. A position off by one shows."""
    from specserve.engine.runner import TreeRow

    model = random_model(kind)
    runner = make_runner(model, slots=3, max_len=64)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 300, (12,), generator=g).tolist()
    other = torch.randint(0, 300, (5,), generator=g).tolist()
    runner.forward_rows([TreeRow.causal(0, prefix, 0, 0)])  # the shared prefix, once, in slot 0
    # step 1: branch A forks after 7 tokens with token 5, branch B after all 12 with token 9
    # (columns 12, 13); step 2: each feeds one more token (columns 14, 15)
    L, forks, firsts, seconds = 12, [7, 12], [5, 9], [40, 41]
    for step, toks in ((0, firsts), (1, seconds)):
        mask = torch.zeros(2, L + 2 * (step + 1), dtype=torch.bool)
        for b, f in enumerate(forks):
            mask[b, :f] = True
            mask[b, [L + 2 * s + b for s in range(step + 1)]] = True
        rows = [TreeRow(0, toks, [f + step for f in forks], [L + 2 * step + b for b in range(2)], mask, 2),
                TreeRow.causal(1, other if step == 0 else [3], 0 if step == 0 else 5, 1)]
        tree, plain = runner.forward_rows(rows)
        for b, f in enumerate(forks):
            seq = prefix[:f] + [firsts[b]] + ([seconds[b]] if step else [])
            assert (tree[b] - reference(model, seq)[-1]).abs().max() < 2e-6, (step, b)
        assert (plain[0] - reference(model, other + ([3] if step else []))[-1]).abs().max() < 2e-6
    shifted = TreeRow(0, [5], [8], [12], torch.ones(1, 13, dtype=torch.bool).index_fill_(1, torch.arange(7, 12), False), 1)
    # random weights barely use position (a shift moves logits ~1e-4): hence the tight bounds above
    assert (runner.forward_rows([shifted])[0][0] - reference(model, prefix[:7] + [5])[-1]).abs().max() > 2e-5


@pytest.mark.skipif(not bf16_packing_available(), reason="oneDNN cannot pack bfloat16 on this CPU (AVX2 only): "
                    "the next test covers that path")
def test_bfloat16_linears_pack_and_match_transformers_in_bfloat16():
    """kernels.pack_linears packs bf16 layers when asked: the ragged forward then matches
    transformers' own bf16 forward within bf16 rounding, and float32 layers are left alone."""
    from specserve.engine.kernels import PackedLinear
    from specserve.engine.lm import _packable

    model = random_model("qwen2").to(torch.bfloat16)
    ref_model = random_model("qwen2").to(torch.bfloat16)
    assert pack_linears(model, (torch.float32,)) == 0  # nothing float32 to pack
    n = pack_linears(model, (torch.bfloat16,))
    assert n == len([m for m in ref_model.modules() if type(m) is torch.nn.Linear]) and n > 0
    assert isinstance(model.model.layers[0].mlp.down_proj, PackedLinear)
    runner = make_runner(model, slots=2, max_len=64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (9, 3)]
    slots = [runner.cache.alloc() for _ in prompts]
    logits, koff = runner.forward(slots, torch.tensor(sum(prompts, [])), [9, 3], [9, 3])
    for b, p in enumerate(prompts):
        ref = reference(ref_model, p)
        assert (logits[koff[b]:koff[b + 1]] - ref).abs().max() < 0.05 * ref.abs().max()
    # what load_model packs: float32 always, bfloat16 when asked or where the CPU has bf16 instructions
    from specserve.engine.kernels import native_bf16
    assert _packable("float32", "auto") == (torch.float32,)
    assert _packable("bfloat16", "packed") == (torch.bfloat16,)
    assert _packable("bfloat16", "auto") == ((torch.bfloat16,) if native_bf16() else ())
    assert _packable("float16", "auto") == ()


def test_where_bfloat16_cannot_be_packed_its_linears_stay_plain_and_forcing_it_names_the_fix(monkeypatch, tiny_dir):
    """On an AVX2-only CPU oneDNN refuses to pack bf16 weights: pack_linears leaves them alone (and
    still packs float32 ones), and load_model(kernels="packed", dtype="bfloat16") says what to use."""
    from specserve.engine import kernels, lm

    monkeypatch.setattr(kernels, "bf16_packing_available", lambda: False)
    monkeypatch.setattr(lm, "bf16_packing_available", lambda: False)
    model = random_model("qwen2").to(torch.bfloat16)
    assert pack_linears(model, (torch.bfloat16, torch.float32)) == 0
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert pack_linears(random_model("qwen2"), (torch.bfloat16, torch.float32)) > 0  # float32 still packs
    with pytest.raises(ValueError, match="kernels 'packed' with dtype bfloat16.*use kernels 'auto'.*or dtype float32"):
        lm.load_model(str(tiny_dir / "target"), dtype="bfloat16", kernels="packed")
    monkeypatch.setattr(lm, "native_bf16", lambda: True)  # even where auto would pack bf16
    assert lm.load_model(str(tiny_dir / "target"), dtype="bfloat16", kernels="auto").extra["kernels"] == "plain"
