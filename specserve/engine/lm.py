"""Load a causal LM + tokenizer, and drive it through a KV cache that can be rolled back.

`load_model` takes a local directory, a prepared model name (see `specserve.models`) or a hub id (when
online), a dtype and a thread count. `KVCache` is the only way the decoding loops touch a model:
`forward(ids)` appends tokens and returns their logits, `crop(n)` rolls rejected tokens back,
`expand(b)` / `select(i)` copy the prefix along the batch axis for fan-out branches. After a load,
the heap's freed pages go back to the OS (`release_free_memory`).

This module does not know about speculation, sampling or serving; it knows tensors and caches.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import resolve_model
from .defaults import DTYPES as DTYPE_NAMES
from .kernels import bf16_packing_available, native_bf16, pack_linears

__all__ = ["LM", "KVCache", "load_model", "set_threads", "DTYPES", "check_pair", "resolve_device", "resolve_dtype",
           "release_free_memory"]

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # name -> torch dtype


def resolve_device(device: str, quantize: str | None = None) -> str:
    """"cpu", "cuda" (or "cuda:N"), or "auto" (CUDA when torch sees a GPU, unless int8 asks for the CPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() and quantize is None else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda"):
        if quantize is not None:
            raise ValueError(f"quantize {quantize} is CPU-only (torch dynamic quantization): use none on {device}")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but torch sees no CUDA GPU: use cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str, quantize: str | None = None) -> str:
    """A dtype name, with "auto" decided for the resolved `device`: bfloat16 on a GPU that supports
    it and on a CPU with native bf16 matmul (`kernels.native_bf16()`: AMX or AVX512-BF16), float32
    elsewhere and for int8 (whose layers quantize a float32 model)."""
    if dtype != "auto":
        return dtype
    if quantize is not None:
        return "float32"
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if native_bf16() else "float32"


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count for this process (None = leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


@dataclass
class LM:
    """A loaded causal LM: the module, its tokenizer (None for bare test models) and facts."""

    model: Any
    tokenizer: Any = None
    name: str = "model"
    dtype: str = "float32"
    quantization: str | None = None
    load_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    @property
    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of `text`; with `chat`, wrapped in the tokenizer's chat template when it has one."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
        return tok(text)["input_ids"]

    def new_cache(self) -> "KVCache":
        return KVCache(self.model)

    def describe(self) -> dict:
        n = self.extra.get("params") or sum(p.numel() for p in self.model.parameters())
        return {"name": self.name, "dtype": self.dtype, "quantization": self.quantization,
                "kernels": self.extra.get("kernels", "plain"), "params": n, "vocab_size": self.vocab_size,
                "load_s": round(self.load_s, 2)}


class KVCache:
    """One sequence (or a batch of branches) of a model's KV cache, with rollback.

    `length` counts the tokens whose keys/values are cached. Tokens passed to `forward` are
    appended at positions length, length+1, ...
    """

    def __init__(self, model: Any):
        from transformers import DynamicCache

        self.model = model
        self.device = getattr(model, "device", torch.device("cpu"))
        self.cache = DynamicCache(config=model.config)
        self.length = 0

    @torch.inference_mode()
    def forward(self, ids: list[int] | torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """Append `ids` ([n] or [B, n]) and return float32 logits of the last `keep` positions.

        Returns [keep, V] for 1-D input, [B, keep, V] for 2-D input (keep defaults to n), on the CPU
        whatever the model's device (sampling and rejection run there).
        """
        x = torch.as_tensor(ids, dtype=torch.long).to(self.device)
        batched = x.dim() == 2
        x = x if batched else x[None]  # [B, n]
        n = x.shape[1]
        assert n > 0, "forward needs at least one token"
        keep = n if keep is None else min(keep, n)
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        self.length += n
        logits = out.logits[:, -keep:].float().cpu()  # [B, keep, V]
        return logits if batched else logits[0]

    def crop(self, length: int) -> None:
        """Drop cached tokens beyond `length` (rollback of rejected drafts)."""
        if length > self.length or length < 0:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}")
        if length == 0:
            from transformers import DynamicCache

            self.cache, self.length = DynamicCache(config=self.model.config), 0
        elif length < self.length:
            self.cache.crop(length - self.length)  # transformers>=5: negative = tokens to remove
            self.length = length

    def expand(self, batch: int) -> None:
        """Repeat a batch-1 cache `batch` times along the batch axis (fan-out branches)."""
        self.cache.batch_repeat_interleave(batch)

    def select(self, index: int) -> None:
        """Keep only branch `index` of a batched cache (batch becomes 1)."""
        self.cache.batch_select_indices(torch.tensor([index], device=self.device))


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    threads: int | None = None,
    quantize: str | None = None,
    tokenizer: bool = True,
    kernels: str = "auto",
    device: str = "cpu",
) -> LM:
    """Load a causal LM for CPU/GPU inference.

    name_or_path: a local model directory, a prepared name (`qwen2.5-coder-1.5b`) or a hub id.
    dtype: float32 | bfloat16 | float16 | auto (on CPU: bfloat16 is the fastest where the CPU has AMX
      or AVX512-BF16, `kernels.native_bf16()`, float32 elsewhere; auto picks so, see resolve_dtype).
    quantize: None / "none" or "int8" (dynamic int8 Linear layers; changes the model's outputs: for drafts,
      or for a target only as the user's explicit choice).
    kernels: "auto" (pack float32 Linear weights for oneDNN on CPU, and bfloat16 ones on CPUs with
      native bf16; see kernels.py), "packed" (bfloat16 too on any CPU whose oneDNN can pack it:
      AVX512BW/VL/DQ or AVX-NE-CONVERT; elsewhere a ValueError),
      or "plain" (PyTorch's default nn.Linear).
    device: "cpu", "cuda[:N]" or "auto" (CUDA when available and not int8). On a GPU the model's
      forwards run there and logits come back to the CPU for sampling.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not name_or_path:
        raise ValueError("model path is empty: give a model directory, a prepared name or a hub id")
    if dtype not in DTYPES and dtype != "auto":
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    quantize = None if quantize == "none" else quantize  # the flags' and the config's spelling of unset
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be 'int8' or 'none', got {quantize!r}")
    if kernels not in ("auto", "packed", "plain"):
        raise ValueError(f"kernels must be auto, packed or plain, got {kernels!r}")
    device = resolve_device(device, quantize)
    dtype = resolve_dtype(dtype, device, quantize)
    packable = _packable(dtype, kernels) if device == "cpu" and not quantize and kernels != "plain" else ()
    set_threads(threads)
    src = resolve_model(str(name_or_path), dtype=dtype)  # a dir, a prepared name or a hub id
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype])
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    used = "plain"
    if quantize == "int8":
        model = quantize_int8(model)
        used = "int8"
    elif device != "cpu":
        model.to(device)
        used = device
    elif packable and pack_linears(model, packable):
        used = "packed"
    tok = AutoTokenizer.from_pretrained(src) if tokenizer else None
    name = Path(src).name if os.path.isdir(src) else src
    release_free_memory()  # the loaded copy, the dtype conversion, the unpacked / unquantized weights
    return LM(model=model, tokenizer=tok, name=name, dtype=dtype, quantization=quantize,
              load_s=time.perf_counter() - t0, extra={"path": src, "params": params, "kernels": used})


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim`). Loading a model frees
    gigabytes of temporaries that glibc otherwise keeps resident: measured on the real pair, a
    target replica's RSS after loading fell from 11.5 to 8.4 GB (float32) and from 10.7 to 7.5 GB
    (bfloat16). False, doing nothing, where the C library is not glibc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    gc.collect()  # what only the cycle collector would free, first
    _libc.malloc_trim(0)
    return True


_libc = None  # glibc, once looked up; False where there is none


def _packable(dtype: str, kernels: str) -> tuple[torch.dtype, ...]:
    """The weight dtypes `load_model` packs for oneDNN: float32 always; bfloat16 where the CPU has
    bf16 instructions (elsewhere oneDNN would emulate them) or when asked for ("packed"), which is a
    ValueError where oneDNN cannot pack bfloat16 at all (checked before the model loads)."""
    if dtype == "float32":
        return (torch.float32,)
    if dtype == "bfloat16" and kernels == "packed" and not bf16_packing_available():
        raise ValueError("kernels 'packed' with dtype bfloat16: oneDNN cannot pack bfloat16 weights on this CPU "
                         "(it needs AVX512BW/VL/DQ or AVX-NE-CONVERT): use kernels 'auto' (plain bfloat16 "
                         "linears here) or dtype float32 (packed)")
    if dtype == "bfloat16" and (kernels == "packed" or native_bf16()):
        return (torch.bfloat16,)
    return ()


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantization of every nn.Linear (weights int8, activations quantized on the fly)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao eager quantization is deprecated but still the fastest here
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.float(), {torch.nn.Linear}, dtype=torch.qint8)


def check_pair(target: LM, draft: LM) -> None:
    """Fail fast when a draft cannot speculate for a target (different vocabularies)."""
    if target.vocab_size != draft.vocab_size:
        raise ValueError(
            f"draft vocabulary ({draft.vocab_size} tokens, {draft.name}) differs from the target "
            f"vocabulary ({target.vocab_size} tokens, {target.name}): speculative decoding needs a "
            "draft that shares the target's tokenizer; pick a draft from the same model family"
        )
