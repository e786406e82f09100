"""Text handling for `gpt2lab prepare`: UTF-8 decoding that counts bad bytes, and cutting documents into
pieces of bounded size that tokenize exactly like the whole, so that no document is ever held whole.
"""

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
# The length of a piece cut where there is no safe cut. tiktoken's BPE needs about 55 bytes per
# character of one pre-token (about 55 MB for a 1M-character run of one letter), so these pieces are
# kept short: a worker's memory stays small whatever the run's length.
HARD_PIECE_CHARS = 1 << 16


def safe_cut(text: str, limit: int, start: int = 0, end: int | None = None) -> int | None:
    """The largest safe cut position p with start < p <= start + limit (text[start:p] + text[p:] tokenize
    like text[start:]), else the smallest one after it whose following character is before `end`
    (default: the end of `text`), else None."""
    m = _LAST_CUT.match(text, start, start + limit + 1)
    if m:
        return m.end()
    m = _FIRST_CUT.search(text, start + limit, len(text) if end is None else end)
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
    """Collects one document's text and hands it out in pieces of about `max_chars` characters.

    Each piece ends at the largest safe cut (`safe_cut`) at or before `max_chars`, else the first after
    it. With none within `2 * max_chars` (or, at the document's end, none at all: a long line of one
    character, a base64 blob), it is cut after min(max_chars, HARD_PIECE_CHARS) characters, and the
    pre-token across that cut is tokenized as two. The cuts depend only on the text, not on how it
    arrives (`add` in blocks of any size, or `whole`); at most about three pieces' worth is buffered.
    """

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.hard_chars = 2 * max_chars  # no safe cut this far from the piece's start: cut at max_chars
        self._parts: list[str] = []
        self._size = 0
        self._need = max_chars + 1  # buffered characters worth looking for a cut in
        self._started = False
        self.empty_documents = 0

    def add(self, text: str) -> Iterator[tuple[str, bool]]:
        if not text:
            return
        self._parts.append(text)
        self._size += len(text)
        if self._size >= self._need:
            yield from self._cut(final=False)

    def end(self) -> Iterator[tuple[str, bool]]:
        """Close the document: its last pieces, if any; a document with no text at all is skipped."""
        yield from self._cut(final=True)
        if self._parts[0]:
            yield self._parts[0], not self._started
        elif not self._started:
            self.empty_documents += 1
        self._parts, self._size, self._need, self._started = [], 0, self.max_chars + 1, False

    def _cut(self, final: bool) -> Iterator[tuple[str, bool]]:
        """Hand out the pieces the buffered text decides; keep the rest (one string) in `_parts`."""
        buf = "".join(self._parts) if len(self._parts) != 1 else self._parts[0]
        start = 0
        self._need = self.max_chars + 1
        # A safe cut at p needs the character at p (whitespace) to be known: so max_chars + 1 characters
        # decide the largest cut <= max_chars, and hard_chars + 1 decide that there is none up to there.
        while len(buf) - start > self.max_chars:
            cut = safe_cut(buf, self.max_chars, start, start + self.hard_chars + 1)
            if cut is None:
                if not final and len(buf) - start <= self.hard_chars:
                    # A safe cut may still come: look again once the answer is certain either way (the
                    # cut found is the same whenever it is looked for).
                    self._need = self.hard_chars + 1
                    break
                cut = start + min(self.max_chars, HARD_PIECE_CHARS)
            yield buf[start:cut], not self._started
            self._started = True
            start = cut
        rest = buf[start:] if start else buf
        self._parts, self._size = [rest], len(rest)

    def whole(self, text: str) -> Iterator[tuple[str, bool]]:
        """One complete document (a JSONL record, a Parquet row, a dataset example)."""
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
