"""Incremental detokenisation with stop strings, shared by ``generate`` and the server.

Text is re-decoded from the ids so multi-token characters come out whole; a tail that could still
grow into a stop string (or is a partial UTF-8 character) is held back until it cannot.
"""

from __future__ import annotations

from typing import Any, Sequence


def find_stop(text: str, stop: Sequence[str], after: int = 0) -> int:
    """Index of the earliest stop string in ``text`` that ends past character ``after``, or -1.

    ``after`` > 0 is the text of the first ``min_tokens`` tokens: as in vLLM, a stop string only
    counts once it is completed by a later token."""
    hits = [i for i in (text.find(s, max(0, after - len(s) + 1)) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


def stop_search_start(tokenizer: Any, ids: Sequence[int], min_tokens: int) -> int:
    """The ``after`` of ``find_stop`` for an answer whose first ``min_tokens`` tokens ignore stops."""
    return len(decode(tokenizer, list(ids)[:min_tokens])) if min_tokens else 0


class TextStream:
    """Feed token ids one at a time; get back the text that is safe to show."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.min_tokens = min_tokens
        self.after = 0  # stop strings must end past this character (see ``find_stop``)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def text(self) -> str:
        return decode(self.tokenizer, self.ids)

    def push(self, token_id: int) -> str:
        """Add one id; returns the new visible text (sets ``stopped`` on a stop string)."""
        self.ids.append(int(token_id))
        text = self.text()
        if len(self.ids) <= self.min_tokens:
            self.after = len(text)
        cut = find_stop(text, self.stop, self.after)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut].rstrip())
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        # Whitespace waits for a word after it: an answer is stripped, so it may never be shown.
        return self._emit(text[: max(end, self.sent)].rstrip())

    def finish(self) -> str:
        """The held-back tail once generation is over."""
        if self.stopped:
            return ""
        return self._emit(self.text())

    def _emit(self, visible: str) -> str:
        if len(visible) <= self.sent:
            return ""
        delta = visible[self.sent :]
        self.sent = len(visible)
        return delta


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Answer text as ALLaVA's inference code returns it: special tokens skipped, then stripped.

    Streaming stays consistent: each stripped prefix is a prefix of every later stripped text
    (trailing whitespace is only held back until the next word arrives)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def final_text(tokenizer: Any, ids: Sequence[int], stop: Sequence[str], min_tokens: int = 0) -> tuple[str, bool]:
    """(text cut at the first stop string and stripped, whether a stop string was found)."""
    text = decode(tokenizer, ids)
    cut = find_stop(text, stop, stop_search_start(tokenizer, ids, min_tokens))
    return (text[:cut].rstrip(), True) if cut >= 0 else (text, False)
