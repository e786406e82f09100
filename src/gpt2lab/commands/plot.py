"""Plot the train / val loss (and evaluation curves) of one or more runs into a PNG.

Examples:
  gpt2lab plot runs/shakespeare                       # writes runs/shakespeare/loss.png
  gpt2lab plot runs/a runs/b --out compare.png        # two runs on the same axes
  gpt2lab plot runs/a runs/b --x tokens --out compare.png
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", metavar="PNG", help="image to write (default: RUN_DIR/loss.png, or compare.png)")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis (default: step)")


def run(args: argparse.Namespace) -> int:
    from ..metrics import plot_runs

    out = args.out or (Path(args.runs[0]) / "loss.png" if len(args.runs) == 1 else Path("compare.png"))
    path = plot_runs(args.runs, out, x=args.x)
    print(f"wrote {path}")
    return 0
