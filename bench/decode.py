"""Decoding at the memory limit: gpt2lab in each inference mode beside transformers and llama.cpp, one run.

GPT-2 124M with random weights (nothing downloaded), a 32-token prompt, then `--new-tokens` greedy tokens
at batch `--batch`. Engines, all on the same threads in one process:

- gpt2lab plain: the model as model.py writes it (what GPT2LAB_ACCEL=0 runs), float32;
- gpt2lab float32 / bfloat16 / int8 (and float16 with `--modes`): `generate_tokens` after
  `gpt2lab.accel` prepared the model (the weight layout measured fastest on this machine; int8 weights);
- transformers float32: `GPT2LMHeadModel.generate` on the same weights;
- llama.cpp f32 / f16 / q8_0 (batch 1 only): llama-cpp-python on GGUF files this script writes with
  gpt2lab's own export (`gpt2lab.gguf.export_gguf`).

The rate counts the decoding steps after the first token (the prompt's prefill is left out), times the
batch for tokens/s. Each
engine is warmed up once, then timed `--repeats` times in turn, so that a change in the machine's load
reaches every engine alike; the best run counts, since other work only ever adds time. The torch
engines and llama.cpp run in two worker processes, one at a time, each with its own OpenMP runtime (in
one process, the idle threads of one runtime would spin on the cores the other is using), both with
the short spin `gpt2lab sample` sets (GOMP_SPINCOUNT=10000, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT
is set). The weight layouts are measured afresh in a temporary cache (`--cached`: take the ones
gpt2lab's cache holds, as later runs of `gpt2lab sample` do).

Printed beside each rate: the bytes each decoding step reads (every weight once), the ratio to
llama.cpp at the same bytes per weight, and the fraction of the bandwidth limit, the machine's read
bandwidth (measured here: the fastest of a `sum` and three matrix-vector products over as many bytes
as the float32 weights) over the bytes per step. Also printed: the CPU, its features, and for how many steps
each engine's greedy tokens are the plain model's (all of them in float32; quantized weights part from
them sooner or later).

    python bench/decode.py                         # batch 1, every engine (2-4 minutes on 2 cores)
    python bench/decode.py --batch 8               # gpt2lab and transformers at batch 8
    python bench/decode.py --quality RUN_OR_CHECKPOINT --text held_out.txt
                                                   # bf16/float16/int8 against float32 on a trained model

`--quality` prints, for each mode against float32 on the text's first `--quality-tokens` tokens: the
largest logit difference, the top-1 agreement and the perplexity of both.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # also in the worker processes, which start with this one's path
from machine import cpu_features, cpu_name  # noqa: E402 - bench/machine.py, beside this script

# This script's folder holds gguf.py (a benchmark): off the path, `import gguf` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

MODES = ("float32", "bfloat16", "float16", "int8")
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "f32": 4.0, "f16": 2.0,
                    "q8_0": 34 / 32}  # fmt: skip
PEER = {"float32": "f32", "bfloat16": "f16", "float16": "f16", "int8": "q8_0"}  # llama.cpp at the same bytes


def best_seconds(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(nbytes: int, rounds: int = 4) -> dict[str, float]:
    """Bytes per second of reading `nbytes` of float32 with torch's kernels on this machine's threads:
    a `sum`, and the three ways a product with a 768-vector can read the same bytes as a matrix (the
    fastest of `rounds` calls each; which is fastest depends on the CPU and the ISA torch may use)."""
    import torch

    m = torch.randn(nbytes // 4 // 768, 768)  # (R, 768)
    v, u, x, w = torch.randn(768), torch.randn(m.size(0)), torch.randn(1, 768), m.view(768, -1)
    ways = {
        "sum": m.sum,
        "matrix x vector": lambda: m @ v,  # (R,): a dot product per row
        "vector x matrix": lambda: u @ m,  # (768,)
        "row x (768, R)": lambda: x @ w,  # (1, R): as the transposed layout reads
    }
    with torch.inference_mode():
        return {name: m.numel() * 4 / best_seconds(fn, rounds) for name, fn in ways.items()}


def decode_rate(steps: Iterator[int]) -> tuple[float, list[int]]:
    """Tokens per second over the steps after the first, and the tokens (of the first row)."""
    tokens, times = [], []
    for t in steps:
        times.append(time.perf_counter())
        tokens.append(t)
    return (len(times) - 1) / (times[-1] - times[0]), tokens


def gpt2lab_steps(model, prompt: list[int], n: int, batch: int) -> Iterator[int]:
    from gpt2lab.generate import SamplingParams, generate_tokens

    for token in generate_tokens(model, prompt, n, sampling=SamplingParams(temperature=0), num_samples=batch):
        yield int(token[0])


def hf_steps(hf, prompt: list[int], n: int, batch: int) -> Iterator[int]:
    """transformers' generate, each new token taken as its streamer receives it (greedy, no stop)."""
    import queue
    import threading

    import torch
    from transformers.generation.streamers import BaseStreamer

    got: queue.Queue = queue.Queue()

    class Streamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:
                got.put(int(value.reshape(-1)[0]))
            self.prompt_seen = True

        def end(self) -> None:
            got.put(None)

    def run() -> None:
        with torch.inference_mode():
            ids = torch.tensor([prompt] * batch)
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                        min_new_tokens=n, pad_token_id=50256, streamer=Streamer())  # fmt: skip

    thread = threading.Thread(target=run)
    thread.start()
    while (t := got.get()) is not None:
        yield t
    thread.join()


def llama_steps(llm, prompt: list[int], n: int) -> Iterator[int]:
    for i, token in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
        yield token
        if i + 1 == n:
            return


def gpt2lab_engines(model, modes: list[str], prompt: list[int], n: int, batch: int) -> dict[str, Callable]:
    """The plain model and one prepared copy per mode, each a function that returns its steps."""
    import copy

    import torch

    from gpt2lab import accel
    from gpt2lab.model import GPT

    plain = GPT.from_state_dict(model.config, model.state_dict())  # the same tensors, never prepared
    accel.pack_for_inference(plain, batch, layout="plain")  # kept plain by generate's own call too
    engines = {"gpt2lab plain float32": lambda: gpt2lab_steps(plain, prompt, n, batch)}
    for mode in modes:
        if mode == "float32":
            ours = model
        elif mode == "int8":
            ours = accel.quantize_int8(copy.deepcopy(model))
        else:
            ours = copy.deepcopy(model).to(getattr(torch, mode))
        t0 = time.perf_counter()
        layout = accel.pack_for_inference(ours, batch)  # measured once per machine, then cached
        how = "int8 weights" if mode == "int8" else f"{layout} layout"
        print(f"gpt2lab {mode}: {how}, prepared in {time.perf_counter() - t0:.1f} s")
        engines[f"gpt2lab {mode}"] = lambda ours=ours: gpt2lab_steps(ours, prompt, n, batch)
    return engines


def torch_engines(opts: dict, tmp: Path) -> tuple[dict[str, Callable], dict]:
    """The gpt2lab and transformers engines, the GGUF files for llama.cpp, and what to report."""
    import torch

    from gpt2lab.config import GPTConfig
    from gpt2lab.gguf import export_gguf
    from gpt2lab.model import GPT
    from gpt2lab.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    c = model.config
    params = model.num_params(include_padding=True) - c.block_size * c.n_embd  # wte's one read is the head's
    bw = read_bandwidth(params * 4)
    print(f"{cpu_name()}, {cpu_features()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}; read bandwidth " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))
    gguf = {t: str(export_gguf(model, tmp / f"gpt2-{t}.gguf", get_tokenizer(), t)) for t in opts["llama"]}
    prompt, n, batch = opts["prompt"], opts["new_tokens"], opts["batch"]
    engines = gpt2lab_engines(model, opts["modes"], prompt, n, batch)
    if opts["transformers"]:
        engines["transformers float32"] = transformers_engine(model, prompt, n, batch)
    return engines, {"params": params, "bandwidth": max(bw.values()), "gguf": gguf}


def llama_engines(opts: dict, gguf: dict[str, str]) -> dict[str, Callable]:
    import llama_cpp

    engines = {}
    threads = opts["threads"]
    for t, path in gguf.items():
        # The prompt goes in one token at a time (n_ubatch=1): on some CPUs (AMX) llama.cpp crashes on q8_0
        # batches; the prefill is not in the rate, and decoding is one token per step anyway.
        llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=1, n_ubatch=1, n_threads=threads, n_threads_batch=threads,
                              verbose=False)  # fmt: skip
        engines[f"llama.cpp {t}"] = lambda llm=llm: llama_steps(llm, opts["prompt"], opts["new_tokens"])
    print(f"llama-cpp-python {llama_cpp.__version__}, {threads} threads", flush=True)
    return engines


def serve_engines(kind: str, opts: dict, arg: object, conn) -> None:
    """A worker process: build the engines of `kind`, send their names (and what to report), then run
    the engine named by each message and send back (tokens/s, tokens), until the message is None."""
    engines, info = torch_engines(opts, Path(str(arg))) if kind == "torch" else (llama_engines(opts, arg), {})
    sys.stdout.flush()
    conn.send((list(engines), info))
    while (name := conn.recv()) is not None:
        conn.send(decode_rate(engines[name]()))


class Worker:
    """A process that owns some engines and runs one when asked."""

    def __init__(self, ctx, kind: str, opts: dict, arg: object) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve_engines, args=(kind, opts, arg, child), daemon=True)
        self.process.start()
        self.names, self.info = self.conn.recv()

    def run(self, name: str) -> tuple[float, list[int]]:
        self.conn.send(name)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(60)


def report(rates: dict[str, float], tokens: dict[str, list[int]], params: int, bandwidth: float, batch: int) -> None:
    """rates: decoding steps per second (a token for each of `batch` rows each)."""
    print("\n| engine | bytes/weight | MB/step | tokens/s | vs llama.cpp same bytes | of the bandwidth limit "
          "| greedy tokens as plain's |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, rate in rates.items():
        kind = name.split()[-1]
        per = BYTES_PER_WEIGHT.get(kind, 4.0)
        peer = rates.get(f"llama.cpp {PEER[kind]}") if name.startswith("gpt2lab") and kind in PEER else None
        vs = f"{rate / peer:.2f}x" if peer else ""
        ref = tokens["gpt2lab plain float32"]
        same = next((i for i, (a, b) in enumerate(zip(tokens[name], ref)) if a != b), len(ref))
        print(f"| {name} | {per:.2f} | {params * per / 1e6:.0f} | {rate * batch:.1f} | {vs} | "
              f"{rate * params * per / bandwidth:.0%} | first {same} of {len(ref)} |")  # fmt: skip


def speed(args: argparse.Namespace) -> None:
    import multiprocessing

    threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    prompt = random.Random(1).choices(range(50257), k=args.prompt_tokens)
    opts = {"modes": args.modes, "llama": args.llama if args.batch == 1 else [], "prompt": prompt,
            "transformers": not args.no_transformers, "new_tokens": args.new_tokens, "batch": args.batch,
            "threads": threads}  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.cached:  # the workers measure the layouts afresh, as a first run on this machine
            os.environ["GPT2LAB_CACHE"] = str(Path(tmp) / "cache")
        workers = [Worker(ctx, "torch", opts, tmp)]
        info = workers[0].info
        if opts["llama"]:
            workers.append(Worker(ctx, "llama", opts, info["gguf"]))
        owner = {name: w for w in workers for name in w.names}
        print(f"GPT-2 124M random weights, batch {args.batch}, prompt {args.prompt_tokens} tokens, "
              f"{args.new_tokens} new tokens, greedy", flush=True)  # fmt: skip
        tokens = {name: w.run(name)[1] for name, w in owner.items()}  # warm-up, and the tokens to compare
        rates = dict.fromkeys(owner, 0.0)
        for _ in range(args.repeats):  # in turn, so that a change in the machine's load reaches every engine
            for name, w in owner.items():
                rates[name] = max(rates[name], w.run(name)[0])
        for w in workers:
            w.close()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    report(rates, tokens, info["params"], info["bandwidth"], args.batch)
    limit = info["bandwidth"] / info["params"] / 4
    print(f"\nfloat32 bandwidth limit: {info['bandwidth'] / 1e9:.1f} GB/s / {info['params'] * 4 / 1e6:.0f} MB = "
          f"{limit:.1f} tokens/s at batch 1")  # fmt: skip


def transformers_engine(model, prompt: list[int], n: int, batch: int) -> Callable:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.hf import config_to_hf, state_dict_to_hf

    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(model.config))).eval()
    hf.load_state_dict(state_dict_to_hf(model), strict=False)
    return lambda: hf_steps(hf, prompt, n, batch)


def quality(args: argparse.Namespace) -> None:
    """Each mode against float32 on held-out text: largest logit difference, top-1 agreement, perplexity."""
    import copy

    import torch
    import torch.nn.functional as F

    from gpt2lab import accel
    from gpt2lab.checkpoint import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.quality, device=torch.device("cpu"), dtype=torch.float32)
    model.eval()
    ids = tok.encode(Path(args.text).read_text(encoding="utf-8"))[: args.quality_tokens + 1]
    T = model.config.block_size
    rows = (len(ids) - 1) // T
    x = torch.tensor(ids[: rows * T]).view(rows, T)
    y = torch.tensor(ids[1 : rows * T + 1]).view(rows, T)

    def logits(m) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([m(x[i : i + 1])[0] for i in range(rows)]).float()  # (rows, T, V)

    ref = logits(model)
    ppl = math.exp(F.cross_entropy(ref.flatten(0, 1), y.flatten()).item())
    print(f"{args.quality}: {rows} x {T} held-out tokens of {args.text}; float32 perplexity {ppl:.4f}")
    print("| mode | max logit difference | top-1 agreement | perplexity | change |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode in [m for m in args.modes if m != "float32"]:
        ours = copy.deepcopy(model)
        ours = accel.quantize_int8(ours) if mode == "int8" else ours.to(getattr(torch, mode))
        accel.pack_for_inference(ours, 1)
        out = logits(ours)
        p = math.exp(F.cross_entropy(out.flatten(0, 1), y.flatten()).item())
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"| {mode} | {(out - ref).abs().max().item():.4f} | {top1:.2%} | {p:.4f} | {p / ppl - 1:+.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["float32", "bfloat16", "int8"], choices=MODES)
    ap.add_argument("--llama", nargs="*", default=["f32", "f16", "q8_0"], help="llama.cpp's GGUF types; none: skip")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cached", action="store_true", help="take the layouts gpt2lab's cache holds (default: measure)")
    ap.add_argument("--quality", metavar="MODEL", help="a trained model: compare the modes' outputs instead")
    ap.add_argument("--text", help="held-out text for --quality")
    ap.add_argument("--quality-tokens", type=int, default=4096)
    args = ap.parse_args()

    from gpt2lab.openmp import spin_briefly

    # As `gpt2lab sample` and `serve` run (docs/cpu.md, "Threads on a busy machine"); the worker processes
    # inherit it, llama.cpp's OpenMP runtime too.
    spin_briefly()
    if args.quality:
        if not args.text:
            sys.exit("--quality needs --text FILE, held-out text")
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
