"""Choosing CPU kernels by measuring them once per machine: the float32 loss kernel (loss.py) and
the layout decoding reads the weights in (packing.py).

Which is fastest depends on the CPU itself, not only on its instruction set (docs/performance.md), so the
first run of a shape times the candidates on random data (a few seconds) and writes the winner to
`cpu_kernels.json` in gpt2lab's cache ($GPT2LAB_CACHE, else ~/.cache/gpt2lab). Later runs read it, so two
runs with the same seed compute the same bits. The key names what a timing depends on: the CPU, the
kernels torch dispatches to, the ISA limits set for oneDNN and MKL, torch's version, the threads, the
shape, and the revision of the kernels. Shapes too small for the choice to matter get the default untimed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..download import cache_dir
from ..errors import GPT2LabError
from ..fileio import atomic_write_json
from ..runtime import cpu_name
from .loss import EXPONENTIALS, LAYOUTS, CpuLossKernel, linear_cross_entropy

CACHE_NAME = "cpu_kernels.json"
CHUNKS = (128, 256)
MEASURE_TOKENS = 512  # tokens per timed call: two chunks of the largest candidate
MIN_WORK = 2**30  # tokens x vocabulary x width below which the default kernel is used untimed
REVISION = 1  # of the kernels in accel/loss.py: a change to them is measured afresh
ROUNDS = 4  # more calls of each finalist: 28 calls in all, 3-5 s for GPT-2's vocabulary 128 wide
FINALISTS = 3


def _machine() -> str:
    """What a timing depends on besides the shape: the CPU, the kernels torch dispatches to and the ISA
    limits set for oneDNN and MKL, torch's version and its threads."""
    limits = ",".join(f"{v}={os.environ.get(v, '')}" for v in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"))
    return (
        f"{cpu_name()} | kernels {torch.backends.cpu.get_cpu_capability()} | {limits} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads"
    )


def machine_key(n_embd: int, vocab_size: int, tokens: int) -> str:
    return f"loss kernels r{REVISION} | {_machine()} | {tokens} tokens x {vocab_size} vocab x {n_embd} wide"


def candidates(tokens: int) -> list[CpuLossKernel]:
    """Every chunk size, exponential and layout; the default first, which wins a tie. A chunk larger
    than the tokens there are is the same kernel as one of exactly their number."""
    chunks = sorted({min(c, tokens) for c in CHUNKS}, reverse=True)
    return [CpuLossKernel(chunk=c, exp=e, layout=lay) for lay in LAYOUTS for c in chunks for e in EXPONENTIALS]


def measure(
    n_embd: int, vocab_size: int, padded_vocab: int, tokens: int, rounds: int = ROUNDS
) -> dict[CpuLossKernel, float]:
    """Fastest seconds of one forward and backward of the loss per candidate kernel, on random data of
    this shape: two calls of each (the first also warms up), then `rounds` more of the FINALISTS
    fastest, whose differences are a few percent. The candidates take turns, so that a machine's speed
    drifting affects them alike, and the fastest call counts: on a shared machine other work only
    ever adds time."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, n_embd, generator=gen).requires_grad_()
    w = (0.02 * torch.randn(padded_vocab, n_embd, generator=gen)).requires_grad_()
    targets = torch.randint(0, vocab_size, (tokens,), generator=gen)
    kernels = candidates(tokens)
    best = dict.fromkeys(kernels, float("inf"))

    def calls(which: list[CpuLossKernel], n: int) -> None:
        for _ in range(n):
            for k in which:
                t0 = time.perf_counter()
                linear_cross_entropy(h, w, targets, vocab_size, kernel=k).backward()
                best[k] = min(best[k], time.perf_counter() - t0)
                h.grad = w.grad = None

    calls(kernels, 2)
    calls(sorted(kernels, key=best.__getitem__)[:FINALISTS], rounds)
    return best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again and rewritten
    return data if isinstance(data, dict) else {}


def _remember(path: Path, key: str, entry: dict) -> None:
    """Add `entry` under `key`, keeping what other runs wrote meanwhile; a read-only cache is measured
    again next time."""
    data = _read_cache(path)
    data[key] = entry
    with contextlib.suppress(OSError):
        atomic_write_json(path, data)


def choose_cpu_loss_kernel(n_embd: int, vocab_size: int, padded_vocab: int, tokens: int) -> tuple[CpuLossKernel, str]:
    """The kernel for float32 CPU training of this shape (`tokens` per micro-batch), and how it was
    chosen, in words: read from the cache, measured now (then cached), or the default untimed."""
    tokens = min(tokens, MEASURE_TOKENS)
    if tokens * vocab_size * n_embd < MIN_WORK:
        return CpuLossKernel(), "the default (too small a shape to time)"
    path = cache_dir() / CACHE_NAME
    key = machine_key(n_embd, vocab_size, tokens)
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict):
        try:
            return CpuLossKernel.from_dict(entry), f"measured earlier on this machine ({path})"
        except GPT2LabError:  # a hand-edited or older entry: measured again
            pass
    timings = measure(n_embd, vocab_size, padded_vocab, tokens)
    best = min(timings, key=timings.get)
    _remember(path, key, {**best.to_dict(), "ms": {str(k): round(v * 1e3, 1) for k, v in timings.items()}})
    default = timings.get(CpuLossKernel(chunk=min(CpuLossKernel().chunk, tokens)), timings[best])
    return best, (
        f"measured now: {timings[best] * 1e3:.0f} ms per {tokens}-token forward and backward, against "
        f"{default * 1e3:.0f} ms for the default (every timing in {path})"
    )


# ------------------------------------------------------------------------------------------ decoding

DECODE_MIN_BYTES = 16 * 2**20  # weights below which the default layout is used untimed (tests' tiny models)
DECODE_DEFAULT = "plain"  # for those: no copy, and oneDNN's packing made a small model slower on some CPUs
DECODE_REVISION = 2  # of the layouts in accel/packing.py: a change to them is measured afresh


def decode_key(shape: str, batch_size: int) -> str:
    return f"decode r{DECODE_REVISION} | {_machine()} | {shape} | batch {batch_size}"


def decode_layout(shape: str, weight_bytes: int, batch_size: int, measure: Callable[[], dict[str, float]]) -> str:
    """The weight layout (packing.py) that decodes fastest on this machine for a model described by
    `shape` (its sizes and dtype) at `batch_size`: DECODE_DEFAULT under DECODE_MIN_BYTES of weights,
    else what the cache says, else the fastest by `measure` (seconds of a decoding step per layout),
    which is then cached."""
    if weight_bytes < DECODE_MIN_BYTES:
        return DECODE_DEFAULT
    path = cache_dir() / CACHE_NAME
    key = decode_key(shape, batch_size)
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("layout"), str):
        return entry["layout"]
    timings = measure()
    best = min(timings, key=timings.get)
    _remember(path, key, {"layout": best, "ms": {k: round(v * 1e3, 2) for k, v in timings.items()}})
    return best
