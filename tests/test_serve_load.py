"""Load: 64 concurrent clients, streaming and not, on two models, all get complete answers equal to
greedy decoding alone (`generate`, what `gpt2lab sample --temperature 0` runs), while the server's
memory stays bounded: the queue and the batch never pass their bounds, the KV cache is never
reallocated, and the process grows by no more than a fixed amount."""

from __future__ import annotations

import concurrent.futures
import os
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_utils import open_stream, request, running_server, tiny_model

from gpt2lab.generate import SamplingParams, generate
from gpt2lab.tokenizer import get_tokenizer

CLIENTS = 64
WORDS = ["Hello", "ROMEO:", "The meaning of life", "1, 2, 3,", "def f(x):", "Once upon a time", "A", "Q:"]
RSS_GROWTH_LIMIT = 96 * 2**20  # bytes; measured: about 25 MiB (64 client threads, their requests and responses)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bodies() -> list[dict]:
    return [
        {"model": "a" if i % 2 else "b", "prompt": WORDS[i % 8] + " x" * (i % 5), "max_tokens": 6 + i % 11,
         "temperature": 0, "stream": i % 3 == 0}
        for i in range(CLIENTS)
    ]  # fmt: skip


def references(models, work) -> list[str]:
    """Each body's greedy completion, decoded alone by `generate`. Greedy tokens for m new tokens are the
    first m for more, so each (model, prompt) is decoded once, for its longest request."""
    tok = get_tokenizer()
    greedy = SamplingParams(temperature=0.0, stop_token=tok.eot_token)
    longest: dict[tuple[str, str], int] = {}
    for b in work:
        key = (b["model"], b["prompt"])
        longest[key] = max(longest.get(key, 0), b["max_tokens"])
    tokens = {
        (m, p): generate(models[m], tok.encode(p), n, sampling=greedy).tokens[0] for (m, p), n in longest.items()
    }
    out = []
    for b in work:
        ids = tokens[(b["model"], b["prompt"])][: b["max_tokens"]]
        out.append(tok.decode(ids[: ids.index(tok.eot_token)] if tok.eot_token in ids else ids))
    return out


def call(url, body) -> tuple[int, str | None]:
    """One client: (status, the completion's text) once it is complete, streamed or not."""
    if body["stream"]:
        with open_stream(url, body) as events:
            chunks = list(events)
        assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        return 200, "".join(c["choices"][0]["text"] for c in chunks[:-1])
    status, out = request(url, "POST", "/v1/completions", body, timeout=120)
    if status != 200:
        return status, out["error"]["code"]
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    return status, out["choices"][0]["text"]


class Watch:
    """Samples the engine's queue and batch and this process's RSS while the load runs."""

    def __init__(self, engine):
        self.engine = engine
        self.peak_waiting = self.peak_running = self.peak_rss = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.005):
            self.peak_waiting = max(self.peak_waiting, self.engine.waiting_count())
            self.peak_running = max(self.peak_running, max(len(r.running) for r in self.engine.runners.values()))
            self.peak_rss = max(self.peak_rss, rss())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc (Linux)")
def test_64_concurrent_clients_all_get_complete_correct_answers_in_bounded_memory():
    models = {"a": tiny_model(seed=11), "b": tiny_model(seed=12)}
    work = bodies()
    expected = references(models, work)
    with running_server(models, max_batch=8, max_queue=CLIENTS) as (url, engine):
        pools = {n: (r.pool.k.data_ptr(), r.pool.v.data_ptr()) for n, r in engine.runners.items()}
        call(url, {**work[0], "stream": False})  # warm up the server's own allocations
        before = rss()
        with Watch(engine) as watch, concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            got = list(pool.map(lambda b: call(url, b), work))
        assert got == [(200, text) for text in expected]
        assert watch.peak_running <= 8 and watch.peak_waiting <= CLIENTS
        assert watch.peak_waiting >= CLIENTS // 2 - 8  # the load was real: most clients waited at once
        assert watch.peak_rss - before < RSS_GROWTH_LIMIT, f"grew {(watch.peak_rss - before) / 2**20:.0f} MiB"
        assert {n: (r.pool.k.data_ptr(), r.pool.v.data_ptr()) for n, r in engine.runners.items()} == pools
        assert engine.running_count() == 0 and all(sorted(r.free) == list(range(8)) for r in engine.runners.values())


def test_past_the_queue_bound_64_clients_get_answers_or_503_and_none_waits_forever():
    models = {"a": tiny_model(seed=11), "b": tiny_model(seed=12)}
    work = [{**b, "stream": False} for b in bodies()]
    with running_server(models, max_batch=2, max_queue=8) as (url, engine):
        with Watch(engine) as watch, concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            got = list(pool.map(lambda b: call(url, b), work))
        assert watch.peak_waiting <= 8 and watch.peak_running <= 2
    refused = [i for i, (status, _) in enumerate(got) if status != 200]
    assert all(got[i] == (503, "server_busy") for i in refused)
    assert 0 < len(refused) < CLIENTS
    answered = [(body, text) for body, (status, text) in zip(work, got) if status == 200]
    assert [text for _, text in answered] == references(models, [body for body, _ in answered])
