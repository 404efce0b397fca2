"""CPU matmul kernels: swap a model's nn.Linear layers for oneDNN-packed float32 linears.

Why: on CPUs without native bf16 matmul (no AVX512-BF16/AMX), a forward over 2-9 tokens in
bf16 or plain fp32 costs 2-4x a one-token step, which eats the gain of verifying k drafts at
once. With the weights pre-packed for oneDNN, a float32 forward over 1-5 tokens costs about the
same as one token (measured on the Qwen2.5-Coder 1.5B target; see the README's bench section).

The packed layer computes the same product as nn.Linear in float32, with a different summation
order; both `ar` and `sd` run through the same packed layers, so greedy exactness holds between
them. This module does not know about decoding; it rewrites modules.
"""

from __future__ import annotations

import torch

__all__ = ["PackedLinear", "pack_linears", "packing_available"]


def packing_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(torch.nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (float32)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every float32 nn.Linear in `model` by a PackedLinear; return how many."""
    if not packing_available():
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child))  # the old weight is freed here
                n += 1
    return n
