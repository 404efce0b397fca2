"""Tiny random causal LMs and one real small tokenizer, built in seconds offline.

This module lets anyone (and every test) exercise the speculative-decoding engine
without downloading a model.  It provides:

* ``train_tokenizer`` -- a genuine byte-level BPE tokenizer (trained with the
  ``tokenizers`` library on text generated deterministically from a seed), with
  ChatML special tokens and a Qwen-style chat template;
* ``tiny_config`` / ``tiny_model`` -- randomly initialised Qwen2 causal LMs
  (the same architecture as the real Qwen2.5 pair), deterministic given a seed;
* ``build_tiny`` -- writes a ``target`` model, a ``draft-same`` draft with exactly
  the target's weights (every draft token is accepted) and an independent
  ``draft-random`` draft, each as a Hugging Face model directory.

What it does not know: the models are untrained, so their text is gibberish and
their distributions are close to uniform unless ``init_std`` is raised.  The
tokenizer knows only its synthetic corpus (a few thousand tokens at most can be
learned) and, like Qwen's, NFC-normalises input.  Nothing
here knows about the engine, sampling, Ray, gRPC or any serving concern; it only
produces weights, configs and tokenizer files.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

__all__ = [
    "TINY_NAMES",
    "EOS_TOKEN",
    "IM_START",
    "IM_END",
    "CHAT_TEMPLATE",
    "train_tokenizer",
    "tiny_config",
    "tiny_model",
    "build_tiny",
]

TINY_NAMES = ("target", "draft-same", "draft-random")

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)

# ChatML, as used by Qwen2.5 (without Qwen's default system prompt or tool support).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX). AutoTokenizer
# rebuilds a qwen2 tokenizer from vocab + merges with this pipeline, so training must use it too.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_CORPUS_BYTES = 200_000
_BYTE_ALPHABET = 256

# --------------------------------------------------------------------------- corpus

_NOUNS = (
    "model", "server", "token", "request", "draft", "target", "cache", "window", "river",
    "garden", "city", "engineer", "teacher", "student", "machine", "network", "library",
    "computer", "mountain", "ocean", "story", "question", "answer", "function", "process",
    "signal", "market", "language", "message", "system", "table", "window", "friend",
    "morning", "evening", "winter", "summer", "letter", "number", "pattern", "result",
)
_ADJECTIVES = (
    "small", "large", "quick", "slow", "bright", "quiet", "simple", "careful", "random",
    "strange", "old", "new", "fast", "gentle", "green", "silent", "useful", "tiny",
    "happy", "early", "late", "clear", "deep", "warm", "cold", "ancient", "modern",
)
_VERBS = (
    "reads", "writes", "sends", "finds", "builds", "checks", "returns", "accepts",
    "rejects", "samples", "watches", "follows", "moves", "opens", "closes", "answers",
    "counts", "carries", "explains", "remembers", "measures", "predicts", "verifies",
)
_ADVERBS = (
    "quickly", "slowly", "carefully", "often", "rarely", "again", "together", "quietly",
    "always", "never", "sometimes", "eagerly", "finally", "almost", "exactly",
)
_PREPOSITIONS = ("in", "on", "under", "near", "after", "before", "with", "without", "behind")
_NAMES = ("Alice", "Bob", "Carol", "Dmitri", "Élodie", "Jürgen", "Mei", "Noor", "Søren", "Zoë")
_EXTRAS = ("café", "naïve", "résumé", "über", "niño", "façade", "—", "…", "→", "λ", "π", "😀", "🚀", "東京", "数据")

_IDENTS = (
    "x", "y", "n", "i", "j", "k", "value", "items", "result", "count", "total", "data",
    "tokens", "logits", "probs", "draft", "target", "cache", "key", "name", "text", "size",
)
_FUNCS = (
    "compute", "process", "load", "save", "parse", "encode", "decode", "sample", "verify",
    "accept", "merge", "split", "update", "reset", "build", "check", "score", "render",
)
_OPS = ("+", "-", "*", "//", "%", "**")
_CMPS = ("<", ">", "<=", ">=", "==", "!=")
_SYLLABLES = (
    "ka", "lo", "mi", "ser", "ven", "tor", "al", "ex", "pra", "din", "qu", "ith", "ze", "rol",
    "nem", "bri", "sta", "gon", "fle", "ur", "ash", "ock", "ped", "yl", "tri", "mon", "vel",
)


def _pseudo_word(rng: random.Random) -> str:
    """Return an invented word of 2-4 syllables (gives BPE more merges to learn)."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _noun(rng: random.Random) -> str:
    """Return a noun, sometimes an invented one."""
    return _pseudo_word(rng) if rng.random() < 0.15 else rng.choice(_NOUNS)


def _sentence(rng: random.Random) -> str:
    """Return one English-like sentence built from the word lists."""
    subject = rng.choice(_NAMES) if rng.random() < 0.3 else f"the {rng.choice(_ADJECTIVES)} {_noun(rng)}"
    parts = [subject, rng.choice(_VERBS), f"a {rng.choice(_ADJECTIVES)} {_noun(rng)}"]
    if rng.random() < 0.5:
        parts.append(f"{rng.choice(_PREPOSITIONS)} the {_noun(rng)}")
    if rng.random() < 0.4:
        parts.append(rng.choice(_ADVERBS))
    if rng.random() < 0.15:
        parts.append(f"{rng.randint(0, 2025)} times")
    if rng.random() < 0.1:
        parts.append(rng.choice(_EXTRAS))
    text = " ".join(parts)
    end = rng.choices((".", "!", "?", ";", ","), weights=(70, 5, 10, 5, 10))[0]
    return text[0].upper() + text[1:] + end


def _paragraph(rng: random.Random) -> str:
    """Return a paragraph of 2-7 sentences."""
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 7)))


def _expr(rng: random.Random) -> str:
    """Return a small arithmetic Python expression."""
    a, b = rng.choice(_IDENTS), rng.choice(_IDENTS + (str(rng.randint(0, 99)),))
    return f"{a} {rng.choice(_OPS)} {b}"


def _python_snippet(rng: random.Random) -> str:
    """Return one small, syntactically plausible Python snippet."""
    fn, arg, other = rng.choice(_FUNCS), rng.choice(_IDENTS), rng.choice(_IDENTS)
    if rng.random() < 0.2:
        fn = f"{fn}_{_pseudo_word(rng)}"
    kind = rng.randrange(5)
    if kind == 0:
        return (
            f"def {fn}_{other}({arg}, {other}=None):\n"
            f'    """{_sentence(rng)}"""\n'
            f"    if {other} is None:\n"
            f"        {other} = {rng.randint(0, 64)}\n"
            f"    return {_expr(rng)}\n"
        )
    if kind == 1:
        return (
            f"for {arg} in range({rng.randint(1, 100)}):\n"
            f"    if {arg} {rng.choice(_CMPS)} {rng.randint(0, 50)}:\n"
            f"        {other}.append({_expr(rng)})\n"
            f"    else:\n"
            f"        continue\n"
        )
    if kind == 2:
        cls = rng.choice(_NOUNS).capitalize() + rng.choice(_FUNCS).capitalize() + "er"
        return (
            f"class {cls}:\n"
            f"    def __init__(self, {arg}: int = {rng.randint(0, 9)}) -> None:\n"
            f"        self.{arg} = {arg}\n\n"
            f"    def {fn}(self, {other}: list[int]) -> int:\n"
            f"        # {_sentence(rng)}\n"
            f"        return sum({other}) + self.{arg}\n"
        )
    if kind == 3:
        return (
            f"{other} = [{_expr(rng)} for {arg} in {rng.choice(_IDENTS)}]\n"
            f'print(f"{fn}: {{{other}}} ({{len({other})}} items)")\n'
        )
    return (
        f"import {rng.choice(('os', 'sys', 'math', 'json', 'random', 'torch'))}\n\n"
        f"try:\n"
        f"    {other} = {fn}({arg}, {rng.randint(0, 9)})\n"
        f"except {rng.choice(('ValueError', 'KeyError', 'RuntimeError'))} as exc:\n"
        f"    raise SystemExit(str(exc))\n"
    )


def _corpus(seed: int, target_bytes: int = _CORPUS_BYTES) -> list[str]:
    """Return deterministic training documents (prose and Python) totalling ~``target_bytes``."""
    rng = random.Random(seed)
    docs: list[str] = []
    size = 0
    while size < target_bytes:
        doc = _paragraph(rng) if rng.random() < 0.55 else _python_snippet(rng)
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return docs


# --------------------------------------------------------------------------- tokenizer


def _bpe_pipeline() -> Tokenizer:
    """Return an untrained BPE with Qwen2's normalizer, pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of exactly ``vocab_size`` tokens (specials included).

    The corpus is generated from ``seed``, so the result is deterministic. Needs
    ``vocab_size >= 259`` (256 byte symbols plus the three special tokens). The result
    is a ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``), the class ``AutoTokenizer``
    picks for a qwen2 model directory, so it behaves identically once saved and reloaded.
    Like Qwen's, it NFC-normalises its input: decoding round-trips any NFC text.
    """
    minimum = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"byte-level BPE needs vocab_size >= {minimum}, got {vocab_size}")
    tok = _bpe_pipeline()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) <= vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


# --------------------------------------------------------------------------- models


def tiny_config(
    vocab_size: int,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position_embeddings: int = 2048,
    init_std: float = 0.02,
    eos_token_id: int | None = None,
) -> Qwen2Config:
    """Return a small Qwen2 config (untied embeddings, full attention, fp32)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=layers,
        eos_token_id=eos_token_id,
        dtype=torch.float32,
    )


def tiny_model(
    vocab_size: int,
    seed: int = 0,
    layers: int = 2,
    init_std: float = 0.02,
    **config_kwargs,
) -> Qwen2ForCausalLM:
    """Return a randomly initialised fp32 Qwen2 LM in eval mode, deterministic given ``seed``.

    ``config_kwargs`` go to :func:`tiny_config`. The global torch RNG state is left untouched.
    """
    config = tiny_config(vocab_size, layers=layers, init_std=init_std, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(torch.float32).eval()


# --------------------------------------------------------------------------- on disk


def _save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """Write ``model`` and ``tokenizer`` to a fresh directory ``path``, replacing any old one."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _with_special_ids(model: Qwen2ForCausalLM, eos_id: int) -> Qwen2ForCausalLM:
    """Record eos/pad ids in the model's config and generation config (weights untouched)."""
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id)
    return model


def build_tiny(out_dir: str | Path, seed: int = 0, layers: int = 2, vocab: int = 512) -> dict[str, Path]:
    """Write ``target``, ``draft-same`` and ``draft-random`` model dirs under ``out_dir``.

    All three share one tokenizer from :func:`train_tokenizer`. ``draft-same`` has the
    target's exact weights; ``draft-random`` is an independent 1-layer model (seed + 1000).
    Returns ``{name: path}``.
    """
    out = Path(out_dir)
    tokenizer = train_tokenizer(vocab, seed)
    eos_id = tokenizer.eos_token_id
    target = _with_special_ids(tiny_model(vocab, seed=seed, layers=layers, eos_token_id=eos_id), eos_id)
    draft = _with_special_ids(tiny_model(vocab, seed=seed + 1000, layers=1, eos_token_id=eos_id), eos_id)
    models_by_name = {"target": target, "draft-same": target, "draft-random": draft}
    return {name: _save(models_by_name[name], tokenizer, out / name) for name in TINY_NAMES}
