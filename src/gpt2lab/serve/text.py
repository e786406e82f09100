"""The text a sequence sends: stop strings held back until they cannot match, where each token's text
starts, and a token's name in `logprobs`."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from ..tokenizer import Tokenizer


class StopMatcher:
    """Holds back text that could still become a stop string, and finds the first one that completes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add text; returns (text safe to release, whether a stop string was found)."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0  # the longest tail of the pending text that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenText:
    """A sequence's text, decoded token by token as `TextStreamer` does (generate.py), and where each
    token's text starts in it.

    Offsets count characters. A character whose bytes span tokens belongs to the token holding its
    first byte: the tokens that continue it start just after it (and may hold no character at all).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.length = 0  # characters decoded so far

    def push(self, token: int) -> tuple[str, int]:
        """The text this token completes, and the offset where its own text starts."""
        carried = bool(self._decoder.getstate()[0])  # bytes of an unfinished character before this token
        piece = self._decoder.decode(self.tokenizer.decode_bytes([token]))
        start = self.length + int(carried)
        self.length += len(piece)
        return piece, start

    def flush(self) -> str:
        """Bytes left that never became a character, as U+FFFD."""
        piece = self._decoder.decode(b"", final=True)
        self.length += len(piece)
        return piece


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token's text; bytes that are not whole UTF-8 characters are written `bytes:\\xNN` as OpenAI does."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
