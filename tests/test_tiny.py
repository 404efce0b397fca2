"""Tests for specserve.models.tiny: tiny random Qwen2 models and the trained BPE tokenizer."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from specserve.models import tiny
from specserve.models.tiny import TINY_NAMES, build_tiny, tiny_config, tiny_model, train_tokenizer

MIXED_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Unicode: naïve café, Jürgen, Søren, Zoë — 東京, 数据, Ελληνικά, русский, עברית.",
    "Emoji: 😀🚀👍🏽 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "def f(x: int) -> int:\n    \"\"\"Square.\"\"\"\n    return x ** 2  # comment\n\n\tprint(f'{x!r}')\r\n",
    "   leading and trailing spaces   \n\n\n",
    "numbers 1234567890 3.14159 -0.5e-10 and symbols ~!@#$%^&*()_+{}|:<>?[]\\;',./`",
    "",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three tiny model directories, built once for the module."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer():
    """The default in-memory tokenizer."""
    return train_tokenizer(512, 0)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules have identical state dict keys and tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_returns_all_names(built: dict[str, Path]) -> None:
    assert tuple(built) == TINY_NAMES
    for path in built.values():
        assert (path / "model.safetensors").is_file()
        assert (path / "tokenizer.json").is_file()
        assert (path / "config.json").is_file()
        assert (path / "generation_config.json").is_file()


@pytest.mark.parametrize("name", TINY_NAMES)
def test_load_with_auto_classes(built: dict[str, Path], name: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(built[name])
    tok = AutoTokenizer.from_pretrained(built[name])
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == 512
    assert model.config.tie_word_embeddings is False
    assert model.dtype == torch.float32
    assert len(tok) <= 512
    ids = tok("def hello(): return 1", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()


def test_eos_in_saved_configs(built: dict[str, Path]) -> None:
    for path in built.values():
        tok = AutoTokenizer.from_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        assert config["eos_token_id"] is not None
        assert config["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
        assert config["pad_token_id"] == tok.pad_token_id
        gen = GenerationConfig.from_pretrained(path)
        assert gen.eos_token_id == tok.eos_token_id


def test_loaded_tokenizer_matches_in_memory(built: dict[str, Path], tokenizer) -> None:
    # transformers 5 rebuilds qwen2 tokenizers from vocab + merges; the result must match.
    loaded = AutoTokenizer.from_pretrained(built["target"])
    assert loaded.get_vocab() == tokenizer.get_vocab()
    for text in MIXED_TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_draft_same_equals_target(built: dict[str, Path]) -> None:
    target = AutoModelForCausalLM.from_pretrained(built["target"])
    same = AutoModelForCausalLM.from_pretrained(built["draft-same"])
    assert _state_equal(target, same)


def test_draft_random_differs(built: dict[str, Path]) -> None:
    target = AutoModelForCausalLM.from_pretrained(built["target"])
    rand = AutoModelForCausalLM.from_pretrained(built["draft-random"])
    assert rand.config.num_hidden_layers == 1
    assert rand.config.vocab_size == target.config.vocab_size
    assert not torch.equal(target.lm_head.weight, rand.lm_head.weight)
    assert not torch.equal(target.model.embed_tokens.weight, rand.model.embed_tokens.weight)


def test_shared_tokenizer(built: dict[str, Path]) -> None:
    vocabs = [AutoTokenizer.from_pretrained(p).get_vocab() for p in built.values()]
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_rebuild_overwrites(tmp_path: Path) -> None:
    first = build_tiny(tmp_path, seed=0)
    stale = first["target"] / "stale.txt"
    stale.write_text("old")
    second = build_tiny(tmp_path, seed=1)
    assert second == first
    assert not stale.exists()
    a = AutoModelForCausalLM.from_pretrained(second["target"])
    assert _state_equal(a, tiny_model(512, seed=1))


def test_tokenizer_vocab_size(tokenizer) -> None:
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    specials = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert all(isinstance(i, int) and 0 <= i < 512 for i in specials)
    assert set(specials) <= set(tokenizer.all_special_ids)


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_tokenizer_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < 512 for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_compresses_training_like_text(tokenizer) -> None:
    text = "The small model returns a quick answer.\n    return result + 1\n"
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


def test_special_tokens_are_single_ids(tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in text
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_deterministic() -> None:
    a, b = train_tokenizer(512, 0), train_tokenizer(512, 0)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert train_tokenizer(512, 1).get_vocab() != a.get_vocab()


def test_tokenizer_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError):
        train_tokenizer(100)


def test_tiny_model_deterministic() -> None:
    assert _state_equal(tiny_model(32, seed=3), tiny_model(32, seed=3))
    assert not _state_equal(tiny_model(32, seed=3), tiny_model(32, seed=4))


def test_tiny_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    tiny_model(16, seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("vocab", [4, 8])
def test_tiny_model_small_vocab_forward(vocab: int) -> None:
    model = tiny_model(vocab_size=vocab)
    assert not model.training
    assert model.dtype == torch.float32
    ids = torch.tensor([[0, 1, 2, 3, 1]]) % vocab
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, vocab)


def test_init_std_makes_logits_peakier() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        flat = tiny_model(8, init_std=0.02)(ids).logits.softmax(-1).amax(-1).mean()
        peaky = tiny_model(8, init_std=1.0)(ids).logits.softmax(-1).amax(-1).mean()
    assert peaky > flat


def test_tiny_config_fields() -> None:
    config = tiny_config(100, layers=3, eos_token_id=7)
    assert config.model_type == "qwen2"
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (100, 3, 64)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (4, 2, 128)
    assert config.eos_token_id == 7
    assert config.tie_word_embeddings is False
    model = tiny_model(100, layers=3, hidden=32, eos_token_id=7)
    assert model.config.hidden_size == 32 and model.config.eos_token_id == 7


def test_module_imports_no_ray_or_grpc() -> None:
    tree = ast.parse(Path(tiny.__file__).read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert not roots & {"ray", "grpc"}
