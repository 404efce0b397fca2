"""`generate()`: one request through a one-slot `Engine`, streamed as it is decoded.

This is the loop of `specserve generate`, of `specserve bench` without `--concurrency`, and of a
server's requests that do not fit its engine (prompt + max_tokens past `target.max_model_len`).
It is the engine a target replica batches with, given one slot sized to the request: the same
scheduler, k policy, batched rejection sampler and commit, so what one request gets here is what
it gets in a batch (greedy: the same tokens; sampled: the same law).

What the wrapper adds around `Engine.add / step`:
  * the slot is sized to this request (prompt + budget, at most the models' context window), so
    nothing is preallocated for other requests;
  * `target_cache`, a growable `KVCache` the caller keeps between calls (a chat session's), runs
    on the serial runner: it becomes the slot's cache, parked under a private key, and the engine
    keeps its common prefix with the prompt (engine.py, "Prefix reuse"); the cache is left holding
    a prefix of prompt + output;
  * `stats` is the sequence's own `Stats`, readable while the chunks stream;
  * the cost model: measured at the start (`Engine.probe`) only when the policy has a choice to make
    (a speculating mode with k left to the policy); `cost` passes one in (the bench reuses one
    across its prompts, and the rounds keep refining it).

This module does not know about threads, networks or sessions.
"""

from __future__ import annotations

from typing import Iterator

from .engine import PROBE_LEN, Engine
from .lm import LM, KVCache
from .runner import SerialCache
from .sampling import SamplingParams
from .scheduler import CostModel
from .sequence import Request, SpeculationParams
from .speculative import Chunk, Drafter, SpecConfig, Stats

__all__ = ["generate", "probe_costs"]

_KEY = "single:target_cache"  # the parked key of a caller's target_cache inside the private engine


def generate(
    target: LM,
    draft: LM | Drafter | None,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    spec: SpecConfig | None = None,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
    stats: Stats | None = None,
    target_cache: KVCache | None = None,
    resume_ids: list[int] | tuple[int, ...] = (),
    resume_text: str = "",
    cost: CostModel | None = None,
) -> Iterator[Chunk]:
    """Stream the target's continuation of `prompt_ids`, one Chunk per round.

    `draft` is a draft LM (mode sd: the engine drafts with it), any `Drafter` (mode ssd: e.g. a
    RemoteDrafter to a draft worker), or None (mode ar). `spec.k` fixes the most drafts a round
    drafts (the budget and the early stop, `spec.stop_prob`, cut it), None lets the engine's policy
    choose it every round within [0, spec.k_max]. A drafter that raises DraftUnavailable is
    dropped: the rest runs as ar (still exact) and `stats.fallback` says why. `target_cache` must
    hold a strict prefix of `prompt_ids` (the caller crops it). `resume_ids` continue a generation
    begun elsewhere: output tokens committed already (with `resume_text`, the text released for
    them); they count in `max_new_tokens`, the stop strings and `stats.new_tokens`, and the draws
    come from `resume_seed(seed, len(resume_ids))`.
    """
    spec = spec or SpecConfig()
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token of prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if spec.mode != "ar" and draft is None:
        raise ValueError(f"mode {spec.mode!r} needs a draft model: pass --draft, or use mode 'ar'")
    draft_lm = draft if isinstance(draft, LM) and spec.mode == "sd" else None
    drafter = draft if isinstance(draft, Drafter) and spec.mode == "ssd" else None
    if spec.mode != "ar" and draft_lm is None and drafter is None:
        want = "a draft LM" if spec.mode == "sd" else "a Drafter (e.g. a RemoteDrafter)"
        raise ValueError(f"mode {spec.mode!r} drafts with {want}, got {type(draft).__name__}")
    limit = min(target.max_len, draft_lm.max_len) if draft_lm is not None else target.max_len
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt is {len(prompt_ids)} tokens but the target's context window is {limit}: "
                         "shorten the prompt")
    if target_cache is not None and target_cache.length >= len(prompt_ids) + len(resume_ids):
        raise ValueError(f"target_cache holds {target_cache.length} tokens but must hold fewer than the prompt's "
                         f"{len(prompt_ids) + len(resume_ids)}: crop it to a strict prefix")

    choose = spec.mode != "ar" and spec.k is None  # the policy has a k to choose: it needs measured costs
    need = max(len(prompt_ids) + max_new_tokens, PROBE_LEN)  # the budget cuts the sequence; the probe needs room
    engine = Engine(target, draft_lm, max_num_seqs=1, max_model_len=min(limit, need),
                    max_queue_len=1, k_max=spec.k_max, k_init=min(spec.k_init, spec.k_max),
                    native=False if target_cache is not None else None, probe=choose, cost=cost,
                    stop_prob=spec.stop_prob)
    context = prompt_ids + [int(t) for t in resume_ids]  # what the slot will hold before the first new token
    key = _adopt(engine, target_cache, context) if target_cache is not None else None
    req = Request(prompt_ids, max_new_tokens, sampling, seed, stop, SpeculationParams(spec.mode, spec.k),
                  cache_key=key, drafter=drafter, resume_ids=list(resume_ids), resume_text=resume_text)
    rid = engine.add(req)
    seq = engine.seqs[rid]
    if stats is not None:  # the caller reads the sequence's own counters
        vars(stats).update(vars(seq.stats))
        seq.stats = stats
    try:
        while engine.has_work():
            for _, chunk in engine.step():
                yield chunk
    finally:
        if seq.drafter is not None:  # closed early (the consumer stopped): free the remote sequence
            seq.drafter.close()
            seq.drafter = None


def _adopt(engine: Engine, kv: KVCache, context: list[int]) -> str:
    """Make `kv` the cache of the engine's one slot, parked as holding context[:kv.length]."""
    cache = engine.trun.cache
    assert isinstance(cache, SerialCache), "a caller's KVCache runs on the serial runner"
    slot = cache.alloc()
    if engine.drun is not None and engine.drun.cache.alloc() != slot:
        raise RuntimeError("target and draft slot pools went out of step")
    cache.kv[slot] = kv
    cache.host_lengths[slot] = kv.length
    engine.parked[_KEY] = (slot, context[:kv.length])
    return _KEY


def probe_costs(target: LM, draft: LM | None = None) -> CostModel:
    """The cost model `generate()` would measure at its start (`Engine.probe` on one slot), for a
    caller that runs many requests one after another and passes it to each (`cost=`)."""
    return Engine(target, draft, max_num_seqs=1, max_model_len=PROBE_LEN, max_queue_len=1).policy.cost
