"""The draft side of SSD at batch: every open sequence's drafting and speculation in shared forwards.

`DraftScheduler` holds one draft model, a `SlotCache` with a slot per open sequence, and a
`SlotSession` per sequence (`DraftSession`'s protocol: proposals, outcomes, the speculation
table, the fitted fan-out, over a slot instead of a private cache). Its two kinds of work:

  answer          -- `answer(jobs)`: the proposals asked for by the messages that arrived
                     together (Starts and outcomes of many sequences), run to completion in
                     lockstep: a hit needs no forward at all, every miss (and every late hit
                     drawing on a short branch) is drafted just-in-time in the SAME batched
                     forwards, one token of every such row per forward (the first forward feeds
                     each row's uncached tokens: a new prompt, or the outcome's t*).
  speculate_step  -- ONE forward of speculation for every sequence whose proposal is out: the
                     glue rows of sequences that just sent one (the draft's distribution at every
                     position of the proposal) beside the branch rows of sequences already
                     speculating. A sequence's branches are one tree row over its own slot: branch
                     (i, t) sees the prefix columns up to its fork (S + d_1..d_i), then its own
                     earlier tokens; the prefix is never copied and RoPE runs at true positions.
                     Branch tokens live in scratch columns past the sequence's valid ones.

So the server (pipeline/draft_server.py) answers a round's outcomes in one reply and speculates
between messages one forward at a time, and abandons a speculation forward between two layers
when a message arrives (`speculate_step(interrupt)`): an outcome waits for at most one layer.
An outcome that arrives while its own round is still being speculated takes the branch as far
as it got (a late hit, drawn on just-in-time), or drafts just-in-time (a miss).

Each sequence's logic is written as a generator that yields the forward it needs next (a
`TreeRow`) and receives that row's logits; the scheduler runs many such generators in lockstep,
one batched `NativeRunner.forward_rows` per step. Greedy drafting is the argmax of each row's
logits and sampled drafting draws from each sequence's own generator, so a sequence drafts what it
would draft alone (up to floating-point differences between a batched and a single forward).

This module does not know about messages, streams or threads: it takes token ids and outcomes
and returns proposals. It needs the native decoder (Llama / Qwen2 families); the server keeps the
per-sequence `DraftSession` for any other draft model.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generator

import torch

from . import defaults
from .lm import LM
from .runner import Interrupted, NativeRunner, TreeRow, native_supported
from .slot_cache import CacheFull, SlotCache
from .speculative import KPlan
from .ssd import AcceptanceModel, DraftSession, Proposal, _common_prefix, predict_outcomes

__all__ = ["DraftScheduler", "SlotSession"]

Program = Generator[TreeRow, torch.Tensor, "Proposal | None"]


class _Tree:
    """The branches of one speculation: branch b = keys[b] = (i, t) forks after S + d_1..d_i with t.

    Branch b's s-th drafted token is fed at step s + 1 into column L + s * B + b (L = |S| + k, the
    sequence's valid columns; B = number of branches). budgets[b]: tokens branch b is drafted to;
    limits[b]: the most it may ever hold (the session's budget): a branch that stopped early or
    reached its limit is final.
    """

    def __init__(self, round_: int, keys, budgets, limits, P: int, L: int):
        B = len(keys)
        self.round, self.keys, self.budgets, self.limits, self.P, self.L = round_, keys, budgets, limits, P, L
        self.toks: list[list[int]] = [[] for _ in range(B)]
        self.qi: list[list[list[int]]] = [[] for _ in range(B)]
        self.qp: list[list[list[float]]] = [[] for _ in range(B)]
        self.stopped = [False] * B
        self.open = [n > 0 for n in budgets]
        self.steps = 0

    def row(self, slot: int, max_cols: int) -> TreeRow | None:
        """The next forward: one token of every open branch (None when none is open or out of columns)."""
        B, L, s = len(self.keys), self.L, self.steps
        live = [b for b in range(B) if self.open[b]]
        if not live or L + (s + 1) * B > max_cols:
            return None
        W = L + (s + 1) * B
        mask = torch.zeros(len(live), W, dtype=torch.bool)  # [n_live, W]
        for r, b in enumerate(live):
            i = self.keys[b][0]
            mask[r, : self.P + i] = True  # S + d_1..d_i
            mask[r, [L + s2 * B + b for s2 in range(s + 1)]] = True  # its own tokens so far, and this one
        x = [self.toks[b][-1] if self.toks[b] else self.keys[b][1] for b in live]
        return TreeRow(slot, x, [self.P + self.keys[b][0] + s for b in live], [L + s * B + b for b in live],
                       mask, len(live))

    def take(self, picks) -> None:
        """The draws of the step just run: one (token, q ids, q probs, stop) per open branch."""
        live = [b for b in range(len(self.keys)) if self.open[b]]
        for b, (t, ids, ps, stop) in zip(live, picks):
            self.toks[b].append(t), self.qi[b].append(ids), self.qp[b].append(ps)
            self.stopped[b] = stop
            self.open[b] = not stop and len(self.toks[b]) < self.budgets[b]
        self.steps += 1

    def table(self, greedy: bool) -> dict:
        """(round, i, t) -> (proposal, final) of every branch, as far as it got."""
        return {(self.round, i, t): (Proposal(self.round, self.toks[b], [] if greedy else self.qi[b],
                                              [] if greedy else self.qp[b], cache_hit=True),
                                     self.stopped[b] or len(self.toks[b]) >= self.limits[b])
                for b, (i, t) in enumerate(self.keys)}


class SlotSession(DraftSession):
    """A `DraftSession` whose KV lives in one slot of the scheduler's cache.

    The session's drafting and speculation are generators (`Program`s) that yield the forwards
    they need; `DraftScheduler` runs them. `held` is what the slot's valid columns hold.
    """

    def __init__(self, lm: LM, prompt_ids: list[int], slot: int, max_len: int, max_cols: int, **kwargs):
        super().__init__(lm, prompt_ids, **kwargs)
        self.cache = None  # the slot cache replaces the private one
        self.slot, self.max_len, self.max_cols = slot, max_len, max_cols
        self.held: list[int] = []
        self.cache_key: str | None = None  # set by the scheduler: where the slot parks when it closes
        self.tree: _Tree | None = None  # the speculation in progress
        self.spec: tuple[Program, TreeRow] | None = None  # ... its generator and the forward it waits for

    # ---- the protocol, as programs ----------------------------------------------------------
    def first_program(self, plan: KPlan | None) -> Program:
        if self.sent is not None:
            raise ValueError("first_proposal was already sent: answer outcomes with on_outcome")
        self.plan = self._check_plan(plan)
        self.round = 0
        return self._jit(self._budget(len(self.seq), self.plan.k))

    def outcome_program(self, round: int, accepted: int, token: int, plan: KPlan | None) -> Program | Proposal:
        """Commit the outcome of `round`; the proposal for the next round (a hit: at once) or the
        program that drafts it. Raises StaleRound / ValueError before changing anything."""
        accepted, token, plan = self._check_outcome(round, accepted, token, plan)
        self._observe(accepted, token)
        table = self.table
        if self.tree is not None:  # its own round is still being speculated: take the branches as they are
            table = self.tree.table(self.sp.greedy)
        if self.spec is not None:
            self.spec[0].close()
        self.tree = self.spec = None
        self.seq += self.sent.token_ids[:accepted] + [token]
        self.round += 1
        n = self._budget(len(self.seq), plan.k)
        entry = table.get((self.round, accepted, token))
        self.table, self.rows, self.plan = {}, [], plan
        if entry is None:
            self.misses += 1
            return self._jit(plan.jit(n))
        prop, final = entry
        self.hits += 1
        m = max(len(prop.token_ids), plan.jit(n))  # a branch shorter than asked is drawn on, to miss_k at most
        if len(prop.token_ids) >= m or final:
            self.sent = prop.cut(n)
            return self.sent
        self.late_hits += 1
        return self._jit(m, prop)

    def wants_speculation(self) -> bool:
        return (self.speculating and self.sent is not None and self.spec_round != self.round + 1
                and self.spec is None)

    # ---- programs ---------------------------------------------------------------------------
    def _feed(self, ids: list[int], keep: int):
        """Make the slot hold `ids` (re-feeding from the common prefix); the last `keep` rows of logits."""
        if len(ids) > self.max_len:
            raise ValueError(f"the sequence has {len(ids)} tokens, more than the draft worker's max_model_len="
                             f"{self.max_len}: start the worker with a larger --max-model-len")
        m = min(_common_prefix(self.held, ids), len(ids) - keep)
        self.held = self.held[:m]  # columns m.. are rewritten now (kept true if the forward fails)
        logits = yield TreeRow.causal(self.slot, ids[m:], m, keep)
        self.held = list(ids)
        return logits

    def _jit(self, n: int, prefix: Proposal | None = None) -> Program:
        """Draft n tokens after the committed prefix (DraftSession._draft_jit, one yield per forward)."""
        t0 = time.perf_counter()
        d = list(prefix.token_ids) if prefix else []
        qi, qp = (list(prefix.q_ids), list(prefix.q_probs)) if prefix else ([], [])
        if n == 0 and not d:  # nothing to draft (miss_k = 0, or the budget): answer with no forward
            self.rows = []
            self.sent = Proposal(self.round, [])
            return self.sent
        self.rows = list((yield from self._feed(self.seq + d, len(d) + 1)))
        logits = self.rows[-1]
        while len(d) < n:
            t, ids, ps, stop = self._pick(logits[None])[0]
            d.append(t), qi.append(ids), qp.append(ps)
            if stop or len(d) == n:
                break
            logits = (yield from self._feed(self.seq + d, 1))[-1]
            self.rows.append(logits)
        self.draft_s += time.perf_counter() - t0
        greedy = self.sp.greedy
        self.sent = Proposal(self.round, d, [] if greedy else qi, [] if greedy else qp,
                             cache_hit=prefix is not None, late=prefix is not None)
        return self.sent

    def _speculation(self) -> Program:
        """Glue, predict, then the branch tree one step per forward; leaves `table` for round + 1."""
        d = self.sent.token_ids
        need = len(d) + 1 - len(self.rows)
        if need > 0:  # 1. glue: the rows of step_probs not computed while drafting (all k+1 after a hit)
            self.rows = self.rows + list((yield from self._feed(self.seq + d, need)))
        step_probs = torch.stack([self._rank(r) for r in self.rows[: len(d) + 1]])  # [k+1, V]
        keys = predict_outcomes(step_probs, d, self._fanout(len(d), self._sent_conf(step_probs)))  # 2. predict
        self.speculations += 1
        self.branches += len(keys)
        if keys:  # 3. branch
            limits = [self._budget(len(self.seq) + i + 1, 64) for i, _ in keys]
            budgets = [min(self.plan.after(i == len(d)), lim) for (i, _), lim in zip(keys, limits)]
            self.tree = tree = _Tree(self.round + 1, keys, budgets, limits, len(self.seq), len(self.held))
            while (row := tree.row(self.slot, self.max_cols)) is not None:
                logits = yield row
                tree.take(self._pick(logits))
            self.table = tree.table(self.sp.greedy)
        else:
            self.table = {}
        self.tree = self.spec = None
        self.spec_round = self.round + 1
        return None


class DraftScheduler:
    """Open sequences of one draft model, their forwards batched (see the module docstring).

    max_seqs: slots (sequences open at once); max_model_len: the longest sequence a slot holds;
    tree_columns: scratch columns per slot for speculation branches (a speculation stops growing
    its branches when they are full; the outcome then draws on the branch just-in-time).

    A sequence opened with a `cache_key` (a chat session's id) leaves its slot *parked* when it
    closes: the slot keeps the KV of what it held, and the next sequence opened with that key takes
    it and prefills only past the common prefix (`reused_tokens` counts what it was spared). Parked
    slots are free for others: when no slot is free the least recently parked one is dropped;
    `forget(key)` drops one at once (its conversation was deleted).
    """

    def __init__(self, lm: LM, max_seqs: int = defaults.DRAFT_SLOTS, max_model_len: int | None = None,
                 fanout_budget: int = defaults.FANOUT_BUDGET, tree_columns: int = 256,
                 acceptance: AcceptanceModel | None = None):
        why = native_supported(lm.model)
        if why:
            raise ValueError(f"the batched draft scheduler needs the native decoder: {why}")
        if tree_columns < 1:
            raise ValueError(f"tree_columns must be >= 1, got {tree_columns}")
        self.lm, self.fanout_budget = lm, fanout_budget
        self.max_model_len = min(max_model_len or defaults.DRAFT_MAX_LEN, lm.max_len)
        self.max_cols = self.max_model_len + tree_columns
        self.runner = NativeRunner(lm.model, SlotCache.for_model(lm.model, max_seqs, self.max_cols))
        self.acceptance = acceptance if acceptance is not None else AcceptanceModel()
        self.sessions: dict[str, SlotSession] = {}
        self.parked: OrderedDict[str, tuple[int, list[int]]] = OrderedDict()  # key -> (slot, the ids it holds)
        self.reused_tokens = 0  # prompt tokens not prefilled: a parked slot held them
        self.forwards = 0  # batched forwards run (answers and speculation)
        self.rows = 0  # rows over those forwards
        self.spec_steps = 0  # speculation forwards
        self.spec_interrupted = 0  # ... of them abandoned midway for a message (see speculate_step)

    @property
    def capacity(self) -> dict:
        return self.runner.cache.capacity()

    def open(self, seq: str, prompt_ids: list[int], cache_key: str | None = None, **kwargs) -> SlotSession:
        """A new sequence in its key's parked slot or a free one (kwargs: `DraftSession`'s).
        ValueError for bad arguments or a full cache (the message names the limit)."""
        if seq in self.sessions:
            raise ValueError(f"sequence {seq!r} is already open: Stop it first or use a new id")
        cache = self.runner.cache
        slot, held = self.parked.pop(cache_key, (None, [])) if cache_key else (None, [])
        if slot is None:
            if cache.num_free == 0 and self.parked:  # parked slots are free for others: drop the oldest
                cache.free(self.parked.popitem(last=False)[1][0])
            try:
                slot = cache.alloc()
            except CacheFull:
                raise ValueError(f"all {cache.slots} draft slots are in use (the draft worker's --max-seqs): "
                                 "stop a sequence or start the worker with more slots") from None
        try:
            sess = SlotSession(self.lm, prompt_ids, slot, self.max_model_len, self.max_cols,
                               acceptance=self.acceptance, fanout_budget=self.fanout_budget, **kwargs)
        except Exception:
            cache.free(slot)
            raise
        sess.held, sess.cache_key = held, cache_key
        self.reused_tokens += min(_common_prefix(held, sess.seq), len(sess.seq) - 1)
        self.sessions[seq] = sess
        return sess

    def close(self, seq: str) -> SlotSession | None:
        """End a sequence: its slot is parked under its cache key (replacing the key's older one), else freed."""
        sess = self.sessions.pop(seq, None)
        if sess is None:
            return None
        key = sess.cache_key
        if key and sess.held:
            old = self.parked.pop(key, None)
            if old is not None:
                self.runner.cache.free(old[0])
            self.parked[key] = (sess.slot, list(sess.held))
        else:
            self.runner.cache.free(sess.slot)
        return sess

    def forget(self, key: str) -> bool:
        """Drop a key's parked slot now (its conversation is gone); True if one was parked."""
        old = self.parked.pop(key, None)
        if old is not None:
            self.runner.cache.free(old[0])
        return old is not None

    def answer(self, jobs: dict[str, Program]) -> dict[str, Proposal | Exception]:
        """Run the programs to completion in lockstep: {seq: its proposal, or the exception it raised}.

        A sequence whose program raised is left open for the caller to close (`close`)."""
        out: dict[str, Proposal | Exception] = {}
        live: dict[str, tuple[Program, TreeRow]] = {}
        for seq, prog in jobs.items():
            self._advance(seq, prog, None, live, out)
        while live:
            self._forward(live, out)
        return out

    def step_extends(self, seq: str, round: int, accepted: int, token: int) -> bool:
        """Whether the speculation step in progress drafts on the branch that outcome (round,
        accepted, token) of `seq` would be answered from: worth finishing for it, rather than
        abandoning (a branch cut short is drawn on just-in-time, which costs more than the rest
        of a step). False for a branch already complete, for an outcome no branch predicted and
        for anything that is not being speculated."""
        s = self.sessions.get(seq)
        tree = s.tree if s is not None else None
        if tree is None or round != s.round:  # the tree in progress is always for round s.round + 1
            return False
        try:
            return tree.open[tree.keys.index((accepted, token))]
        except ValueError:
            return False

    def speculating(self) -> bool:
        """Whether any sequence has speculation left to run."""
        return any(s.spec is not None or s.wants_speculation() for s in self.sessions.values())

    def speculate_step(self, interrupt=None) -> dict[str, Exception]:
        """One forward of speculation for every sequence that has some to do; {seq: error} of the
        sequences whose speculation failed (the caller closes them).

        `interrupt` (a callable, e.g. "has a message arrived?") is asked between the forward's
        layers: when it answers True the forward is abandoned and every program stays where it
        was, waiting for the same row, so the next step runs that row again (the abandoned one
        only wrote columns no program trusts yet). A message is thus answered within one layer
        of a branch step, not one whole forward. A step that holds a glue row (a sequence whose
        branches are not predicted yet) runs whole: an outcome that arrives then still finds its
        branch keys (a late hit, drawn on just-in-time) instead of an empty table."""
        live: dict[str, tuple[Program, TreeRow]] = {}
        done: dict[str, Proposal | Exception] = {}
        t0 = time.perf_counter()
        for seq, s in self.sessions.items():
            if s.spec is None and s.wants_speculation():
                self._advance(seq, s._speculation(), None, live, done)
            elif s.spec is not None:
                live[seq] = s.spec
        if live:
            self.spec_steps += 1
            if any(self.sessions[seq].tree is None for seq in live):  # a glue row: run whole
                interrupt = None
            if not self._forward(live, done, interrupt):
                self.spec_interrupted += 1
        for seq, (prog, row) in live.items():
            self.sessions[seq].spec = (prog, row)
        dt = time.perf_counter() - t0
        for seq in live:  # the step's time, shared
            self.sessions[seq].spec_s += dt / max(len(live), 1)
        return {seq: e for seq, e in done.items() if isinstance(e, Exception)}

    # ---- internals --------------------------------------------------------------------------
    @staticmethod
    def _advance(seq, prog, logits, live, out) -> None:
        """Send logits (None: start) to a program; record the forward it waits for, or its result."""
        if not hasattr(prog, "send"):  # answered without a forward (a hit)
            out[seq] = prog
            return
        try:
            live[seq] = (prog, prog.send(logits))
        except StopIteration as stop:
            live.pop(seq, None)
            out[seq] = stop.value
        except Exception as e:  # this sequence's program failed (e.g. past max_model_len)
            live.pop(seq, None)
            out[seq] = e

    def _forward(self, live: dict[str, tuple[Program, TreeRow]], out: dict, interrupt=None) -> bool:
        """One batched forward over every live program's row, then each program's next step.
        False when `interrupt` abandoned it (live unchanged: every program waits for the same row)."""
        seqs = list(live)
        try:
            logits = self.runner.forward_rows([live[s][1] for s in seqs], interrupt)
        except Interrupted:
            return False
        except Exception as e:  # the forward itself failed: every row of it fails
            for s in seqs:
                live.pop(s)[0].close()
                out[s] = e
            return True
        self.forwards += 1
        self.rows += len(seqs)
        for s, lg in zip(seqs, logits):
            self._advance(s, live[s][0], lg, live, out)
        return True
