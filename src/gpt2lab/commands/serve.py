"""Serve models over HTTP: OpenAI's completions and chat completions APIs, batched, with a web playground.

Examples:
  gpt2lab serve --model gpt2
  gpt2lab serve --model mine=runs/shakespeare --model gpt2 --port 8080
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "gpt2", "prompt": "Hello, I am", "max_tokens": 20, "temperature": 0}'
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sft", "messages": [{"role": "user", "content": "Hi!"}]}'   # a chat fine-tuned model
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import GPT2LabError

INSTALL_HINT = "gpt2lab serve needs FastAPI and uvicorn: pip install 'gpt2lab[serve]'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]MODEL",
        help="Hub name, HF directory, or gpt2lab checkpoint/run dir; repeat to serve several "
        "(named by NAME, else by the Hub name or the directory's name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $GPT2LAB_API_KEY, else none)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="float32 | bfloat16 | float16 | int8 (int8: 8-bit weights, CPU only; default: float32)",
    )
    p.add_argument(
        "--max-batch", type=int, default=8, metavar="N", help="sequences decoded together per model (default: 8)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="prompts that may wait for a slot; past it requests get 503 (default: 64)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="largest max_tokens a request may ask (default: the model's context)",
    )
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: each checkpoint's, or GPT-2's)"
    )


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise GPT2LabError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_batch < 1:
        raise GPT2LabError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 1:
        raise GPT2LabError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise GPT2LabError(f"--max-tokens must be at least 1, got {args.max_tokens}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise GPT2LabError(INSTALL_HINT) from None
    from .. import accel
    from ..runtime import resolve_device, resolve_dtype
    from ..serve.app import create_app
    from ..serve.engine import Engine
    from ..serve.protocol import Limits
    from ..serve.server import API_KEY_ENV, bind, is_loopback, load_runners, serve_forever

    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    device = resolve_device(args.device)
    sock = bind(args.host, args.port)  # before loading: a taken port is reported at once
    runners = load_runners(
        args.model, device, resolve_dtype(accel.inference_dtype(args.dtype)), args.max_batch, args.tokenizer
    )
    for runner in runners:
        accel.apply_inference_dtype(runner.model, args.dtype)
    engine = Engine(runners, max_queue=args.max_queue)
    app = create_app(engine, Limits(max_tokens=args.max_tokens, max_n=args.max_batch), api_key)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"gpt2lab serve: {', '.join(engine.runners)} on {device.type}", file=sys.stderr)
    if not is_loopback(args.host) and api_key is None:
        print(
            f"gpt2lab serve: warning: listening on {args.host} without --api-key: anyone who reaches this machine "
            "can use the models",
            file=sys.stderr,
        )
    print(f"gpt2lab serve: listening on http://{shown}:{port} (playground at /, API at /v1)", flush=True)
    # SIGTERM (docker stop, systemd) ends the server as Ctrl-C does: uvicorn finishes its open responses,
    # then raises the signal again, which lands here as a KeyboardInterrupt: a clean exit.
    signal.signal(signal.SIGTERM, _interrupt)
    engine.start()
    try:
        serve_forever(app, sock)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    print("gpt2lab serve: stopped", file=sys.stderr)
    return 0
