"""CPU matmul kernels: swap a model's nn.Linear layers for oneDNN-packed linears (float32 or bfloat16).

Why: on CPUs without native bf16 matmul (no AVX512-BF16/AMX), a forward over 2-9 tokens in
bf16 or plain fp32 costs 2-4x a one-token step, which eats the gain of verifying k drafts at
once. With the weights pre-packed for oneDNN, a float32 forward over 1-5 tokens costs about the
same as one token (measured on the Qwen2.5-Coder 1.5B target; see docs/benchmarks.md).
On CPUs with native bf16 matmul (`native_bf16()`), bfloat16 weights packed the same way run on
those instructions: half the bytes of float32 to read per step, and prefill several times
faster (docs/benchmarks.md, "bfloat16 on CPUs with AMX").

The packed layer computes the same product as nn.Linear in its dtype, with a different summation
order; both `ar` and `sd` run through the same packed layers, so greedy exactness holds between
them. This module does not know about decoding; it rewrites modules.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["PackedLinear", "pack_linears", "packing_available", "bf16_packing_available", "native_bf16"]


def packing_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def bf16_packing_available() -> bool:
    """Whether oneDNN can pack bfloat16 weights on this CPU: it needs AVX512BW/VL/DQ or AVX-NE-CONVERT,
    so an AVX2-only CPU cannot. Found out once, by packing a small weight."""
    if not packing_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


class PackedLinear(torch.nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout, in the layer's dtype (float32 or bfloat16)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: torch.nn.Module, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> int:
    """Replace every nn.Linear of `model` whose weight is of one of `dtypes` by a PackedLinear;
    return how many. bfloat16 layers stay as they are where oneDNN cannot pack them (`bf16_packing_available`)."""
    if not packing_available():
        return 0
    if not bf16_packing_available():
        dtypes = tuple(d for d in dtypes if d != torch.bfloat16)
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype in dtypes:
                setattr(parent, name, PackedLinear(child))  # the old weight is freed here
                n += 1
    return n
