"""One request's state inside the batching engine: what it has committed and when it must stop.

A `Sequence` holds the committed ids (prompt + output), its `SamplingParams` with its own seeded
`torch.Generator` (so its draws never depend on its batch companions), its budget, stop strings
through a `TextStream`, its `Stats`, its finish reason, the cache slot it owns while it runs and
its speculation state (mode, a fixed k or None, the smoothed acceptance the scheduler reads).
`commit(accepted, token)` turns one round's outcome into a `Chunk`: cut at EOS, budget or stop
string, the text delta, the counters. A request with `resume_ids` continues a generation that
another engine began: those output tokens are committed already (they count in the budget, the
stop strings and `new_tokens`), and its draws come from `resume_seed(seed, len(resume_ids))`.

This module does not know about models, caches, batches or tensors (the generator aside).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field

import torch

from .defaults import K
from .sampling import SamplingParams, resume_seed
from .speculative import Chunk, Drafter, Stats
from .text import TextStream

__all__ = ["Request", "Sequence", "SpeculationParams"]

_ids = itertools.count(1)


@dataclass
class SpeculationParams:
    """How one request speculates: mode "ar" (never), "sd" (the engine's draft model) or "ssd" (the
    request's own `Request.drafter`, e.g. a remote SSD worker); k None = the scheduler picks k per
    round (sd) or the drafter's default (ssd), an int = exactly that many drafts every round
    (only the budget cuts it; an ssd drafter may propose fewer)."""

    mode: str = "sd"
    k: int | None = None

    def __post_init__(self):
        if self.mode not in ("ar", "sd", "ssd"):
            raise ValueError(f"mode must be ar, sd or ssd, got {self.mode!r}")
        if self.k is not None and not 0 <= self.k <= 64:
            raise ValueError(f"k (draft length) must be between 0 and 64 or None (scheduler picks), got {self.k}")


@dataclass
class Request:
    """What a client asks for; validated by `Sequence`."""

    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams | None = None
    seed: int | None = None
    stop: tuple[str, ...] | list[str] = ()
    spec: SpeculationParams = field(default_factory=SpeculationParams)
    request_id: str | None = None
    cache_key: str | None = None  # e.g. a chat session id: its KV stays in the slot for the next request
    drafter: Drafter | None = None  # mode ssd: proposes each round's drafts (blocking), told each outcome
    resume_ids: list[int] = field(default_factory=list)  # output already committed (a resumed generation)
    resume_text: str = ""  # the text already released for resume_ids


class Sequence:
    """A request being decoded. `ids` = prompt + committed output."""

    def __init__(self, req: Request, tokenizer, eos_ids: set[int], vocab_size: int, max_model_len: int,
                 device: torch.device | str = "cpu", acceptance_prior: float = 0.7):
        prompt = [int(t) for t in req.prompt_ids]
        if not prompt:
            raise ValueError("prompt is empty: give at least one token of prompt")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if len(prompt) >= max_model_len:
            raise ValueError(f"prompt is {len(prompt)} tokens but max_model_len is {max_model_len}: "
                             "shorten the prompt or raise max_model_len")
        resume = [int(t) for t in req.resume_ids]
        bad = [t for t in prompt + resume if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
        self.budget = min(req.max_new_tokens, max_model_len - len(prompt))
        if len(resume) >= self.budget:
            raise ValueError(f"resume_ids hold {len(resume)} tokens, the whole budget of {self.budget}: "
                             "nothing is left to generate")
        self.id = req.request_id or f"req-{next(_ids)}"
        self.cache_key = req.cache_key
        self.drafter = req.drafter  # None again once it failed (the rest runs as ar, `stats.fallback` says why)
        self.ids = prompt + resume  # resumed output is committed already: prefilled with the prompt
        self.prompt_len = len(prompt)
        self.sp = req.sampling or SamplingParams()
        self.spec = req.spec
        seed = resume_seed(req.seed, len(resume)) if req.seed is not None else int.from_bytes(os.urandom(6), "little")
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.text = TextStream(tokenizer, req.stop)
        if resume:
            self.text.resume(resume, req.resume_text)
        self.eos = eos_ids
        self.stats = Stats(prompt_tokens=len(prompt), new_tokens=len(resume))
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self.cached = 0  # ids[:cached] are in the target's KV slot (engine-set)
        self.ssd_next: int | None = None  # ssd: the policy's k for the next proposal (engine-set)
        # speculation state the scheduler reads: geometric acceptance, smoothed (pseudo-counts)
        self.acc_hits, self.acc_tries = acceptance_prior * 4, 4.0
        self.t_added = time.perf_counter()
        self.t_start: float | None = None  # admission (slot taken); t_start - t_added = queue wait

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - self.prompt_len

    @property
    def remaining(self) -> int:
        return self.budget - self.new_tokens

    @property
    def uncached(self) -> int:
        """Committed tokens the target has not seen yet: the prompt (or what of it is left to
        prefill), else the last round's token (1)."""
        return len(self.ids) - self.cached

    @property
    def speculates(self) -> bool:
        """Whether the engine's draft model drafts for this row (sd), with the scheduler's k."""
        return self.spec.mode == "sd" and self.spec.k != 0

    @property
    def ssd_k(self) -> int:
        """An ssd row's k before the budget cuts it: the request's fixed k, else the one the engine's
        policy planned for its next proposal (`ssd_next`), else the default K."""
        if self.spec.k is not None:
            return self.spec.k
        return self.ssd_next if self.ssd_next is not None else K

    @property
    def external(self) -> bool:
        """Whether the row's own drafter proposes its drafts (ssd, until the drafter fails)."""
        return self.spec.mode == "ssd" and self.drafter is not None and self.spec.k != 0

    @property
    def acceptance(self) -> float:
        """Smoothed per-draft acceptance a (the chance a draft is kept, given the ones before were)."""
        return self.acc_hits / self.acc_tries

    def draft_len(self, k_round: int) -> int:
        """This round's k: the request's own fixed k, else the round's; never past the budget."""
        if self.external:
            k = self.ssd_k
        else:
            k = 0 if not self.speculates else (self.spec.k if self.spec.k is not None else k_round)
        return max(0, min(k, self.remaining - 1))

    def observe_acceptance(self, accepted: int, drafted: int, decay: float = 0.8) -> None:
        """EMA of the geometric acceptance: `accepted` kept then one rejection (if any was)."""
        if drafted == 0:
            return
        tries = accepted + (1 if accepted < drafted else 0)
        self.acc_hits = decay * self.acc_hits + accepted
        self.acc_tries = decay * self.acc_tries + tries

    def commit(self, accepted: list[int], token: int, drafted: int | None = None) -> Chunk:
        """Append a round's accepted drafts + recovered/bonus token, cut at EOS / budget / stop."""
        now = time.perf_counter()
        drafted = len(accepted) if drafted is None else drafted
        new = list(accepted) + [int(token)]
        finish = None
        for i, t in enumerate(new):
            if t in self.eos:
                new, finish = new[: i + 1], "eos"
                break
        if self.new_tokens + len(new) >= self.budget and finish is None:
            new, finish = new[: self.budget - self.new_tokens], "length"
        delta, keep = self.text.push(new, final=finish is not None)
        if keep is not None:
            new, finish = new[: keep - self.new_tokens], "stop"
        st = self.stats
        st.rounds += 1
        st.draft_tokens += drafted
        st.accepted_tokens += len(accepted)
        st.accepted_per_round.append(len(accepted))
        st.drafted_per_round.append(drafted)
        self.ids += new
        st.new_tokens = self.new_tokens
        st.elapsed_s = now - self.t_added  # from arrival: queueing counts, as a client sees it
        if st.rounds == 1:
            st.ttft_s = now - self.t_added
        if finish:
            self.finish(finish)
        return Chunk(token_ids=new, text=delta, finish_reason=finish)

    def finish(self, reason: str) -> None:
        self.finish_reason = self.stats.finish_reason = reason
