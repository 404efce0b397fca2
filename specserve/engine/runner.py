"""One ragged forward over many sequences: each row appends its own tokens to its own cache slot.

Input: `slots` [B] (host ints), `tokens` [N] long (flat, the rows' tokens back to back, host or
device), `row_lens` [B] (host ints, >= 1 each, sum N) and `keep` [B] (how many of each row's
last positions need logits; 0 is allowed). Row b's tokens go to positions
length(slot_b) + 0..row_lens[b]-1 (RoPE at the true position), and each query sees only its own
slot's valid cache columns and its own row's earlier new tokens. Output: float32 logits
[sum(keep), V] on the model's device, FLAT: row b's rows are logits[koff[b]:koff[b+1]] with
koff = prefix sums of keep (returned). Afterwards every slot's length is advanced by its row.

Two implementations behind one interface:
  NativeRunner  Llama / Qwen2 family (incl. Qwen2's q/k/v bias, GQA, tied embeddings). It calls the
                model's own modules (embed_tokens, q/k/v/o_proj - plain, PackedLinear or int8 -,
                rotary_emb, RMSNorms, MLP, lm_head) and does attention itself with
                scaled_dot_product_attention over the SlotCache and an explicit boolean mask.
                Linears and MLPs run on the flat [1, N, hidden] tokens (no padding); only
                attention pads the queries to [B, T_max].
  SerialRunner  any other causal LM transformers loads: rows one at a time, each slot holding the
                existing `KVCache` (a DynamicCache; it grows per request, unlike the SlotCache).

`NativeRunner.forward_rows` can be abandoned between layers (`interrupt`, a callable asked before
each layer; when it answers True the forward raises `Interrupted`): a draft worker's speculation
step gives way to a message that arrives mid-forward. An abandoned forward has written K/V for some
layers of its rows' columns; forward_rows never moves slot lengths, so those columns stay as
untrusted as before, and re-running the same rows rewrites them whole.

This module does not know about sampling, drafts or scheduling. Host syncs in NativeRunner.forward:
none. Its index lists are built from host lengths (python ints, never read from the device) and
reach the device in one non-blocking copy (`device.to_device`); masks are built on the device.
SerialRunner (the fallback) brings each row's logits through the CPU, a sync per row on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F

from .device import to_device
from .lm import KVCache
from .slot_cache import SlotCache, SlotPool

__all__ = ["Runner", "NativeRunner", "TreeRow", "Interrupted", "SerialRunner", "SerialCache", "make_runner",
           "native_supported"]

NATIVE_FAMILIES = ("llama", "qwen2")


class Interrupted(Exception):
    """A forward_rows abandoned between layers because its `interrupt` answered True."""


def native_supported(model: Any) -> str | None:
    """None if the native decoder can run `model`, else why not (then the serial fallback runs)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in NATIVE_FAMILIES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {NATIVE_FAMILIES}"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window layers"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no model.model.{layers, rotary_emb}"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Runner:
    """What the engine asks of a model: ragged forwards into a slot cache."""

    cache: SlotPool
    kind = "abstract"

    def forward(self, slots: list[int], tokens: torch.Tensor, row_lens: list[int],
                keep: list[int]) -> tuple[torch.Tensor, list[int]]:
        raise NotImplementedError

    @staticmethod
    def _check(cache: SlotPool, slots: list[int], row_lens: list[int], keep: list[int]) -> list[int]:
        """Validate a call; return koff [B+1] (prefix sums of keep)."""
        assert len(slots) == len(row_lens) == len(keep) and slots, "one (slot, row_len, keep) per row"
        koff = [0]
        for s, n, kp in zip(slots, row_lens, keep):
            assert n >= 1 and 0 <= kp <= n, f"row of {n} tokens cannot keep {kp}"
            if cache.length(s) + n > cache.max_len:
                raise ValueError(f"slot {s} holds {cache.length(s)} tokens; {n} more exceed max_model_len="
                                 f"{cache.max_len}: shorten the request or raise max_model_len")
            koff.append(koff[-1] + kp)
        return koff


class NativeRunner(Runner):
    kind = "native"

    def __init__(self, model: Any, cache: SlotCache):
        why = native_supported(model)
        if why:
            raise ValueError(f"native decoder cannot run this model ({why}): use SerialRunner")
        self.model, self.cache = model, cache
        self.inner = model.model
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.device = cache.device

    def _layout(self, slots, row_lens):
        """Flat-token positions and attention groups: index lists built on the host from host
        lengths, copied to the device in ONE non-blocking copy; the masks are built on the device.

        Rows are grouped by length (a new row starts a group when it is under half the group's
        longest), so a 300-token prompt does not pad the 5-token verify rows to 300 queries.
        Per group: (slots [G], flat index [n_g] of its tokens, row [n_g] and i [n_g] of each
        token within the group, mask [G, 1, T_g, L_g] with column j visible iff j <= length + i).
        """
        lens = [self.cache.length(s) for s in slots]
        starts = list(accumulate([0] + list(row_lens[:-1])))
        pos = [ln + i for n, ln in zip(row_lens, lens) for i in range(n)]  # [N] length + i
        slot_of = [s for s, n in zip(slots, row_lens) for _ in range(n)]  # [N]
        order = sorted(range(len(slots)), key=lambda b: -row_lens[b])
        groups, cur = [], [order[0]]
        for b in order[1:]:
            if 2 * row_lens[b] < row_lens[cur[0]]:
                groups.append(cur)
                cur = []
            cur.append(b)
        groups.append(cur)
        host, cuts = pos + slot_of, []  # every index list back to back; cuts = their (start, end)
        for g in groups:
            parts = ([slots[b] for b in g],  # [G]
                     [t for b in g for t in range(starts[b], starts[b] + row_lens[b])],  # flat [n_g]
                     [i for i, b in enumerate(g) for _ in range(row_lens[b])],  # row [n_g]
                     [t for b in g for t in range(row_lens[b])],  # t_in [n_g]
                     [lens[b] for b in g])  # ln [G]
            for part in parts:
                cuts.append((len(host), len(host) + len(part)))
                host += part
        dev = self.device
        ix = to_device(host, dev)
        N, out = len(pos), []
        for gi, g in enumerate(groups):
            slot_t, flat, row, t_in, ln = (ix[a:b] for a, b in cuts[5 * gi:5 * gi + 5])
            T = row_lens[g[0]]
            L = max(lens[b] + row_lens[b] for b in g)
            mask = (torch.arange(L, device=dev)[None, None, :]
                    <= (ln[:, None, None] + torch.arange(T, device=dev)[None, :, None]))  # [G, T, L]
            out.append((slot_t, flat, row, t_in, mask[:, None], len(g), T, L))
        return ix[:N], ix[N:2 * N], out

    @torch.inference_mode()
    def forward(self, slots, tokens, row_lens, keep):
        koff = self._check(self.cache, slots, row_lens, keep)
        pos, slot_of, groups = self._layout(slots, row_lens)
        logits = self._run(tokens, pos, slot_of, pos, groups, row_lens, keep)
        for s, n in zip(slots, row_lens):
            self.cache.set_length(s, self.cache.length(s) + n)
        return logits, koff

    @torch.inference_mode()
    def forward_rows(self, rows: list["TreeRow"], interrupt=None) -> list[torch.Tensor]:
        """Rows that say where each token goes and what it sees: logits [keep, V] per row.

        Unlike `forward`, each token carries its own position (RoPE) and cache column, and each row
        its own visibility mask over its slot's columns, so a row can be a tree (speculation
        branches over a shared prefix, each seeing the prefix up to its fork and its own earlier
        tokens). Slot lengths are not touched: the caller owns which columns are valid.
        `interrupt`: None, or a callable asked before every layer; True abandons the forward
        (raises `Interrupted`, see the module docstring).
        """
        assert rows, "at least one row"
        for r in rows:
            if max(r.columns) >= self.cache.max_len:
                raise ValueError(f"slot {r.slot}: column {max(r.columns)} is past the cache's "
                                 f"{self.cache.max_len} columns: shorten the request or raise max_model_len")
        lens = [len(r.tokens) for r in rows]
        order = sorted(range(len(rows)), key=lambda b: -lens[b])
        groups, cur = [], [order[0]]
        for b in order[1:]:  # as _layout: a row under half the group's longest starts a new group
            if 2 * lens[b] < lens[cur[0]]:
                groups.append(cur)
                cur = []
            cur.append(b)
        groups.append(cur)
        starts = list(accumulate([0] + lens[:-1]))
        dev = self.device
        host = [p for r in rows for p in r.positions] + [r.slot for r in rows for _ in r.tokens] + \
            [c for r in rows for c in r.columns] + [t for r in rows for t in r.tokens]
        ix = to_device(host, dev)
        N = len(host) // 4
        pos, slot_of, cols, tokens = ix[:N], ix[N:2 * N], ix[2 * N:3 * N], ix[3 * N:]
        out_groups = []
        for g in groups:
            T = lens[g[0]]
            L = max(rows[b].mask.shape[1] for b in g)
            mask = torch.zeros(len(g), 1, T, L, dtype=torch.bool)  # [G, 1, T, L]
            mask[:, :, :, 0] = True  # padded queries see column 0 (their output is dropped)
            for i, b in enumerate(g):
                m = rows[b].mask  # [n_b, W_b]
                mask[i, 0, :m.shape[0]] = False
                mask[i, 0, :m.shape[0], :m.shape[1]] = m
            parts = to_device([rows[b].slot for b in g] + [t for b in g for t in range(starts[b], starts[b] + lens[b])]
                              + [i for i, b in enumerate(g) for _ in range(lens[b])]
                              + [t for b in g for t in range(lens[b])], dev)
            n_g = sum(lens[b] for b in g)
            G = len(g)
            out_groups.append((parts[:G], parts[G:G + n_g], parts[G + n_g:G + 2 * n_g], parts[G + 2 * n_g:],
                               mask.to(dev), G, T, L))
        logits = self._run(tokens, pos, slot_of, cols, out_groups, lens, [r.keep for r in rows], interrupt)
        koff = list(accumulate([0] + [r.keep for r in rows]))
        return [logits[a:b] for a, b in zip(koff[:-1], koff[1:])]

    def _run(self, tokens, pos, slot_of, cols, groups, row_lens, keep, interrupt=None) -> torch.Tensor:
        """The decoder over flat tokens: K/V written at (slot_of, cols), attention by groups; logits
        [sum(keep), V] of each row's last keep[b] tokens. `interrupt` is asked before each layer."""
        N, H, Hkv, D = len(pos), self.heads, self.kv_heads, self.head_dim
        if not (isinstance(tokens, torch.Tensor) and tokens.device == self.device):
            tokens = to_device(tokens, self.device)  # [N] (the engine passes device tensors)
        h = self.inner.embed_tokens(tokens)[None]  # [1, N, hidden]
        cos, sin = self.inner.rotary_emb(h, pos[None])  # [1, N, D] each
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [N, 1, D]
        for i, layer in enumerate(self.inner.layers):
            if interrupt is not None and interrupt():
                raise Interrupted(f"abandoned before layer {i}")
            attn = layer.self_attn
            x = layer.input_layernorm(h)  # [1, N, hidden]
            q = attn.q_proj(x).view(N, H, D)
            k = attn.k_proj(x).view(N, Hkv, D)
            v = attn.v_proj(x).view(N, Hkv, D)
            q = q * cos + _rotate_half(q) * sin  # [N, H, D]
            k = k * cos + _rotate_half(k) * sin  # [N, Hkv, D]
            self.cache.write(i, slot_of, cols, k, v)
            o = q if len(groups) == 1 else torch.empty_like(q)  # [N, H, D]
            for slot_t, flat, row, t_in, mask, G, T, L in groups:
                K, V = self.cache.read(i, slot_t, L)  # [G, Hkv, L, D] each
                qp = q.new_zeros(G, T, H, D)
                qp[row, t_in] = q[flat]
                og = F.scaled_dot_product_attention(qp.transpose(1, 2), K, V, attn_mask=mask,
                                                    scale=attn.scaling, enable_gqa=H != Hkv)  # [G, H, T, D]
                o[flat] = og.transpose(1, 2)[row, t_in]  # [n_g, H, D]
            h = h + attn.o_proj(o.reshape(1, N, H * D))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        ends = accumulate(row_lens)  # flat end of each row (host ints)
        sel = [t for e, kp in zip(ends, keep) for t in range(e - kp, e)]  # [M]
        if not sel:
            return h.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)
        hs = self.inner.norm(h[:, to_device(sel, self.device)])  # [1, M, hidden]
        return self.model.lm_head(hs)[0].float()  # [M, V]


@dataclass
class TreeRow:
    """One row of `NativeRunner.forward_rows`: tokens [n] with their positions and cache columns
    in `slot`, mask [n, W] bool (token i sees column j of the slot iff mask[i, j]; it must see
    its own column), and how many of the last tokens need logits."""

    slot: int
    tokens: list[int]
    positions: list[int]
    columns: list[int]
    mask: torch.Tensor
    keep: int

    @classmethod
    def causal(cls, slot: int, tokens: list[int], start: int, keep: int) -> "TreeRow":
        """Tokens appended at columns (= positions) start.., each seeing everything before it."""
        n = len(tokens)
        mask = torch.arange(start + n)[None, :] <= (start + torch.arange(n))[:, None]  # [n, start + n]
        return cls(slot, list(tokens), list(range(start, start + n)), list(range(start, start + n)), mask, keep)


class SerialCache(SlotPool):
    """The fallback's cache: one transformers DynamicCache (`KVCache`) per slot, cropped on rollback."""

    def __init__(self, model: Any, slots: int, max_len: int):
        super().__init__(slots, max_len)
        self.model = model
        self.device = getattr(model, "device", torch.device("cpu"))
        self.kv: list[KVCache | None] = [None] * slots

    def _on_length(self, slot, n):
        kv = self.kv[slot]
        if kv is None:
            self.kv[slot] = KVCache(self.model)
        elif n < kv.length:
            kv.crop(n)  # in place: a caller's cache adopted into the slot (single.py) stays the same object

    @property
    def bytes(self) -> int:
        total = 0
        for kv in self.kv:
            for layer in getattr(kv.cache, "layers", []) if kv else []:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        return total


class SerialRunner(Runner):
    """Rows one at a time through the existing batch-1 KVCache path (any causal LM)."""

    kind = "serial"

    def __init__(self, model: Any, cache: SerialCache):
        self.model, self.cache = model, cache

    def forward(self, slots, tokens, row_lens, keep):
        koff = self._check(self.cache, slots, row_lens, keep)
        tokens = torch.as_tensor(tokens, dtype=torch.long).cpu()  # [N]
        out, start = [], 0
        for s, n, kp in zip(slots, row_lens, keep):
            kv = self.cache.kv[s]
            logits = kv.forward(tokens[start:start + n], keep=max(kp, 1))  # [max(kp,1), V] on the CPU
            out.append(logits[logits.shape[0] - kp:])
            self.cache.set_length(s, kv.length)
            start += n
        return torch.cat(out).to(self.cache.device), koff  # [M, V]


def make_runner(model: Any, slots: int, max_len: int, native: bool | None = None) -> Runner:
    """The native runner when the family allows it (or `native=True` insists), else the serial one."""
    if native is None:
        native = native_supported(model) is None
    if native:
        return NativeRunner(model, SlotCache.for_model(model, slots, max_len))
    return SerialRunner(model, SerialCache(model, slots, max_len))
