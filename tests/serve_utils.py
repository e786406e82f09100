"""Helpers for the server tests: tiny random models, a server on a free 127.0.0.1 port, plain HTTP calls."""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import torch

from gpt2lab.chat import ChatTemplate
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.tokenizer import Tokenizer, get_tokenizer

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)


def tiny_model(seed: int = 0, **overrides: int) -> GPT:
    """A random GPT-2-vocabulary model small enough to decode hundreds of tokens a second on one core."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def chat_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer with the chat template's four tokens (50257-50260)."""
    tok = get_tokenizer()
    return ChatTemplate.for_tokenizer(tok).tokenizer(tok)


def tiny_chat_model(seed: int = 0, **overrides: int) -> GPT:
    """A random model with the chat tokens in its vocabulary, as chat fine-tuning leaves one."""
    return tiny_model(seed, **{"vocab_size": ChatTemplate.for_tokenizer(get_tokenizer()).n_vocab, **overrides})


def rigged(model: GPT, logits: dict[int, float], others: float = -30.0) -> GPT:
    """`model` made to predict the same distribution after any context: the final layer norm's output is
    always the first unit vector, so the logits are the (tied) embeddings' first column, which becomes
    `others` except at the ids of `logits`."""
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = others
        for token, value in logits.items():
            model.transformer.wte.weight[token, 0] = value
    return model


@contextlib.contextmanager
def running_server(
    models: dict[str, GPT],
    max_batch: int = 8,
    max_queue: int = 64,
    api_key: str | None = None,
    tokenizers: dict[str, Tokenizer] | None = None,
    **limits: Any,
) -> Iterator[tuple[str, Any]]:
    """Serve `models` (name -> GPT, with GPT-2's tokenizer unless `tokenizers` names another) on
    127.0.0.1 at a free port; yields (url, engine)."""
    from gpt2lab.serve.app import create_app
    from gpt2lab.serve.engine import Engine, ModelRunner
    from gpt2lab.serve.protocol import Limits
    from gpt2lab.serve.server import background_server

    toks = tokenizers or {}
    runners = [ModelRunner(n, m, toks.get(n) or get_tokenizer(), max_batch) for n, m in models.items()]
    engine = Engine(runners, max_queue=max_queue)
    app = create_app(engine, Limits(max_n=max_batch, **limits), api_key)
    with background_server(engine, app, "127.0.0.1", 0) as url:
        yield url, engine


def _conn(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def request(
    url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, Any]:
    """One HTTP call; returns (status, parsed JSON body). `body` may be raw bytes or a JSON-able value."""
    conn = _conn(url, timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw else None


def complete(url: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    status, out = request(url, "POST", "/v1/completions", body, **kw)
    assert status == 200, out
    return out


@contextlib.contextmanager
def open_stream(
    url: str, body: dict[str, Any], timeout: float = 60, path: str = "/v1/completions"
) -> Iterator[Iterator[dict[str, Any] | str]]:
    """POST with stream: true; yields an iterator over the parsed `data:` payloads ("[DONE]" as a string).
    Leaving the block closes the connection, done or not."""
    conn = _conn(url, timeout)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("content-type").startswith("text/event-stream")

    def events() -> Iterator[dict[str, Any] | str]:
        while True:
            line = resp.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)

    try:
        yield events()
    finally:  # both: the response holds its own reference to the socket
        resp.close()
        conn.close()


def stream_all(url: str, body: dict[str, Any], path: str = "/v1/completions") -> list[dict[str, Any] | str]:
    with open_stream(url, body, path=path) as events:
        return list(events)


def chat(url: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    status, out = request(url, "POST", "/v1/chat/completions", body, **kw)
    assert status == 200, out
    return out
