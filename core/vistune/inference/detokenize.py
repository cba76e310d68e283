"""Turning a growing list of token ids into text deltas, honouring stop strings.

Streaming must never send text it may have to take back: a trailing partial UTF-8
character (decoded as U+FFFD) and a suffix that could be the start of a stop string
are held until the next token decides.  The text of a finished completion is exactly
the concatenation of the deltas sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalText:
    """Text of one completion, decoded as tokens arrive.

    :param decode: ``decode(token_ids) -> str`` (special tokens skipped).
    :param stop: strings that end the completion; the text ends before the first.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # what has been handed out so far
        self.stopped = False

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def update(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Decode all ``token_ids`` so far; return the new text that is safe to send.

        Sets :attr:`stopped` when a stop string appeared (the text is cut before it).
        ``final`` flushes what was held back (the completion ended for another reason).
        """
        if self.stopped:
            return ""
        full = self._decode(token_ids)
        cut = -1
        if self._stop:
            # Only the new part (plus a stop string's length of overlap) can hold a new match.
            start = max(0, len(self.text) - max(len(s) for s in self._stop))
            hits = [i for i in (full.find(s, start) for s in self._stop) if i >= 0]
            cut = min(hits) if hits else -1
        if cut >= 0:
            self.stopped = True
            safe = full[:cut]
        elif final:
            safe = full
        else:
            safe = full
            while safe.endswith(REPLACEMENT_CHAR):
                safe = safe[:-1]
            held = self._held_suffix(safe)
            if held:
                safe = safe[:-held]
        if not safe.startswith(self.text):
            # The tokenizer re-rendered earlier text (rare, e.g. space clean-up); what was sent stays sent.
            return ""
        delta = safe[len(self.text) :]
        self.text = safe
        return delta
