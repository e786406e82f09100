"""JSON Lines, read one line at a time, every problem reported as `file:line`.

Used for corpora (`gpt2lab prepare`, one document per record) and for HellaSwag's items.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from .errors import GPT2LabError


class JsonLine(NamedTuple):
    where: str  # "file:line", for messages
    size: int  # bytes of the line as read, newline included
    record: Any  # the parsed JSON value; None on a blank line
    blank: bool  # the line holds only whitespace


def read_jsonl(
    lines: Iterable[bytes],
    name: str | os.PathLike,
    expect: str,
    decode: Callable[[bytes], str] | None = None,
) -> Iterator[JsonLine]:
    """Every line of `lines` (a file opened in binary mode), parsed; blank lines come as `blank`.

    `expect` says what a line should hold ("one JSON object"), for the error messages. `decode` turns
    a line's bytes into text; by default a line that is not UTF-8 is an error.
    """
    for lineno, raw in enumerate(lines, 1):
        where = f"{name}:{lineno}"
        if decode is not None:
            line = decode(raw)
        else:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GPT2LabError(f"{where}: not UTF-8 text (byte {e.start}); each line must be {expect}") from None
        if not line.strip():
            yield JsonLine(where, len(raw), None, True)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GPT2LabError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be {expect}"
            ) from None
        yield JsonLine(where, len(raw), record, False)
