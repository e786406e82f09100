"""Text handling for `gpt2lab prepare`: UTF-8 decoding that counts bad bytes, and cutting documents
into pieces that tokenize exactly like the whole document."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator

# A cut between a non-space character and an ASCII space/tab/newline is safe: none of the alternatives
# of GPT-2's pre-tokenization regex (tokenizer.GPT2_PATTERN) matches a non-space followed by a space,
# none looks behind, and the only look-ahead, `\s+(?!\S)`, sits inside whitespace runs, so the pieces on
# each side are split into exactly the pre-tokens of the whole text. Python's `\S` excludes a superset of
# Unicode White_Space (it also excludes U+001C..U+001F), which keeps the test conservative.
_LAST_CUT = re.compile(r".*\S(?=[ \t\n\r])", re.S)
_FIRST_CUT = re.compile(r"\S(?=[ \t\n\r])")
# surrogateescape turns each undecodable byte into one of U+DC80..U+DCFF; valid UTF-8 never decodes
# to a lone surrogate, so every one of these marks a bad byte.
_ESCAPED = re.compile("[\udc80-\udcff]")


def safe_cut(text: str, limit: int) -> int | None:
    """The largest safe cut position p <= limit (text[:p] + text[p:] tokenize like text), else the
    smallest one after it, else None."""
    m = _LAST_CUT.match(text, 0, limit + 1)
    if m:
        return m.end()
    m = _FIRST_CUT.search(text, limit)
    return m.end() if m else None


class Utf8Decoder:
    """Incremental UTF-8 decoding; each undecodable byte becomes U+FFFD and is counted in `replaced`."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.replaced = 0

    def decode(self, data: bytes, final: bool = False) -> str:
        return self._fix(self._decoder.decode(data, final))

    def decode_whole(self, data: bytes) -> str:
        """Decode one complete byte string (a JSONL line), independent of the incremental state."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return self._fix(data.decode("utf-8", "surrogateescape"))

    def _fix(self, text: str) -> str:
        if text.isascii() or not _ESCAPED.search(text):
            return text
        text, n = _ESCAPED.subn("\ufffd", text)
        self.replaced += n
        return text


class DocumentPieces:
    """Collects one document's text and hands it out in pieces of about `max_chars`, cut safely."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self._parts: list[str] = []
        self._size = 0
        self._started = False
        self.empty_documents = 0

    def add(self, text: str) -> Iterator[tuple[str, bool]]:
        if not text:
            return
        self._parts.append(text)
        self._size += len(text)
        if self._size < self.max_chars:
            return
        buf = "".join(self._parts)
        while len(buf) >= self.max_chars:
            cut = safe_cut(buf, self.max_chars)
            if cut is None:  # no whitespace at all so far: wait for more text
                break
            yield buf[:cut], not self._started
            self._started = True
            buf = buf[cut:]
        self._parts, self._size = [buf], len(buf)

    def end(self) -> Iterator[tuple[str, bool]]:
        """Close the document: its last piece, if any; a document with no text at all is skipped."""
        buf = "".join(self._parts)
        if buf:
            yield buf, not self._started
        elif not self._started:
            self.empty_documents += 1
        self._parts, self._size, self._started = [], 0, False

    def whole(self, text: str) -> Iterator[tuple[str, bool]]:
        """One complete document (a JSONL record, a Parquet row)."""
        if len(text) < self.max_chars:
            if text:
                yield text, True
            else:
                self.empty_documents += 1
            return
        yield from self.add(text)
        yield from self.end()


def unescape(sep: str) -> str:
    r"""Interpret backslash escapes typed on a command line: '\n\n' -> two newlines."""
    return sep.encode("latin-1", "backslashreplace").decode("unicode_escape")
