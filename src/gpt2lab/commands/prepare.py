"""Tokenize a corpus into GPT-2 token shards (llm.c's .bin format) with a manifest.json.

SOURCE is one of:
  a file, directory or glob   .jsonl / .parquet: one document per record (--text-field); any other
                              file is text, one file = one document (.py, .c, .md, ...); in a
                              directory or glob, files that are not UTF-8 text are skipped and
                              counted; --ext py,c keeps only those suffixes
  hf:NAME                     a Hugging Face dataset, streamed (needs: pip install 'gpt2lab[data]')
  a preset                    tinyshakespeare, fineweb-edu-10B, openwebtext

Chat data: JSONL / Parquet / hf: records with a "messages" list of {"role", "content"} (OpenAI's format,
SmolTalk's) are conversations (found by the field, or --format chat). Each is rendered with the chat
template into tokens plus a loss mask file beside each shard (1 on the assistant's replies); records
without an assistant reply, with an unknown role or no messages are skipped and counted.

Every document is preceded by <|endoftext|>. The first --val-tokens tokens are the val split, the rest
train. Re-running the same command after an interruption finishes the job, skipping finished shards;
a Hugging Face dataset resumes from its recorded stream position (at most one source shard is read
again).

Examples:
  gpt2lab prepare tinyshakespeare --out data/shakespeare
  gpt2lab prepare ~/corpus --out data/corpus --shard-tokens 10M
  gpt2lab prepare 'books/**/*.jsonl' --text-field body --out data/books
  gpt2lab prepare ~/src/cpython --ext py,c,h --out data/cpython
  gpt2lab prepare fineweb-edu-10B --out data/edu_fineweb10B
  gpt2lab prepare hf:HuggingFaceFW/fineweb-edu --hf-config sample-10BT --out data/edu_fineweb10B
  gpt2lab prepare hf:HuggingFaceTB/smol-smoltalk --out data/smoltalk
"""

from __future__ import annotations

import argparse
import sys

from ..data.conversations import FORMATS
from ..data.prepare import DEFAULT_SHARD_TOKENS, PrepareOptions, default_workers, prepare
from ..data.sources import CORPUS_PRESETS
from ..data.text import unescape
from .args import add_ext_argument, parse_count, report_skipped


def _val_tokens(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else parse_count(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = "presets:\n" + "\n".join(f"  {name:<18}{preset.description}" for name, preset in CORPUS_PRESETS.items())
    p.add_argument("source", metavar="SOURCE", help="file, directory, glob, hf:NAME, or preset")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the shards and manifest.json")
    p.add_argument(
        "--text-field", metavar="FIELD", help="JSONL / Parquet / Hugging Face field holding the text (default: text)"
    )
    p.add_argument(
        "--split-on",
        metavar="SEP",
        help=r"split text files into documents at SEP, e.g. '\n\n' (default: one file = one document)",
    )
    p.add_argument(
        "--format",
        dest="data_format",
        choices=FORMATS,
        default="auto",
        help="text documents, or chat conversations ('messages' records); auto: chat when the records have "
        "a 'messages' field and no --text-field is given (default: auto)",
    )
    add_ext_argument(p)
    p.add_argument("--hf-config", metavar="NAME", help="Hugging Face dataset configuration, e.g. sample-10BT")
    p.add_argument("--split", dest="hf_split", metavar="NAME", help="Hugging Face dataset split (default: train)")
    p.add_argument("--name", metavar="PREFIX", help="shard file prefix (default: from the source)")
    p.add_argument(
        "--shard-tokens",
        type=parse_count,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help="tokens per shard; K/M/B suffixes allowed (default: 100M)",
    )
    p.add_argument(
        "--val-tokens",
        type=_val_tokens,
        default=None,
        metavar="N",
        help="tokens at the start of the stream for the val split (default: auto = min(one shard, 10%%))",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help=f"tokenizer processes (default: CPU count, here {default_workers()})"
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="a tokenizer made by 'gpt2lab tokenizer train' (default: GPT-2's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace another corpus's shards in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    options = PrepareOptions(
        source=args.source,
        out=args.out,
        text_field=args.text_field,
        split_on=unescape(args.split_on) if args.split_on is not None else None,
        hf_config=args.hf_config,
        hf_split=args.hf_split,
        name=args.name,
        shard_tokens=args.shard_tokens,
        val_tokens=args.val_tokens,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tokenizer=args.tokenizer,
        ext=args.ext,
        data_format=args.data_format,
    )
    result = prepare(options)
    m = result.manifest
    train, val = m["splits"]["train"], m["splits"]["val"]
    split_line = (
        f"train {train['tokens']:,} tokens in {train['shards']} shard(s), val {val['tokens']:,} in {val['shards']}"
    )
    if result.up_to_date:
        print(f"{result.out} is already prepared ({split_line}); nothing to do")
        return 0
    rate = result.tokenized / result.seconds if result.seconds > 0 else 0.0
    what = "chat conversation(s)" if m.get("chat_template") else "document(s)"
    print(
        f"prepared {m['total_tokens']:,} tokens from {m['documents']:,} {what} into {result.out}: {split_line} "
        f"[{result.seconds:.1f}s, {rate:,.0f} tokens/s]"
    )
    if m.get("chat_template"):
        print(f"loss on {m['learned_tokens']:,} assistant token(s) (a mask file beside each shard)")
        if m["skipped_conversations"]:
            examples = "; ".join(m["example_skipped_conversations"])
            print(f"note: skipped {m['skipped_conversations']:,} bad record(s), first: {examples}", file=sys.stderr)
    if result.resumed_chunks:
        print(f"resumed an interrupted run: {result.resumed_chunks} shard(s) were already complete")
    if m["replaced_bytes"]:
        print(
            f"warning: {m['replaced_bytes']:,} undecodable byte(s) in {m['files_with_replacements']} file(s) "
            f"(first: {m['example_files_with_replacements'][0]}) were replaced with U+FFFD: the input is not all UTF-8",
            file=sys.stderr,
        )
    report_skipped(m["source"])
    if m["empty_documents_skipped"]:
        print(f"note: skipped {m['empty_documents_skipped']:,} empty document(s)", file=sys.stderr)
    return 0
