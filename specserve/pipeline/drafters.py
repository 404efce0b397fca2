"""The drafter for a mode: the one place that maps ar / sd / ssd to what a request drafts with.

  ar   no drafter: the target alone
  sd   the draft `LM` itself: the engine drafts with it in this process, in batched steps
  ssd  a `RemoteDrafter`: one sequence on a `DraftClient` stream to a draft worker, which
       pre-drafts the likely outcomes (`speculate=False`: the same worker without pre-drafting)

`specserve generate`, `specserve bench` and the target replica all call `make_drafter`; each
decides for itself what a missing piece means (a usage error, an API error, or running as ar).
"""

from __future__ import annotations

from ..engine.lm import LM
from ..engine.sampling import SamplingParams
from ..engine.speculative import MODES, Drafter, SpecConfig
from .remote_drafter import DraftClient, RemoteDrafter

__all__ = ["make_drafter"]


def make_drafter(mode: str, prompt_ids: list[int], vocab_size: int, sampling: SamplingParams,
                 spec: SpecConfig | None = None, *, draft: LM | None = None, client: DraftClient | None = None,
                 fanout: list[int] | None = None, speculate: bool = True, seed: int | None = None,
                 max_new_tokens: int | None = None, timeout: float | None = None,
                 cache_key: str | None = None) -> LM | Drafter | None:
    """What `generate(target, <this>, prompt_ids, ...)` takes for `mode`.

    sd needs `draft`, ssd needs `client` (ValueError naming what is missing). The ssd drafter
    drafts `spec.k` tokens (default: engine.defaults.K) with the early stop `spec.stop_prob`;
    `cache_key` (a chat session's) lets its draft worker keep the conversation's KV between turns.
    """
    spec = spec or SpecConfig(mode=mode)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "ar":
        return None
    if mode == "sd":
        if draft is None:
            raise ValueError("mode sd needs a draft model in this process: give one, or use mode ar or ssd")
        return draft
    if client is None:
        raise ValueError("mode ssd needs a link to a draft worker (a DraftClient): give its address, or use ar or sd")
    return RemoteDrafter(client, prompt_ids, vocab_size, sampling=sampling, k=spec.k, fanout=fanout,
                         speculate=speculate, seed=seed, max_new_tokens=max_new_tokens, timeout=timeout,
                         stop_prob=spec.stop_prob, cache_key=cache_key)
