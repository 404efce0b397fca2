"""scripts/outcome_ranks.py: where a trace's outcomes land, and the draft's logits it ranks them in."""

import importlib.util
from pathlib import Path

import pytest
import torch

from specserve.engine.single import generate
from specserve.engine.speculative import SpecConfig

SCRIPT = Path(__file__).parents[1] / "scripts" / "outcome_ranks.py"
_spec = importlib.util.spec_from_file_location("outcome_ranks", SCRIPT)
outcome_ranks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(outcome_ranks)


def test_outcome_positions_follow_the_committed_tokens():
    # round 0: 3 drafts, all accepted, bonus at index 3; round 1: 4 drafts, 1 accepted, recovered at
    # index 5; round 2: no drafts (a k = 0 round): its token is a bonus at 6; round 3: 2 drafts, 0
    # accepted, recovered at 7; round 4 would land at 8 + 2 = 10, past the 10 tokens committed.
    got = outcome_ranks.outcome_positions([3, 4, 0, 2, 2], [3, 1, 0, 0, 2], 10)
    assert got == [(3, "bonus", 0), (5, "recovered", 1), (6, "bonus", 2), (7, "recovered", 3)]
    assert outcome_ranks.outcome_positions([3, 4, 0, 2, 2], [3, 1, 0, 0, 2], 11)[-1] == (10, "bonus", 4)


@pytest.mark.parametrize("drafted, accepted, msg", [([2, 2], [2], "differ in length"),
                                                    ([2], [3], "not within 0..drafted 2")])
def test_outcome_positions_refuse_a_broken_trace(drafted, accepted, msg):
    with pytest.raises(ValueError, match=msg):
        outcome_ranks.outcome_positions(drafted, accepted, 10)


def test_draft_logits_rank_each_token_at_its_own_position(tiny):
    lm = tiny["target"]
    prompt = [5, 17, 42, 8]
    ar = SpecConfig(mode="ar")
    out = [t for c in generate(lm, None, prompt, 12, spec=ar) for t in c.token_ids]  # greedy: each is the argmax
    rows = outcome_ranks.draft_logits(lm, prompt, out)
    assert len(rows) == len(out)
    assert [outcome_ranks.rank_of(row, t) for row, t in zip(rows, out)] == [0] * len(out)
    second = [int(torch.topk(row, 2).indices[1]) for row in rows]
    assert [outcome_ranks.rank_of(row, t) for row, t in zip(rows, second)] == [1] * len(out)


def test_rank_of_counts_ties_in_the_tokens_favour():
    assert outcome_ranks.rank_of(torch.tensor([1.0, 3.0, 3.0, 0.5]), 2) == 0
    assert outcome_ranks.rank_of(torch.tensor([1.0, 3.0, 3.0, 0.5]), 3) == 3
