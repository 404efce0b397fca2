"""A preallocated KV cache of fixed slots, one slot per running sequence (per model).

Per layer the keys and values live in two tensors `[slots, kv_heads, max_len, head_dim]`,
allocated once on the model's device, plus a length per slot. A sequence owns one slot from
admission to retirement. Writing new keys/values goes to per-row positions; rolling rejected
drafts back is writing a smaller length (the stale columns stay and are masked out, no copy);
freeing a slot is writing 0. Nothing here grows per request: capacity is (slots, max_len).

This module does not know about attention, masks or decoding: it stores tensors and lengths.
The lengths are kept twice: `host_lengths` (python ints, what the scheduler reads: no host sync)
and `lengths` (a long tensor on the device, mirrored on every write, for device-side masks).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SlotPool", "SlotCache", "CacheFull", "kv_shape"]


class CacheFull(RuntimeError):
    """No free slot, or a write past max_len."""


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config (Llama / Qwen2 naming)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


class SlotPool:
    """Slot bookkeeping shared by every cache kind: free list and one length per slot."""

    def __init__(self, slots: int, max_len: int):
        if slots < 1:
            raise ValueError(f"max_num_seqs (slots) must be >= 1, got {slots}")
        if max_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_len}")
        self.slots, self.max_len = slots, max_len
        self.host_lengths = [0] * slots
        self._free = list(range(slots))  # kept sorted: alloc takes the lowest free slot

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise CacheFull(f"all {self.slots} slots are in use (max_num_seqs): retire a sequence first")
        slot = self._free.pop(0)
        self.set_length(slot, 0)
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.set_length(slot, 0)
        self._free.append(slot)
        self._free.sort()

    def length(self, slot: int) -> int:
        return self.host_lengths[slot]

    def set_length(self, slot: int, n: int) -> None:
        """Rollback (or advance after a write): the first n positions of the slot are valid."""
        if not 0 <= n <= self.max_len:
            raise CacheFull(f"slot length {n} outside [0, max_model_len={self.max_len}]")
        self.host_lengths[slot] = n
        self._on_length(slot, n)

    def _on_length(self, slot: int, n: int) -> None:
        pass

    @property
    def bytes(self) -> int:
        return 0

    def capacity(self) -> dict:
        return {"max_num_seqs": self.slots, "max_model_len": self.max_len, "cache_bytes": self.bytes,
                "free_slots": self.num_free}


class SlotCache(SlotPool):
    """K and V per layer `[slots, kv_heads, max_len, head_dim]` and a length per slot."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(slots, max_len)
        self.device = torch.device(device)
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]  # [S, Hkv, L, D]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]  # [S, Hkv, L, D]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)  # [S], mirrors host_lengths

    @classmethod
    def for_model(cls, model: Any, slots: int, max_len: int) -> "SlotCache":
        layers, kv_heads, head_dim = kv_shape(model.config)
        emb = model.get_input_embeddings().weight  # only to learn the activation dtype and device
        dtype = emb.dtype if emb.dtype.is_floating_point else torch.float32
        return cls(layers, kv_heads, head_dim, slots, max_len, dtype=dtype, device=emb.device)

    def _on_length(self, slot: int, n: int) -> None:
        self.lengths[slot].fill_(n)  # a kernel with a scalar argument: no host tensor, no copy, no sync

    # ---- data ---------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [N, kv_heads, head_dim] of N tokens at (slots[i], positions[i]) ([N] long each).

        Lengths are not touched here: the runner advances them once per forward, for all layers.
        """
        self.k[layer][slots, :, positions] = k  # [N, Hkv, D] into [S, Hkv, L, D]
        self.v[layer][slots, :, positions] = v

    def read(self, layer: int, slots: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the given slots' first `upto` columns: [B, kv_heads, upto, head_dim] each."""
        return self.k[layer][slots, :, :upto], self.v[layer][slots, :, :upto]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def storage_ids(self) -> list[int]:
        """Data pointers of every K/V tensor: equal over time iff nothing was reallocated."""
        return [t.data_ptr() for t in self.k + self.v]
