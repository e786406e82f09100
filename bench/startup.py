"""Start-up cost: `gpt2lab --help`, and what worker processes add to a small `gpt2lab prepare`.

Every command runs in a fresh interpreter and is timed from outside, end to end, best of --repeats.
The peers, in the same run: the bare interpreter (`python -c pass`) and `import torch` alone, and
`prepare --workers 1` for `--workers 2`. Workers are started both ways Python can: fork (Linux's
default up to Python 3.13) and spawn (macOS's default, and Linux's from 3.14), where every worker
imports what it runs from scratch.

    python bench/startup.py
    python bench/startup.py --src src /tmp/gpt2lab-old/src     # another checkout's sources, side by side
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def best_of(repeats: int, cmd: list[str], env: dict[str, str], prepare_out: Path | None = None) -> float:
    """Fastest wall time of `cmd`, in seconds; a prepare command gets a fresh --out each run."""
    times = []
    for i in range(repeats):
        args = [*cmd, "--out", str(prepare_out / str(i))] if prepare_out is not None else cmd
        tic = time.perf_counter()
        subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - tic)
    return min(times)


def prepare_cmd(start_method: str, corpus: Path, workers: int) -> list[str]:
    """`gpt2lab prepare` in a fresh interpreter, its workers started with `start_method`."""
    code = (
        "import multiprocessing, sys; multiprocessing.set_start_method(sys.argv[1]); "
        "from gpt2lab.cli import main; raise SystemExit(main(sys.argv[2:]))"
    )
    args = ["prepare", str(corpus), "--workers", str(workers), "--no-progress"]
    return [sys.executable, "-c", code, start_method, *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", nargs="+", default=[str(REPO / "src")], help="source directories to time (default: src)")
    ap.add_argument("--copies", type=int, default=2, help="Tiny Shakespeare copies in the corpus (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="best of this many runs (default 5)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from gpt2lab.data.sources import CORPUS_PRESETS, bundled_text

    text = bundled_text(CORPUS_PRESETS["tinyshakespeare"]).read_text(encoding="utf-8") * args.copies
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="gpt2lab-startup-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text, encoding="utf-8")
        print(f"prepare corpus: Tiny Shakespeare x {args.copies}, {len(text.encode()) / 2**20:.1f} MiB")
        base_env = dict(os.environ)
        bare = best_of(args.repeats, [sys.executable, "-c", "pass"], base_env)
        torch_alone = best_of(args.repeats, [sys.executable, "-c", "import torch"], base_env)
        print(f"{'python -c pass':<44} {bare:6.3f} s")
        print(f"{'python -c import torch':<44} {torch_alone:6.3f} s")
        for src in args.src:
            env = dict(base_env, PYTHONPATH=str(Path(src).resolve()))
            print(f"\n{src}:")
            for label, cmd in (
                ("gpt2lab --help", ["--help"]),
                ("gpt2lab prepare --help", ["prepare", "--help"]),
            ):
                seconds = best_of(args.repeats, [sys.executable, "-m", "gpt2lab", *cmd], env)
                print(f"  {label:<42} {seconds:6.3f} s  ({seconds / torch_alone:.2f}x import torch)")
            for method in ("fork", "spawn"):
                one, two = (
                    best_of(args.repeats, prepare_cmd(method, corpus, w), env, Path(tmp) / f"{method}-{w}-{src[-8:]}")
                    for w in (1, 2)
                )
                print(
                    f"  prepare ({method}) --workers 1 {one:6.3f} s, --workers 2 {two:6.3f} s: "
                    f"2 workers {one / two:.2f}x faster"
                )


if __name__ == "__main__":
    main()
