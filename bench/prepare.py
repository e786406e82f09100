"""Benchmark `gpt2lab prepare` against plain single-process tiktoken on the same text.

The corpus is Tiny Shakespeare repeated --copies times in one text file. The peer is
`encoding.encode_ordinary(text)` on the whole text already in memory, in this process: no reading,
no EOT, no writing. `prepare` is timed end to end (read, decode, tokenize on N workers, write shards
with fsync, manifest), best of --repeats runs each. Peak RSS is measured first, for a `gpt2lab
prepare` child process on the same corpus (the largest of the process and its workers), while this
process is still small: Linux counts the parent's memory at fork into a child's peak.

    python bench/prepare.py                       # Tiny Shakespeare, as bundled with gpt2lab
    python bench/prepare.py --copies 64 --workers 1 2 4
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
sys.path.insert(0, str(REPO / "src"))


def shakespeare() -> Path:
    from gpt2lab.data.sources import CORPUS_PRESETS, bundled_text

    return bundled_text(CORPUS_PRESETS["tinyshakespeare"])


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def child_peak_rss_mib(corpus: Path, out: Path, workers: int) -> float:
    """Peak RSS of a `gpt2lab prepare` child process and its workers (the largest one), in MiB."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "gpt2lab", "prepare", str(corpus), "--out", str(out), "--workers", str(workers)]
    proc = subprocess.Popen([*cmd, "--no-progress"], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=32, help="Tiny Shakespeare copies in the corpus (default 32)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    ap.add_argument("--shard-tokens", type=int, default=10_000_000)
    args = ap.parse_args()

    text = shakespeare().read_text(encoding="utf-8") * args.copies
    with tempfile.TemporaryDirectory(prefix="gpt2lab-bench-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text, encoding="utf-8")
        mib = len(text.encode()) / 2**20
        del text
        rss = child_peak_rss_mib(corpus, Path(tmp) / "rss", max(args.workers))

        from gpt2lab.data.prepare import PrepareOptions, prepare
        from gpt2lab.tokenizer import get_tokenizer

        tok = get_tokenizer()
        text = corpus.read_text(encoding="utf-8")
        n_tokens = len(tok.encoding.encode_ordinary(text)) + 1  # warm-up, and the count prepare will make
        print(f"corpus: Tiny Shakespeare x {args.copies} = {mib:.1f} MiB, {n_tokens:,} tokens")
        cpu = platform.processor() or platform.machine()
        print(f"machine: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}")

        plain = best_of(args.repeats, lambda: tok.encoding.encode_ordinary(text))
        plain_rate = n_tokens / plain
        print(f"{'tiktoken encode_ordinary, 1 process':<40} {plain:7.3f} s {plain_rate / 1e6:7.2f} M tokens/s   1.00x")

        for workers in args.workers:
            run = 0

            def once(workers=workers) -> None:
                nonlocal run
                run += 1
                out = Path(tmp) / f"out-{workers}-{run}"
                result = prepare(
                    PrepareOptions(str(corpus), out, workers=workers, shard_tokens=args.shard_tokens, progress=False),
                    tok,
                )
                assert result.manifest["total_tokens"] == n_tokens

            seconds = best_of(args.repeats, once)
            rate = n_tokens / seconds
            label = f"gpt2lab prepare, {workers} worker{'s' if workers > 1 else ''}"
            print(f"{label:<40} {seconds:7.3f} s {rate / 1e6:7.2f} M tokens/s {rate / plain_rate:6.2f}x")

        print(f"peak RSS of 'gpt2lab prepare --workers {max(args.workers)}' (largest process): {rss:.0f} MiB")


if __name__ == "__main__":
    main()
