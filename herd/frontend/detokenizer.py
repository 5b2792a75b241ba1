"""Streaming detokenization: token ids in, text deltas out, with stop strings.

`IncrementalDetokenizer` decodes only a small window of recent ids per step (the prefix/read offsets of
vLLM and HF's TextStreamer), so a long output costs O(1) per token. A character split across tokens
(multi-byte UTF-8, emoji) is held back until it is complete, so no delta ends in a broken character and the
concatenated deltas equal `tokenizer.decode(all_ids)`. `StopStringMatcher` trims the output at the first
stop string, even when it spans token boundaries, holding back only text that may begin one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class StopStringMatcher:
    """Finds the first stop string in streamed text; releases text that cannot be part of one."""

    def __init__(self, stop: Iterable[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = tuple(s for s in stop if s)
        self.include = include_stop_str_in_output
        self.matched: str | None = None
        self._held = ""  # a suffix of the text so far that may be the start of a stop string

    def feed(self, text: str) -> str:
        """Text that is now safe to emit. After a match, the rest is dropped and `matched` is set."""
        if self.matched is not None or not text:
            return ""
        if not self.stop:
            return text
        buf = self._held + text
        # Every occurrence that starts in already-emitted text was ruled out earlier (we would have held
        # it back), so searching the held suffix plus the new text is enough.
        hits = [(at, -len(s), s) for s in self.stop if (at := buf.find(s)) >= 0]
        if hits:
            at, _, stop = min(hits)
            self.matched, self._held = stop, ""
            return buf[: at + len(stop)] if self.include else buf[:at]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Release held text at the end of the output (it did not become a stop string)."""
        held, self._held = self._held, ""
        return held if self.matched is None else ""

    def _partial_suffix(self, buf: str) -> int:
        # Length of the longest suffix of buf that is a proper prefix of some stop string.
        for n in range(min(len(buf), max(len(s) for s in self.stop) - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; get the new text each time.

    `add_token(id)` returns the text that became final with this token ("" while a character or a
    possible stop string is incomplete); `finish()` returns what is still held back. Once a stop string
    is found, `stopped` is True, `stop_string` names it and later calls return "".
    """

    def __init__(
        self,
        tokenizer: Decoder,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._stops = StopStringMatcher(stop, include_stop_str_in_output)
        # Text of ids[prefix:read] was emitted already; decoding from `prefix` gives the decoder context
        # (a leading space, the first bytes of a character) that decoding from `read` alone would lose.
        self._prefix = 0
        self._read = 0
        self._prefix_len = 0  # len(decode(ids[prefix:read]))
        self._sent = 0  # chars emitted beyond _prefix_len while read could not move (see _step)
        self._out: list[str] = []  # everything emitted so far

    @property
    def text(self) -> str:
        """The whole output so far (the concatenation of every delta returned)."""
        return "".join(self._out)

    @property
    def stopped(self) -> bool:
        return self._stops.matched is not None

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stops.stop)

    @property
    def stop_string(self) -> str | None:
        return self._stops.matched

    def add_token(self, token_id: int) -> str:
        return self.add_tokens((token_id,))

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        return self._emit(self._stops.feed(self._step(final=False)))

    def finish(self) -> str:
        """Everything still held back: an incomplete character (decoded as U+FFFD) and a partial stop."""
        if self.stopped:
            return ""
        out = self._stops.feed(self._step(final=True))
        return self._emit(out + self._stops.flush())

    def _emit(self, text: str) -> str:
        if text:
            self._out.append(text)
        return text

    def _step(self, final: bool) -> str:
        window = self.tokenizer.decode(self.token_ids[self._prefix :], self.skip_special_tokens)
        end = len(window)
        if window.endswith(REPLACEMENT_CHAR) and not final:
            # An unfinished UTF-8 sequence decodes to exactly one trailing U+FFFD; everything before it is
            # final, even other U+FFFD (bytes that are invalid whatever follows).
            end -= 1
        start = self._prefix_len + self._sent
        if end <= start:
            return ""
        delta = window[start:end]
        if end == len(window):
            # Clean boundary: slide the window so the next step decodes only recent ids.
            # window = text(ids[prefix:read]) + text(ids[read:]) as read sits on a character boundary.
            self._prefix, self._read = self._read, len(self.token_ids)
            self._prefix_len, self._sent = len(window) - self._prefix_len, 0
        else:
            self._sent = end - self._prefix_len
        return delta
