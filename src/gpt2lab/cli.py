"""The `gpt2lab` command: one subcommand per module in gpt2lab.commands.

This file only wires argparse to the commands and turns user errors into one line on stderr with a
non-zero exit status; the work happens in the library.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._version import __version__
from .errors import GPT2LabError
from .openmp import spin_briefly_before_torch

# Subcommand name -> module in gpt2lab.commands that defines `add_arguments(parser)` and `run(args)`.
COMMANDS = {
    "prepare": "prepare",
    "sample": "sample",
    "chat": "chat",
    "convert": "convert",
    "tokenizer": "tokenizer",
    "eval": "eval",
    "train": "train",
    "plot": "plot",
    "serve": "serve",
}

# The commands that train or evaluate, where torch computes on the CPU's OpenMP threads for long.
OPENMP_COMMANDS = ("train", "eval", "sample", "serve", "chat")

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2lab",
        description="Reproduce OpenAI's GPT-2: prepare data, train, fine-tune, evaluate, sample, convert.",
    )
    parser.add_argument("--version", action="version", version=f"gpt2lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"gpt2lab.commands.{module_name}")
        doc = (module.__doc__ or "").strip()
        help_line = doc.splitlines()[0] if doc else None
        p = sub.add_parser(name, help=help_line, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        if hasattr(module, "run"):  # commands with actions (`tokenizer train`) set _run per action
            p.set_defaults(_run=module.run)
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in OPENMP_COMMANDS:
        spin_briefly_before_torch()
    try:
        return int(args._run(args) or 0)
    except GPT2LabError as e:
        print(f"gpt2lab {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"gpt2lab {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # a missing file, a full disk, a permission: the environment, not a bug
        print(f"gpt2lab {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
