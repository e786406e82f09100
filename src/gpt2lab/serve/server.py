"""Loading the models into an engine, and running the app with uvicorn (in the foreground for the
CLI, on a background thread for tests and benchmarks)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import GPT2LabError
from .engine import Engine, ModelRunner

if TYPE_CHECKING:  # FastAPI and uvicorn are the `serve` extra: imported where used
    import uvicorn
    from fastapi import FastAPI

API_KEY_ENV = "GPT2LAB_API_KEY"


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'NAME=MODEL' -> (NAME, MODEL); a bare MODEL is named by itself: a Hub name as written, a directory
    by its last component."""
    name, sep, rest = spec.partition("=")
    if sep and name and rest and "/" not in name and os.sep not in name and not Path(spec).exists():
        return name, rest
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve().name, spec
    return spec, spec


def load_runners(
    specs: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    max_batch: int,
    tokenizer: str | None = None,
) -> list[ModelRunner]:
    """Load every `--model` (see parse_model_spec) onto `device`; names must be unique."""
    from ..checkpoint import load_model_and_tokenizer

    named = [parse_model_spec(s) for s in specs]
    seen: set[str] = set()
    for name, _ in named:
        if name in seen:
            raise GPT2LabError(f"two models are named {name!r}; name them apart with --model NAME=MODEL")
        seen.add(name)
    runners = []
    for name, where in named:
        model, tok = load_model_and_tokenizer(where, device=device, dtype=dtype, tokenizer=tokenizer)
        runners.append(ModelRunner(name, model, tok, max_batch))
    return runners


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port, see `sock.getsockname()`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GPT2LabError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port or --host") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _uvicorn_server(app: FastAPI, log_level: str) -> uvicorn.Server:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2)
    return uvicorn.Server(config)


def serve_forever(app: FastAPI, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's handlers)."""
    _uvicorn_server(app, log_level).run(sockets=[sock])


@contextlib.contextmanager
def background_server(engine: Engine, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` on a thread, listening on host:port, with `engine` started; yields the base URL."""
    sock = bind(host, port)
    server = _uvicorn_server(app, "warning")
    engine.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gpt2lab-http", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            threading.Event().wait(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
        sock.close()
