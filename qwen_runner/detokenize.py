"""Streaming text out of a token stream: whole characters only, stop strings held back.

Qwen's byte-level BPE can split one UTF-8 character (CJK, emoji) across tokens; decoding
such a partial sequence yields U+FFFD. We keep the tokens of an incomplete character
pending until they decode cleanly, then emit. Byte-level decoding is concatenative at
clean boundaries, so each segment is decoded on its own (no O(n^2) re-decoding).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
# A character is at most 4 UTF-8 bytes; a token adds at least one byte. Past this many pending
# tokens the U+FFFD is real (the model produced invalid bytes) and is emitted as is.
MAX_PENDING_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []
        self.text = ""  # everything emitted so far

    def add(self, token: int) -> str:
        """Feed one token; return the new complete text (possibly empty)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith(REPLACEMENT) and len(self.pending) < MAX_PENDING_TOKENS:
            return ""
        self.pending = []
        self.text += text
        return text

    def flush(self) -> str:
        """Whatever is pending at the end of generation, even if incomplete."""
        if not self.pending:
            return ""
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        self.pending = []
        self.text += text
        return text


class StopStringMatcher:
    """Finds user stop strings in streamed text without ever emitting part of one.

    Text that could be the beginning of a stop string is held back until the next chunk
    decides it; on a match, only the text before the stop string is released.
    """

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self.held + text
        if not self.stops:
            self.held = ""
            return buffer
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return buffer[:cut]
        keep = self._longest_partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held

    def _longest_partial_suffix(self, buffer: str) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
