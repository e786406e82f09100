"""Train a byte-level BPE tokenizer on a corpus, or compare tokenizers on one.

GPT-2's tokenizer spends many more tokens on Chinese, Japanese or code than on English (measured in
docs/performance.md, "Tokenizers"); a tokenizer trained on your corpus gives a small model more text
per context and per FLOP. `prepare --tokenizer DIR` then uses it, and everything downstream follows.

CORPUS is read as `gpt2lab prepare` reads SOURCE: in a directory or glob, every file that is UTF-8
text is one document (.py, .c, .rs, .md, ...), other files are skipped and counted; --ext keeps only
some suffixes; .jsonl / .parquet files give one document per record.

Examples:
  gpt2lab tokenizer train corpus/ --vocab-size 32768 --out tokenizers/mine
  gpt2lab tokenizer train 'src/**/*.py' --vocab-size 8192 --out tokenizers/python
  gpt2lab tokenizer train hf:HuggingFaceFW/fineweb-edu --hf-config sample-10BT --max-chars 1G --out tok/
  gpt2lab tokenizer stats corpus/ --tokenizer tokenizers/mine
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import GPT2LabError
from ..fileio import atomic_write_text
from ..tokenizer import get_tokenizer
from ..tokenizer_train import PATTERNS, corpus_stats, describe, json_dump, save_trained, train_bpe
from .args import add_ext_argument, parse_count, report_skipped

if TYPE_CHECKING:
    from ..data.sources import Source


def _source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", metavar="CORPUS", help="file, directory, glob, hf:NAME, or preset (as for prepare)")
    p.add_argument("--text-field", metavar="FIELD", help="JSONL / Parquet / HF field holding the text (default: text)")
    p.add_argument("--split-on", metavar="SEP", help=r"split text files into documents at SEP, e.g. '\n\n'")
    add_ext_argument(p)
    p.add_argument("--hf-config", metavar="NAME", help="Hugging Face dataset configuration")
    p.add_argument("--split", dest="hf_split", metavar="NAME", help="Hugging Face dataset split (default: train)")
    p.add_argument("--max-chars", type=parse_count, metavar="N", help="read at most N characters (K/M/G suffixes)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _source_arguments(t)
    t.add_argument(
        "--vocab-size",
        type=parse_count,
        required=True,
        metavar="N",
        help="tokens in all, <|endoftext|> included (e.g. 32768)",
    )
    t.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer to")
    t.add_argument(
        "--pattern",
        choices=sorted(PATTERNS),
        default="gpt2",
        help="pre-tokenisation regex: GPT-2's (default) or GPT-4's (cl100k)",
    )
    t.add_argument("--name", help="the tokenizer's name (default: bpe<N>-<hash>)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    t.set_defaults(_run=run_train)
    s = sub.add_parser(
        "stats",
        help="tokens per byte and vocabulary use, GPT-2's vs another tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _source_arguments(s)
    s.add_argument(
        "--tokenizer",
        metavar="DIR",
        action="append",
        default=[],
        help="a trained tokenizer to compare with GPT-2's (repeatable)",
    )
    s.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    s.set_defaults(_run=run_stats)


def _open_source(args: argparse.Namespace) -> Source:
    """The corpus, opened (its files listed and sniffed) before anything is trained or printed."""
    from ..data.sources import resolve_source
    from ..data.text import unescape

    source = resolve_source(
        args.corpus,
        text_field=args.text_field,
        split_on=unescape(args.split_on) if args.split_on is not None else None,
        hf_config=args.hf_config,
        hf_split=args.hf_split,
        ext=args.ext,
    )
    source.open()
    return source


def _texts(source: Source, args: argparse.Namespace) -> Iterator[str]:
    seen = 0
    for text, *_ in source.pieces():
        if args.max_chars is not None and seen + len(text) > args.max_chars:
            text = text[: args.max_chars - seen]
        seen += len(text)
        yield text
        if args.max_chars is not None and seen >= args.max_chars:
            return


def run_train(args: argparse.Namespace) -> int:
    source = _open_source(args)
    trained = train_bpe(_texts(source, args), args.vocab_size, pattern=args.pattern, progress=sys.stderr.isatty())
    read = source.describe()
    about = {"corpus": args.corpus, "pattern": args.pattern}
    about.update({k: read[k] for k in ("ext", "skipped_files", "example_skipped_files") if k in read})
    tok = save_trained(trained, args.out, name=args.name, overwrite=args.overwrite, source=about)
    print(
        f"trained {tok.name}: {tok.n_vocab:,} tokens (<|endoftext|> = {tok.eot_token}) from "
        f"{trained.chars:,} characters in {trained.documents:,} piece(s); wrote {args.out}"
    )
    report_skipped(read)
    print(f"use it with: gpt2lab prepare CORPUS --tokenizer {args.out} --out DATA_DIR")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    tokenizers = [get_tokenizer()] + [get_tokenizer(path) for path in args.tokenizer]
    if args.max_chars is not None and args.max_chars < 1:
        raise GPT2LabError("--max-chars must be at least 1")
    source = _open_source(args)
    stats = corpus_stats(_texts(source, args), tokenizers)
    print(f"{args.corpus}: {stats[0].bytes:,} bytes, {stats[0].chars:,} characters")
    print(describe(stats))
    report_skipped(source.describe())
    if args.json:
        atomic_write_text(args.json, json_dump(stats) + "\n")
    return 0
