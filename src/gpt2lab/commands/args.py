"""Argument types and notes shared by `prepare` and `tokenizer`, which read corpora the same way."""

from __future__ import annotations

import argparse
import re
import sys

from ..data.sources import normalize_ext
from ..errors import GPT2LabError

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """'100M' -> 100_000_000; also '1.5B', '10k', '1e8', '100_000'."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmbg]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (examples: 100M, 1.5B, 250000)")
    value = float(m.group(1).replace("_", "")) * _SUFFIXES[m.group(2)]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of tokens: {text!r}")
    return int(value)


def parse_ext(text: str) -> tuple[str, ...]:
    """'py,.C, rs' -> ('c', 'py', 'rs')."""
    try:
        return normalize_ext(text.split(","))
    except GPT2LabError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--ext: ")) from None


def add_ext_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ext",
        type=parse_ext,
        metavar="SUFFIXES",
        help="in a directory or glob, read only files with these suffixes, e.g. py,c,rs (default: every file "
        "that is text)",
    )


def report_skipped(source: dict) -> None:
    """The note for files of a directory or glob that were skipped as not UTF-8 text."""
    n = source.get("skipped_files", 0)
    if n:
        names = ", ".join(source["example_skipped_files"][:3]) + (", ..." if n > 3 else "")
        print(f"note: skipped {n:,} file(s) that are not UTF-8 text: {names}", file=sys.stderr)
