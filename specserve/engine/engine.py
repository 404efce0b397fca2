"""The continuous-batching engine: many sequences share every draft and target forward, ar and sd.

    engine = Engine(target, draft, max_num_seqs=8, max_model_len=2048, max_queue_len=64)
    rid = engine.add(Request(prompt_ids, max_new_tokens=64, seed=1))
    while engine.has_work():
        for rid, chunk in engine.step(): ...

One `step()` is one round over every running row:
  1. schedule  -- apply aborts (their slots are freed), admit waiting requests into free slots,
                  pick the round's k (scheduler.py).
  2. draft     -- ssd rows take their drafter's proposal (the answer to the outcome sent at the
                  end of the last round; the Start's in a row's first round). sd rows with k_i > 0 draft
                  in batched steps through the draft's own SlotCache: the first step feeds each
                  row's uncached tokens (a new prompt, or the catch-up after k = 0 rounds), the
                  next ones feed d_j; on the CPU a row stops after a token the draft doubts
                  (`stop_prob`; it keeps that token). Skipped entirely when every k_i is 0.
  3. verify    -- ONE target forward over every row's uncached tokens + drafts (a new prompt is
                  prefilled here, beside the others' verification; at most `max_prefill_tokens`
                  prompt tokens a round: a longer prompt is fed in chunks over several rounds, its
                  row committing nothing until the last, see scheduler.py).
  4. accept    -- batched rejection sampling, each row with its own generator.
  5. commit    -- the round's single host read (`_verify`: accepted counts and output ids,
                  one `.tolist()`); each sequence commits (EOS / budget / stop cut), both caches
                  roll back by writing lengths.
  6. retire    -- finished rows free their slots; their last chunks go out with the others;
                  ssd rows that go on send their outcomes to their drafters together (one
                  message per draft stream, each with the policy's KPlan: k and miss_k) and
                  wait for the answers (a speculation-cache hit answers at once; see `_tell`).

Prefix reuse: a request with a `cache_key` (a chat session's id) leaves its slot *parked* when it
finishes: the slot keeps the KV of its prompt + output in both caches. The next request with that
key takes the parked slot and keeps its longest common prefix with the new prompt (rollback =
writing the lengths; nothing is copied), so a continued conversation prefills only its new
message (`Stats.prefix_reused`). Parked slots count as free for admission: when a request needs a
slot and none is free, the least recently parked one is dropped. `drop_parked(key)` forgets a key
at once (the server calls it, through its engine loop, when the session is deleted or expired):
its parked slot is freed, and a request still running or waiting with that key frees its slot
when it ends instead of parking it.
The output is what the target alone produces (greedy: token-identical; sampled: the same law).
An ssd row's drafter that raises DraftUnavailable is dropped: the row goes on as ar, exact, and
`stats.fallback` says why; the other rows never wait for it past its own deadline.

On CUDA a round queues every draft step, the verify forward and the sampling without waiting for
the device, and step 5 is its only host sync: the host needs nothing else from the device (lengths,
k and indices are host ints; host lists reach the device by `device.to_device`, a non-blocking
pinned copy; draws use `device.draw`, not multinomial). Timings are CUDA events (`device.Clock`),
read after that sync (the early stop, which reads each draft step's confidences, is off there).
tests/test_batch_gpu.py checks this on the CPU by tracing a round's ops.

This module does not know about threads, asyncio, networks or sessions: a server runs `step()` in
one loop and routes the (request id, Chunk) pairs. An ssd row's drafter is only the `Drafter`
interface here: where its draft worker runs and how it is reached is the drafter's business.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .defaults import K, K_MAX, MAX_PREFILL_TOKENS, STOP_PROB
from .device import Clock, draw, synchronize, to_device
from .lm import LM, check_pair
from .runner import make_runner
from .sampling import batched_rejection_sample, warp_rows
from .scheduler import CostModel, KPolicy, LinearCost, MeasuredCost, Scheduler, expected_tokens, ssd_miss_k
from .sequence import Request, Sequence
from .speculative import Chunk, DraftUnavailable, KPlan

__all__ = ["Engine", "EngineStats", "run_to_completion", "PROBE_LEN"]

_PROBE_WARMUP = 8  # tokens a slot takes before the probe's timed forward (at most 5 more tokens)
PROBE_LEN = 16  # the shortest max_model_len the start-up probe's forwards fit in


@dataclass
class EngineStats:
    rounds: int = 0
    row_rounds: int = 0  # sum over rounds of the batch size
    drafted_rows: int = 0  # row-rounds that drafted
    draft_tokens: int = 0
    accepted_tokens: int = 0
    committed_tokens: int = 0
    k_sum: int = 0  # sum over rounds of the longest draft of the round (0 = a plain decode round)
    last_batch: int = 0  # rows of the latest round
    draft_s: float = 0.0
    verify_s: float = 0.0
    miss_k_rounds: dict = field(default_factory=dict)  # KPlan.miss_k -> rounds whose ssd rows were told it
    prefill_chunks: int = 0  # row-rounds that fed only part of a prompt (max_prefill_tokens)

    def to_dict(self, engine: "Engine") -> dict:
        r = max(self.rounds, 1)
        return {"rounds": self.rounds, "row_rounds": self.row_rounds, "mean_batch": round(self.row_rounds / r, 3),
                "mean_k": round(self.k_sum / r, 3), "k": engine.policy.k, "k_max": engine.policy.k_max,
                "waiting": len(engine.scheduler.waiting),
                "mean_drafts_per_row": round(self.draft_tokens / max(self.row_rounds, 1), 3),
                "acceptance_rate": round(self.accepted_tokens / self.draft_tokens, 4) if self.draft_tokens else 0.0,
                "committed_tokens": self.committed_tokens, "draft_s": round(self.draft_s, 4),
                "verify_s": round(self.verify_s, 4), "miss_k_rounds": dict(sorted(self.miss_k_rounds.items())),
                "prefill_chunks": self.prefill_chunks,
                **engine.capacity()}


class Engine:
    def __init__(self, target: LM, draft: LM | None = None, max_num_seqs: int = 8, max_model_len: int | None = None,
                 max_queue_len: int = 64, k_max: int = K_MAX, k_init: int = K, hysteresis: float = 0.05,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS, native: bool | None = None, probe: bool = True,
                 cost: CostModel | None = None, ssd_skip_misses: bool = True, stop_prob: float = STOP_PROB):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        limit = min(target.max_len, draft.max_len) if draft is not None else target.max_len
        max_model_len = max_model_len or min(limit, 2048)
        if max_model_len > limit:
            raise ValueError(f"max_model_len is {max_model_len} but the model's context window is {limit}: "
                             "lower max_model_len")
        if draft is not None:
            check_pair(target, draft)
        self.target, self.draft, self.max_model_len = target, draft, max_model_len
        self.ssd_skip_misses = ssd_skip_misses  # let the policy answer ssd misses without drafts (KPlan.miss_k)
        if not 0 <= stop_prob < 1:
            raise ValueError(f"stop_prob must be in [0, 1), got {stop_prob}")
        self.trun = make_runner(target.model, max_num_seqs, max_model_len, native)
        self.drun = make_runner(draft.model, max_num_seqs, max_model_len, native) if draft is not None else None
        self.device = self.trun.cache.device
        self.clock = Clock(self.device)
        # sd rows stop drafting after a token the draft gives less than this (on the CPU only: the
        # check reads each step's confidences on the host, a sync per draft step on CUDA, where a
        # doubted draft costs little to verify anyway)
        self.stop_prob = stop_prob if self.device.type == "cpu" else 0.0
        self._draft_marks: list[tuple[int, object, object]] = []  # (tokens, start, end) of the round's draft steps
        if cost is None:
            cost = self.probe() if probe else CostModel(LinearCost(1.0, 0.05), LinearCost(0.3, 0.015) if draft else None)
        self.policy = KPolicy(cost, k_max=k_max, hysteresis=hysteresis, k=k_init if draft is not None else 0)
        self.scheduler = Scheduler(max_num_seqs, max_queue_len, self.policy, speculate=draft is not None,
                                   max_prefill_tokens=max_prefill_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.parked: OrderedDict[str, tuple[int, list[int]]] = OrderedDict()  # key -> (slot, ids it holds)
        self.stats = EngineStats()

    # ---- requests ---------------------------------------------------------------------------
    def add(self, request: Request) -> str:
        """Queue a request; return its id. Raises ValueError (bad request) or QueueFull."""
        if request.spec.mode == "sd" and self.draft is None and request.spec.k != 0:
            raise ValueError("mode 'sd' needs a draft model: give the engine a draft, or use mode 'ar'")
        if request.spec.mode == "ssd" and request.drafter is None:
            raise ValueError("mode 'ssd' needs the request's drafter (Request.drafter, e.g. a RemoteDrafter)")
        if request.request_id is not None and request.request_id in self.seqs:
            raise ValueError(f"request_id {request.request_id!r} is already running: pick a unique id")
        seq = Sequence(request, self.target.tokenizer, self.target.eos_ids, self.target.vocab_size,
                       self.max_model_len, device=self.device)
        if seq.spec.mode == "ssd" and seq.spec.k is None:
            seq.ssd_next = self.policy.k_ssd  # its Start asks for the policy's current ssd k
        self.scheduler.add(seq)
        self.seqs[seq.id] = seq
        return seq.id

    def abort(self, request_id: str) -> None:
        """Stop a request at the next round boundary; its slot is freed and it emits 'abort'."""
        if request_id in self.seqs:
            self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def capacity(self) -> dict:
        c = self.trun.cache.capacity()
        c["parked_slots"] = len(self.parked)
        c["draft_cache_bytes"] = self.drun.cache.bytes if self.drun else 0
        c["runner"] = self.trun.kind
        return c

    # ---- one round --------------------------------------------------------------------------
    def step(self) -> list[tuple[str, Chunk]]:
        out = self.scheduler.schedule(self.trun.cache.num_free + len(self.parked))
        events = [(s.id, Chunk([], finish_reason="abort")) for s in self.scheduler.aborted_waiting]
        self.scheduler.aborted_waiting.clear()
        for s in out.aborted:
            self._release(s)
            events.append((s.id, Chunk([], finish_reason="abort")))
        for s in events:
            self.seqs.pop(s[0], None)
        for s in out.prefill:
            self._take_slot(s)
            s.t_start = time.perf_counter()
        rows, kd = out.running, out.draft_lens
        if not rows:
            return events
        feeds = [min(f, s.uncached) for s, f in zip(rows, out.feeds)]  # a parked prefix may have spared some
        chunk = [f < s.uncached for s, f in zip(rows, feeds)]  # rows feeding part of their prompt: no output
        if any(chunk):
            self._draft_chunks([s for s, c in zip(rows, chunk) if c], [f for f, c in zip(feeds, chunk) if c])
        clock = self.clock
        self._draft_marks.clear()  # a round that raised must not leave its marks to the next one
        t0 = clock.mark()
        kd = list(kd)
        proposals = self._proposals(rows, kd)  # ssd rows: kd[b] becomes its proposal's length
        drafts, q = self._draft(rows, kd, proposals)  # [sum kd] long, [sum kd, V] | None
        t1 = clock.mark()
        n, outs, n_tokens, t2 = self._verify(rows, kd, drafts, q, feeds, chunk)  # t2: marked before the host read
        draft_s, verify_s = clock.seconds(t0, t1), clock.seconds(t1, t2)  # complete now: no sync
        for tokens, a, b in self._draft_marks:
            self.policy.cost.draft.observe(tokens, clock.seconds(a, b))
        self.policy.cost.target.observe(n_tokens, verify_s)
        tells = []
        for b, (s, k, o) in enumerate(zip(rows, kd, outs)):
            s.stats.verify_s += verify_s  # each row waits for the whole round
            s.stats.draft_wait_s += draft_s
            if chunk[b]:  # a prefill chunk: the cache holds more of the prompt, nothing is committed
                n[b] = 0
                s.cached += feeds[b]
                self.stats.prefill_chunks += 1
                continue
            nb = n[b]
            committed = s.cached = len(s.ids) + nb
            self.trun.cache.set_length(s.slot, committed)
            if self.drun is not None:
                self.drun.cache.set_length(s.slot, min(self.drun.cache.length(s.slot), committed))
            events.append((s.id, s.commit(o[:nb], o[nb], drafted=k)))
            if s.spec.mode == "ssd":
                s.stats.hit_per_round.append(int(k > 0 and s.drafter is not None and s.drafter.last_hit))
                if s.drafter is not None and not s.finish_reason and not s.drafter.waiting_start:
                    tells.append((s, nb, o[nb], committed))  # (a drafter not started yet starts later)
        self._tell(tells)
        for s in self.scheduler.update_from_output(rows, n, kd):
            self._release(s)
            self.seqs.pop(s.id, None)
        self._account(rows, kd, n, draft_s, verify_s, committing=len(rows) - sum(chunk))
        return events

    def _take_slot(self, s: Sequence) -> None:
        """A slot for an admitted sequence: its key's parked slot (keeping the common prefix) or a free one."""
        parked = self.parked.pop(s.cache_key, None) if s.cache_key is not None else None
        if parked is not None:
            s.slot, held = parked
            n, limit = 0, min(len(held), len(s.ids) - 1)  # the last prompt token is always fed
            while n < limit and held[n] == s.ids[n]:
                n += 1
            for run in (self.trun, self.drun):
                if run is not None:
                    run.cache.set_length(s.slot, min(run.cache.length(s.slot), n))
            s.stats.prefix_reused = s.cached = self.trun.cache.length(s.slot)
            return
        if self.trun.cache.num_free == 0:  # admission counted the parked slots as free: drop the oldest
            _, (slot, _) = self.parked.popitem(last=False)
            self._free_slot(slot)
        s.slot, s.cached = self.trun.cache.alloc(), 0
        if self.drun is not None and self.drun.cache.alloc() != s.slot:
            raise RuntimeError("target and draft slot pools went out of step")

    def _release(self, s: Sequence) -> None:
        """A finished (or aborted) sequence's slot: parked under its cache key, else freed."""
        if s.drafter is not None:  # an ssd row: the drafter frees the sequence on its side
            s.drafter.close()
            s.drafter = None
        if s.slot is None:
            return
        if s.cache_key is not None:
            old = self.parked.pop(s.cache_key, None)
            if old is not None:
                self._free_slot(old[0])
            held = s.ids[:self.trun.cache.length(s.slot)]  # the cache may hold a cut tail: never past ids
            self.parked[s.cache_key] = (s.slot, held)
        else:
            self._free_slot(s.slot)
        s.slot = None

    def _free_slot(self, slot: int) -> None:
        self.trun.cache.free(slot)
        if self.drun is not None:
            self.drun.cache.free(slot)

    def drop_parked(self, key: str) -> bool:
        """Forget a cache key now (its session was deleted): free its parked slot, and un-key the
        requests running or waiting with it (they free their slot when they end, nothing is parked).
        True when a parked slot was freed."""
        for s in self.seqs.values():
            if s.cache_key == key:
                s.cache_key = None
        parked = self.parked.pop(key, None)
        if parked is not None:
            self._free_slot(parked[0])
        return parked is not None

    def _proposals(self, rows: list[Sequence], kd: list[int]) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """ssd rows: each drafter's proposal {row: (d, q [len d, V] | None)}; kd[b] set to len(d).

        A row's proposal is the Start's in its first round, else the answer `_tell` already
        waited for at the end of the last round. A failed drafter leaves its row ar."""
        out = {}
        starts: dict[type, list] = {}  # rows whose drafter is not started: their Starts in one exchange per kind
        for b, s in enumerate(rows):
            if s.spec.mode == "ssd" and s.external and kd[b] > 0 and s.drafter.waiting_start:
                starts.setdefault(type(s.drafter), []).append((s.drafter, s.ids, KPlan(kd[b], s.ssd_k, s.ssd_k)))
        for kind, items in starts.items():
            kind.start_all(items)
        for b, s in enumerate(rows):
            if s.spec.mode != "ssd":
                continue
            if not s.external or kd[b] == 0:
                kd[b] = 0
                continue
            try:  # the row's plan: the request's k, every round
                d, q = s.drafter.propose(s.ids, KPlan(kd[b], s.ssd_k, s.ssd_k))
            except DraftUnavailable as e:
                self._drop_drafter(s, e)
                kd[b] = 0
                continue
            d = list(d[:kd[b]])
            kd[b] = len(d)
            out[b] = (d, q[:len(d)] if q is not None else None)
        return out

    def _tell(self, tells: list[tuple[Sequence, int, int, int]]) -> None:
        """The ssd rows' outcomes (row, accepted, token, committed) to their drafters, with the plan of
        each next proposal (the row's k, cut by the budget left); the drafters wait for those
        proposals. Drafters of one kind are told together (`Drafter.outcome_all`: a RemoteDrafter
        sends every outcome on a stream in one message and reads one reply, so the draft worker
        drafts the misses together and has speculated for every row at once)."""
        ssd = [s for s in self.seqs.values() if s.spec.mode == "ssd" and s.drafter is not None
               and s.slot is not None and not s.finish_reason]
        free = [s for s in ssd if s.spec.k is None]
        if free:  # the next proposals' k of the ssd rows that let the policy choose (started or not)
            ids = {s.id for s in ssd}
            others = [s for s in self.seqs.values() if s.slot is not None and s.id not in ids and not s.finish_reason]
            k_next = self.policy.choose_ssd([(s.acceptance, s.spec.k) for s in ssd],
                                            sum(1 + s.draft_len(self.policy.k) for s in others),
                                            sum(expected_tokens(s.acceptance, s.draft_len(self.policy.k)) for s in others))
            for s in free:
                s.ssd_next = k_next
        if not tells:
            return
        groups: dict[type, list] = {}
        for t in tells:
            groups.setdefault(type(t[0].drafter), []).append(t)
        miss_k = self._miss_k(tells)
        if miss_k is not None:
            self.stats.miss_k_rounds[miss_k] = self.stats.miss_k_rounds.get(miss_k, 0) + 1
        for kind, group in groups.items():
            t0 = time.perf_counter()
            errors = kind.outcome_all([(s.drafter, a, tok, c, KPlan(s.draft_len(0), s.ssd_k, s.ssd_k, miss_k))
                                       for s, a, tok, c in group])
            wait = time.perf_counter() - t0  # every row of the group waits for the one reply
            for (s, *_), err in zip(group, errors):
                if err is not None:
                    self._drop_drafter(s, err)
                    continue
                st, dr = s.stats, s.drafter
                st.draft_wait_s += wait
                if dr.last_hit:
                    st.hit_wait_s += wait  # the answer latency of a hit
                else:
                    st.miss_wait_s += wait
                st.cache_hits, st.cache_misses, st.late_hits = dr.hits, dr.misses, dr.late_hits

    def _miss_k(self, tells) -> int | None:
        """KPlan.miss_k for this round's ssd rows (`scheduler.ssd_miss_k`), from the draft model's
        measured step cost, each row's acceptance and its hit rate (hits + 3 over tries + 4: a prior
        of 0.75); None (always draft a miss) when the engine has no draft model to price it with, or
        `ssd_miss_k` is off."""
        if not self.ssd_skip_misses or self.drun is None:
            return None
        ssd = {s.id for s, *_ in tells}
        others = [expected_tokens(s.acceptance, s.draft_len(self.policy.k)) for s in self.seqs.values()
                  if s.slot is not None and s.id not in ssd and not s.finish_reason]
        rows = [(s.acceptance, s.draft_len(0), (s.drafter.hits + 3) / (s.drafter.hits + s.drafter.misses + 4))
                for s, *_ in tells]
        base = sum(k + 1 for _, k, _ in rows) + sum(1 + self.policy.k for _ in others)
        return ssd_miss_k(self.policy.cost, base, others, rows)

    @staticmethod
    def _drop_drafter(s: Sequence, e: Exception) -> None:
        s.drafter.close()
        s.drafter, s.stats.fallback = None, f"ar after round {s.stats.rounds}: {e}"

    def _draft(self, rows: list[Sequence], kd: list[int], proposals: dict | None = None):
        """ssd rows' proposals + batched draft steps for sd rows; returns (flat drafts [sum kd] long,
        q [sum kd, V] or None), on the device."""
        N = sum(kd)
        drafts = torch.empty(N, dtype=torch.long, device=self.device)  # [N]
        if N == 0:
            return drafts, None
        proposals = proposals or {}
        off = [sum(kd[:b]) for b in range(len(rows))]  # flat offset of row b's drafts
        act = [b for b, k in enumerate(kd) if k > 0 and b not in proposals]  # rows the draft model drafts
        sampled = any(not rows[b].sp.greedy for b, k in enumerate(kd) if k > 0)
        V = self.target.vocab_size
        q = torch.empty(N, V, device=self.device) if sampled else None  # [N, V]: every row is written below
        for b, (d, qb) in proposals.items():
            pos = slice(off[b], off[b] + len(d))
            drafts[pos] = to_device(d, self.device)
            if q is not None:  # point masses where the drafter drafted greedily
                q[pos] = to_device(qb, self.device, torch.float32) if qb is not None else torch.nn.functional.one_hot(
                    drafts[pos], V).float()
        if not act:
            return drafts, q
        cache = self.drun.cache
        feed = [rows[b].ids[cache.length(rows[b].slot):] for b in act]  # catch-up tokens (>= 1 each)
        tokens = to_device([t for f in feed for t in f], self.device)
        logits = self._draft_forward([rows[b].slot for b in act], tokens, [len(f) for f in feed])
        planned = list(kd)
        for j in range(max(kd)):
            sps = [rows[b].sp for b in act]
            qj = warp_rows(logits, sps, [1] * len(act))  # [A, V]
            dj = qj.argmax(-1)  # [A]
            for i, b in enumerate(act):
                if not rows[b].sp.greedy:
                    dj[i] = draw(qj[i], rows[b].gen)  # = multinomial(qj[i], 1), without its host reads
            pos = to_device([off[b] + j for b in act], self.device)
            drafts[pos] = dj
            if q is not None:
                q[pos] = qj
            if self.stop_prob > 0:  # a row ends its draft after a token it doubts (kept: it may be accepted)
                for i in self._doubted(logits, qj, dj, [rows[b].sp.greedy for b in act]):
                    kd[act[i]] = min(kd[act[i]], j + 1)
            nxt = [i for i, b in enumerate(act) if kd[b] > j + 1]  # rows that need d_{j+2}
            if not nxt:
                break
            act = [act[i] for i in nxt]
            sel = dj[to_device(nxt, self.device)]  # [A'] fed without leaving the device
            logits = self._draft_forward([rows[b].slot for b in act], sel, [1] * len(act))
        if kd != planned:  # rows that stopped early: their drafts back to back again
            keep = to_device([off[b] + i for b in range(len(rows)) for i in range(kd[b])], self.device)
            drafts, q = drafts[keep], (q[keep] if q is not None else None)
        return drafts, q

    def _doubted(self, logits: torch.Tensor, qj: torch.Tensor, dj: torch.Tensor, greedy: list[bool]) -> list[int]:
        """The active rows whose draft token dj the draft itself gives less than `stop_prob`: under
        its sampling law q (sampled rows), or under its softmax at temperature 1 (greedy rows, whose
        q is a point mass). Depends on the draft alone, so stopping there keeps the output exact."""
        conf = qj.gather(1, dj[:, None])[:, 0]  # [A]
        if any(greedy):
            soft = torch.softmax(logits.float(), -1).gather(1, dj[:, None])[:, 0]  # [A]
            conf = torch.where(to_device(greedy, self.device, torch.bool), soft, conf)
        return [i for i, c in enumerate((conf < self.stop_prob).tolist()) if c]  # a host read: CPU only

    def _draft_forward(self, slots, tokens, lens):
        """One batched draft step; its time marks are read after the round's host read (step)."""
        t0 = self.clock.mark()
        logits, _ = self.drun.forward(slots, tokens, lens, [1] * len(slots))  # [A, V]
        self._draft_marks.append((sum(lens), t0, self.clock.mark()))
        return logits

    def _draft_chunks(self, rows: list[Sequence], feeds: list[int]) -> None:
        """Rows prefilling a chunk of their prompt this round: the sd ones feed the same tokens to
        the draft's cache too (one draft forward), so that the draft never catches up a whole long
        prompt in one step when the row starts drafting. Not timed: the draft's cost model prices
        draft steps, not prefill."""
        if self.drun is None:
            return
        cache = self.drun.cache
        sd = [(s, s.ids[cache.length(s.slot):s.cached + f]) for s, f in zip(rows, feeds)
              if s.speculates and cache.length(s.slot) < s.cached + f]
        if sd:
            tokens = to_device([t for _, u in sd for t in u], self.device)
            self.drun.forward([s.slot for s, _ in sd], tokens, [len(u) for _, u in sd], [0] * len(sd))  # no logits

    def _verify(self, rows: list[Sequence], kd: list[int], drafts: torch.Tensor, q, feeds: list[int],
                chunk: list[bool]):
        """One target forward + batched rejection sampling; the round's one host read.

        feeds[b]: the uncached tokens row b feeds; chunk[b]: they are only part of its prompt (its
        output is not used, and it draws nothing from its generator).
        Returns (accepted [B], output ids per row, flat tokens, the clock mark taken just before
        the read, so that every mark of the round has completed when step() reads them)."""
        unc = [s.ids[s.cached:s.cached + f] for s, f in zip(rows, feeds)]  # uncached committed tokens (>= 1 each)
        lens = [len(u) + k for u, k in zip(unc, kd)]
        host_pos, host_tok, draft_pos, start = [], [], [], 0
        for u, k, L in zip(unc, kd, lens):
            host_pos.extend(range(start, start + len(u)))
            host_tok.extend(u)
            draft_pos.extend(range(start + len(u), start + L))
            start += L
        tokens = torch.empty(start, dtype=torch.long, device=self.device)  # [sum lens]
        ix = to_device(host_pos + draft_pos + host_tok, self.device)  # one non-blocking host -> device copy
        H, D = len(host_pos), len(draft_pos)
        tokens[ix[:H]] = ix[H + D:]
        if draft_pos:
            tokens[ix[H:H + D]] = drafts
        logits, _ = self.trun.forward([s.slot for s in rows], tokens, lens, [k + 1 for k in kd])  # [sum kd + B, V]
        p = warp_rows(logits, [s.sp for s in rows], [k + 1 for k in kd])
        n, _, out_ids = batched_rejection_sample(drafts, kd, q, p, [s.gen for s in rows],
                                                 greedy=[s.sp.greedy or c for s, c in zip(rows, chunk)])
        mark = self.clock.mark()
        host = torch.cat([n[:, None], out_ids], 1).tolist()  # THE host sync of the round
        return [h[0] for h in host], [h[1:] for h in host], start, mark

    def _account(self, rows, kd, n, draft_s, verify_s, committing: int) -> None:
        st = self.stats
        st.rounds += 1
        st.row_rounds += len(rows)
        st.last_batch = len(rows)
        st.drafted_rows += sum(1 for x in kd if x)
        st.draft_tokens += sum(kd)
        st.accepted_tokens += sum(n)
        st.committed_tokens += sum(n) + committing
        st.k_sum += max(kd)
        st.draft_s += draft_s
        st.verify_s += verify_s

    def probe(self) -> CostModel:
        """Time a few forwards on free slots (dummy tokens) to seed the cost model in seconds."""
        def timed(run, rows, tokens):
            slots = [run.cache.alloc() for _ in range(rows)]
            try:
                dev = run.cache.device
                run.forward(slots, torch.zeros(rows * _PROBE_WARMUP, dtype=torch.long, device=dev),
                            [_PROBE_WARMUP] * rows, [1] * rows)
                synchronize(dev)  # outside the rounds: the probe may wait for the device
                t0 = time.perf_counter()
                run.forward(slots, torch.zeros(rows * tokens, dtype=torch.long, device=dev), [tokens] * rows,
                            [tokens] * rows)
                synchronize(dev)
                return time.perf_counter() - t0
            finally:
                for s in slots:
                    run.cache.free(s)

        def fit(run, shapes):
            timed(run, 1, 1)  # warm-up
            pts = [(r * t, timed(run, r, t)) for r, t in shapes]  # (flat tokens, seconds)
            (na, a), (nb, b) = pts[0], pts[-1]
            c1 = max((b - a) / (nb - na), 0.0) if nb > na else 0.0
            cost = MeasuredCost(LinearCost(max(a - c1 * na, 1e-6), c1, span=max(nb, 2)))
            for n, sec in pts:  # measured points; rounds move them and add more as they run
                cost.set_point(n, sec)
            return cost

        rows = self.trun.cache.slots
        tgt = fit(self.trun, sorted({(1, 1), (1, 3), (rows, 1), (rows, 3), (rows, 5)}, key=lambda x: x[0] * x[1]))
        drf = fit(self.drun, sorted({(1, 1), (max(rows // 2, 1), 1), (rows, 1)})) if self.drun is not None else None
        return CostModel(tgt, drf)


def run_to_completion(engine: Engine, requests: list[Request], join_at: dict[int, list[Request]] | None = None):
    """Run requests through `engine` until all finish; `join_at[r]` adds more before round r.

    Returns {request id: (token ids, chunks, Sequence)} in the order added.
    """
    results: dict[str, tuple[list[int], list[Chunk], Sequence]] = {}

    def add(req):
        rid = engine.add(req)
        results[rid] = ([], [], engine.seqs[rid])

    for r in requests:
        add(r)
    rnd = 0
    join_at = join_at or {}
    while engine.has_work() or any(r >= rnd for r in join_at):
        for r in join_at.get(rnd, []):
            add(r)
        for rid, chunk in engine.step():
            results[rid][0].extend(chunk.token_ids)
            results[rid][1].append(chunk)
        rnd += 1
    return results
