"""Decoding speed at batch 1: llama.cpp running gpt2lab's GGUF export (f32, f16, q8_0) beside gpt2lab itself.

GPT-2 124M with random weights (nothing downloaded), exported with `gpt2lab.gguf.export_gguf` and run by
llama.cpp through the `llama-cpp-python` package, both on the same number of threads, in one process.
A 32-token prompt, then `--new-tokens` greedy tokens; the rate counts the decoding steps after the
first token (the prompt's prefill is left out for both). Each engine is warmed up once, then timed
`--repeats` times in turn; the median is reported, with the ratio llama.cpp / gpt2lab. gpt2lab decodes
as `gpt2lab sample` does: float32, its weights packed for oneDNN where that pays
(gpt2lab.accel.pack_for_inference).

    pip install llama-cpp-python     # builds llama.cpp from source where no wheel fits (once per machine)
    python bench/gguf.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from machine import cpu_features, cpu_name  # bench/machine.py, beside this script

if TYPE_CHECKING:
    from gpt2lab.model import GPT

# This script shares the gguf package's name: with its folder off the path, `import gguf` finds the package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def decode_rate(steps) -> float:
    """Tokens per second over the steps after the first of an iterator of generated tokens."""
    times = [time.perf_counter() for _ in steps]
    return (len(times) - 1) / (times[-1] - times[0])


def gpt2lab_tokens(model: GPT, prompt: list[int], n: int):
    from gpt2lab.generate import SamplingParams, generate_tokens

    for token in generate_tokens(model, prompt, n, sampling=SamplingParams(temperature=0)):
        yield int(token[0])


def llama_tokens(llm, prompt: list[int], n: int):
    for i, token in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
        yield token
        if i + 1 == n:
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from gpt2lab.openmp import spin_briefly_before_torch

    # Both engines run OpenMP thread teams in this one process: idle threads of one must not spin on the
    # cores the other is using (docs/performance.md, "Threads on a busy machine").
    spin_briefly_before_torch()
    import llama_cpp
    import torch

    from gpt2lab.accel import pack_for_inference
    from gpt2lab.config import GPTConfig
    from gpt2lab.gguf import export_gguf
    from gpt2lab.model import GPT
    from gpt2lab.tokenizer import get_tokenizer

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    prompt = torch.randint(0, 50257, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cpu_name()}, {cpu_features()}, {threads} threads, load average {load:.2f}")
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}")
    print(f"GPT-2 124M random weights, batch 1, prompt {args.prompt_tokens} tokens, {n} new tokens, greedy")

    with tempfile.TemporaryDirectory() as tmp:
        files = {t: export_gguf(model, Path(tmp) / f"gpt2-{t}.gguf", get_tokenizer(), t) for t in args.types}
        pack_for_inference(model, 1)
        engines = {"gpt2lab f32": lambda: gpt2lab_tokens(model, prompt, n)}
        for t, path in files.items():
            # The prompt goes in one token at a time (n_ubatch=1): on some CPUs (AMX) this llama.cpp crashes on
            # q8_0 batches; the prefill is not in the rate, and decoding is one token per step anyway.
            llm = llama_cpp.Llama(
                str(path), n_ctx=1024, n_batch=1, n_ubatch=1, n_threads=threads, n_threads_batch=threads, verbose=False
            )
            engines[f"llama.cpp {t}"] = lambda llm=llm: llama_tokens(llm, prompt, n)
        tokens = {name: list(steps()) for name, steps in engines.items()}  # warm-up, and the tokens to compare
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):  # in turn, so that a change in the machine's load reaches every engine
            for name, steps in engines.items():
                rates[name].append(decode_rate(steps()))
        ours = statistics.median(rates["gpt2lab f32"])
        print(f"{'engine':<16} {'tok/s':>8} {'vs gpt2lab':>10}  same tokens as gpt2lab")
        for name, r in rates.items():
            rate = statistics.median(r)
            print(f"{name:<16} {rate:>8.1f} {rate / ours:>9.2f}x  {tokens[name] == tokens['gpt2lab f32']}")


if __name__ == "__main__":
    main()
