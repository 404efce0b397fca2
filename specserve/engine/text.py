"""Incremental detokenization with stop strings.

`TextStream` turns a growing list of generated token ids into text deltas that are safe to show:
it holds back an incomplete UTF-8 sequence (decoded as U+FFFD) and any tail that could still grow
into a stop string. When a stop string appears, it says how many tokens to keep: the shortest
prefix of the generated ids whose text contains the stop string. That rule depends only on the
token sequence, never on how the tokens were chunked into rounds, so speculative and plain
decoding stop at the same token.

`resume(ids, text)` continues a stream another process started: it takes the output ids committed
so far and the text already released for them, so a continuation's deltas join that text exactly
and a stop string that straddles the boundary is still found.

This module does not know about models or decoding loops; it knows a tokenizer's `decode`.
"""

from __future__ import annotations

__all__ = ["TextStream"]


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        stop = [s for s in stop]
        for s in stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer: load the model with its tokenizer")
        self.tok = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already returned
        self.stopped = False

    def resume(self, ids: list[int], text: str) -> None:
        """Continue from output `ids` of which `text` was already released (a resumed generation).

        ValueError when `text` is not the start of the ids' decoding (another tokenizer decoded them).
        """
        if self.ids:
            raise ValueError("resume() continues a fresh TextStream: this one has ids already")
        decoded = self._decode(list(ids))
        if not decoded.startswith(text):
            raise ValueError(f"the resumed text is not the decoding of the resumed ids ({text[-20:]!r} vs "
                             f"{decoded[len(text) - 20:len(text)]!r}): resume on a replica of the same model")
        self.ids, self.emitted = list(ids), len(text)

    def _decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return ""
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int], final: bool = False) -> tuple[str, int | None]:
        """Add generated ids; return (text delta, n_tokens_to_keep or None if no stop hit).

        With `final=True` everything still held back is released (the sequence ended).
        """
        start = len(self.ids)
        self.ids.extend(new_ids)
        text = self._decode(self.ids)
        keep = None
        hit = self._find_stop(text, self.emitted)
        if hit is not None:
            text = text[:hit]
            keep = self._shortest_prefix_with_stop(start)
            self.ids = self.ids[:keep]
            self.stopped = final = True
        end = len(text)
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":  # incomplete UTF-8 sequence
                end -= 1
            end -= self._partial_stop_len(text[:end])
        end = max(end, self.emitted)
        delta, self.emitted = text[self.emitted:end], end
        return delta, keep

    @property
    def text(self) -> str:
        return self._decode(self.ids) if not self.stopped else self._stopped_text()

    def _stopped_text(self) -> str:
        text = self._decode(self.ids)
        hit = self._find_stop(text, 0)
        return text if hit is None else text[:hit]

    def _find_stop(self, text: str, since: int) -> int | None:
        if not self.stop:
            return None
        longest = max(len(s) for s in self.stop)
        lo = max(0, since - longest)
        hits = [i for s in self.stop if (i := text.find(s, lo)) != -1]
        return min(hits) if hits else None

    def _shortest_prefix_with_stop(self, start: int) -> int:
        for m in range(start + 1, len(self.ids) + 1):
            if self._find_stop(self._decode(self.ids[:m]), 0) is not None:
                return m
        return len(self.ids)

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
