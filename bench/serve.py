"""Serving throughput: 8 concurrent streaming clients against the same 8 requests one at a time, in one run.

GPT-2 124M's shape with random weights (`torch.manual_seed(0)`, no Hub download: the speed of a forward
pass does not depend on what the weights are), float32 on CPU, served by `gpt2lab serve`'s own engine and
app over real HTTP on 127.0.0.1. Each client streams (`stream: true`) a completion of a distinct
`--prompt-tokens`-token prompt with `--new-tokens` new tokens, sampled at temperature 0.8 with its own seed.
`--dtype bfloat16` or `int8` serves the model as `gpt2lab serve --dtype` does.

1. One at a time: the 8 requests in turn; tokens/s = generated tokens / wall time.
2. Concurrent: the 8 at once; tokens/s = generated tokens / time from the first request to the last
   token. The ratio of the two is what batched decoding buys (target >= 3x on CPU).
3. Time to first token while 8 are decoding: 8 long streams are started and have all produced tokens,
   then `--probes` requests arrive one after another; each one's time from sending to its first
   token is reported (target < 1 s). The server has room for a 9th sequence (`--max-batch`, default
   16), so the probe measures its prefill and admission between two decode steps, not a queue.

    python bench/serve.py
    python bench/serve.py --new-tokens 32 --probes 3     # shorter
    python bench/serve.py --dtype int8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import platform
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

from machine import cpu_features, cpu_name  # bench/machine.py, beside this script

CLIENTS = 8


def stream(
    url: str, body: dict, started: threading.Event | None = None, hang_up: threading.Event | None = None
) -> tuple[int, float, float]:
    """POST a streaming completion; returns (tokens generated, seconds to the first token, seconds in all).
    `started` is set when the first token arrives; once `hang_up` is set, the client disconnects."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first = None
    usage = 0
    while True:
        line = resp.readline()
        if not line or (hang_up is not None and hang_up.is_set()):
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        payload = line[6:]
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        elif first is None and chunk["choices"]:
            first = time.perf_counter() - t0
            if started is not None:
                started.set()
    total = time.perf_counter() - t0
    conn.close()
    return usage, first if first is not None else total, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"], help="as gpt2lab serve's")
    args = ap.parse_args()

    from gpt2lab.openmp import spin_briefly_before_torch

    spin_briefly_before_torch()  # as `gpt2lab serve` runs (docs/cpu.md, "Threads on a busy machine")
    import torch

    from gpt2lab import accel
    from gpt2lab.config import GPTConfig
    from gpt2lab.model import GPT
    from gpt2lab.serve.app import create_app
    from gpt2lab.serve.engine import Engine, ModelRunner
    from gpt2lab.serve.protocol import Limits
    from gpt2lab.serve.server import background_server
    from gpt2lab.tokenizer import get_tokenizer

    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, {cpu_features()}")
    print(f"torch {torch.__version__}, Python {platform.python_version()}")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()  # random weights: no download
    model = accel.apply_inference_dtype(model.to(getattr(torch, accel.inference_dtype(args.dtype))), args.dtype)
    print(f"GPT-2 124M shape ({model.num_params() / 1e6:.0f}M parameters, random weights), {args.dtype}, CPU; "
          f"{CLIENTS} clients x {args.prompt_tokens}-token prompts x {args.new_tokens} new tokens, "
          "streaming")  # fmt: skip
    tok = get_tokenizer()
    engine = Engine([ModelRunner("gpt2", model, tok, args.max_batch)], max_queue=64)
    app = create_app(engine, Limits(max_n=args.max_batch))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50000, (args.prompt_tokens,), generator=gen).tolist() for _ in range(CLIENTS)]

    def body(i: int, new_tokens: int) -> dict:
        return {"prompt": prompts[i % CLIENTS], "max_tokens": new_tokens, "temperature": 0.8, "seed": i,
                "stream_options": {"include_usage": True}}  # fmt: skip

    with background_server(engine, app, "127.0.0.1", 0) as url:
        stream(url, body(0, 4))  # warm-up: first-call allocations, the HTTP stack

        t0 = time.perf_counter()
        alone = [stream(url, body(i, args.new_tokens)) for i in range(CLIENTS)]
        alone_s = time.perf_counter() - t0
        alone_tokens = sum(r[0] for r in alone)

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            together = list(pool.map(lambda i: stream(url, body(i, args.new_tokens)), range(CLIENTS)))
        together_s = time.perf_counter() - t0
        together_tokens = sum(r[0] for r in together)

        # Time to first token while 8 sequences are decoding: 8 long streams, then probes one by one.
        long_tokens = min(model.config.block_size - args.prompt_tokens, 16 * args.new_tokens)
        flags = [threading.Event() for _ in range(CLIENTS)]
        hang_up = threading.Event()
        ttft = []
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            background = [pool.submit(stream, url, body(i, long_tokens), flags[i], hang_up) for i in range(CLIENTS)]
            for f in flags:
                f.wait(600)
            for j in range(args.probes):
                assert engine.running_count() >= CLIENTS, "the background streams ended before the probes"
                ttft.append(stream(url, body(100 + j, 1))[1])
                time.sleep(0.2)  # let the 8 decode a few steps between probes
            hang_up.set()
            for f in background:
                f.result()

    a, c = alone_tokens / alone_s, together_tokens / together_s
    print()
    print("| clients | generated tokens | wall s | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| 8 one at a time | {alone_tokens} | {alone_s:.1f} | {a:.1f} |")
    print(f"| 8 concurrent | {together_tokens} | {together_s:.1f} | {c:.1f} |")
    print(f"\nconcurrent / one at a time: {c / a:.2f}x (target >= 3x)")
    print(f"time to first token, one at a time (median of 8): {statistics.median(r[1] for r in alone):.3f} s")
    print(f"time to first token, 8 arriving together (median / max): {statistics.median(r[1] for r in together):.3f}"
          f" / {max(r[1] for r in together):.3f} s")  # fmt: skip
    print(f"time to first token while 8 are decoding (median / max of {args.probes}): "
          f"{statistics.median(ttft):.3f} / {max(ttft):.3f} s (target < 1 s)")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
