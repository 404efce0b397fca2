"""A generation continued from its committed output (resume_ids): the engine's side of surviving a
target replica's failure. The router's side is added below in a later change.
"""

from __future__ import annotations

import pytest

from specserve.engine.engine import Engine, run_to_completion
from specserve.engine.sequence import Request, SpeculationParams
from specserve.engine.speculative import SpecConfig, generate
from specserve.engine.text import TextStream

from test_serving_core import ar_ids


def _decode(lm, ids):
    return lm.tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------- the engine's continuation


def _straddling_stop(lm, ids, lo: int = 10):
    """(cut, stop): a 4-character stop string from 2 characters before token `cut` ends to 2 after,
    found nowhere earlier in the text (None when the output has no clean boundary)."""
    text = _decode(lm, ids)
    for cut in range(lo, len(ids) - lo):
        at = len(_decode(lm, ids[:cut]))
        stop = text[at - 2:at + 2]
        if len(stop) == 4 and "\ufffd" not in stop and text.find(stop) == at - 2:
            return cut, stop
    pytest.skip("no clean boundary in this output")


def test_a_resumed_text_stream_joins_the_released_text_and_finds_a_straddling_stop(tiny):
    lm = tiny["target"]
    ids = ar_ids(tiny, "The quick brown fox", 80)
    whole = _decode(lm, ids)
    cut = len(ids) // 2
    released, _ = TextStream(lm.tokenizer).push(ids[:cut])
    rest = TextStream(lm.tokenizer)
    rest.resume(ids[:cut], released)
    assert released + rest.push(ids[cut:], final=True)[0] == whole
    cut, stop = _straddling_stop(lm, ids)
    released, _ = TextStream(lm.tokenizer, [stop]).push(ids[:cut])
    assert whole.startswith(released) and not released.endswith(stop[:2])  # the stop's start was held back
    rest = TextStream(lm.tokenizer, [stop])
    rest.resume(ids[:cut], released)
    delta, keep = rest.push(ids[cut:], final=True)
    plain = TextStream(lm.tokenizer, [stop])
    assert (released + delta, keep) == plain.push(ids, final=True) and keep is not None
    with pytest.raises(ValueError, match="same model"):
        TextStream(lm.tokenizer).resume(ids[:cut], "not this text")


@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_generate_and_the_engine_resumed_anywhere_equal_the_undisturbed_run(tiny, mode):
    lm = tiny["target"]
    draft = tiny["draft-random"] if mode == "sd" else None
    prompt = lm.encode("The quick brown fox")
    spec = SpecConfig(mode=mode)
    whole = list(generate(lm, draft, prompt, 40, spec=spec))
    ids = [t for c in whole for t in c.token_ids]
    text = "".join(c.text for c in whole)
    for n in (1, 7, 23, 39):
        released = TextStream(lm.tokenizer).push(ids[:n])[0]  # what a client had been sent
        rest = list(generate(lm, draft, prompt, 40, spec=spec, resume_ids=ids[:n], resume_text=released))
        assert ids[:n] + [t for c in rest for t in c.token_ids] == ids, n
        assert released + "".join(c.text for c in rest) == text
        eng = Engine(lm, tiny["draft-random"], max_num_seqs=2, max_model_len=128, probe=False)
        [(out, chunks, seq)] = run_to_completion(eng, [Request(prompt, 40, spec=SpeculationParams(mode),
                                                               resume_ids=ids[:n], resume_text=released)]).values()
        assert ids[:n] + out == ids and chunks[-1].finish_reason == "length"
        assert released + "".join(c.text for c in chunks) == text
        assert (seq.stats.new_tokens, seq.stats.prompt_tokens) == (40, len(prompt))
    with pytest.raises(ValueError, match="whole budget"):
        next(generate(lm, None, prompt, 4, spec=SpecConfig(mode="ar"), resume_ids=ids[:4]))
