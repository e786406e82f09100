"""The HTTP side: a FastAPI app in front of the engine.

Routes: `GET /` (the playground), `GET /health`, `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`). Request handlers run on
uvicorn's event loop; the engine runs on its own thread and hands each event back with
`loop.call_soon_threadsafe`, so a slow client never holds up the decode loop and the loop never blocks
on the model.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .chat import ChatReply, ChatRequest, plan_chat
from .engine import Engine, Event, Group, QueueFull
from .protocol import APIError, CompletionReply, CompletionRequest, Limits, Plan, parse_body, plan

STATIC = resources.files("gpt2lab.serve") / "static"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def create_app(engine: Engine, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The app serving `engine`'s models. With `api_key`, every /v1 route needs `Authorization: Bearer KEY`."""
    app = FastAPI(title="gpt2lab", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_page_routes(app, engine)
    _add_api_routes(app, engine, limits or Limits(), _key_check(api_key))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, FastAPI's own 404 and 405 included."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(404)
    async def not_found(request: Request, e: Exception) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        err = APIError(404, f"no route {where}; see GET /v1/models, POST /v1/completions and POST /v1/chat/completions")
        return JSONResponse(err.body(), status_code=404)

    @app.exception_handler(405)
    async def bad_method(request: Request, e: Exception) -> JSONResponse:
        err = APIError(405, f"{request.method} is not allowed on {request.url.path}")
        return JSONResponse(err.body(), status_code=405)


def _key_check(api_key: str | None) -> Callable[[Request], None]:
    """What each /v1 route calls first: raises a 401 APIError unless the request carries `api_key`."""

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(
                401,
                "missing API key: send the header 'Authorization: Bearer KEY' with the key the server was started with",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", type="invalid_request_error", code="invalid_api_key")

    return check_key


def _add_page_routes(app: FastAPI, engine: Engine) -> None:
    """The routes without a key: the playground, its static files, and the health check."""

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        suffix = name[name.rfind(".") :] if "." in name else ""
        if "/" in name or suffix not in STATIC_TYPES or not (STATIC / name).is_file():
            raise APIError(404, f"no static file {name!r}")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_TYPES[suffix])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": list(engine.runners),
            "running": engine.running_count(),
            "waiting": engine.waiting_count(),
        }


class Reply(Protocol):
    """A response put together from the engine's events: protocol.CompletionReply or chat.ChatReply."""

    plan: Plan

    def chunks(self, ev: Event) -> list[dict[str, Any]]: ...

    def body(self) -> dict[str, Any]: ...

    def usage_chunk(self) -> dict[str, Any]: ...


def _add_api_routes(app: FastAPI, engine: Engine, limits: Limits, check_key: Callable[[Request], None]) -> None:
    """OpenAI's /v1/models, /v1/completions and /v1/chat/completions."""
    models = {name: (r.tokenizer, r.context) for name, r in engine.runners.items()}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "gpt2lab", "context_length": ctx}
                for name, (_, ctx) in models.items()
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        p = plan(parse_body(await request.body(), CompletionRequest), models, limits)
        return await _answer(engine, CompletionReply(p), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        p = plan_chat(parse_body(await request.body(), ChatRequest), models, limits)
        return await _answer(engine, ChatReply(p, models[p.model][0]), request)


async def _answer(engine: Engine, reply: Reply, request: Request) -> Response:
    """Queue the request's prompts on the engine (or refuse with 503) and answer as it decodes them."""
    p = reply.plan
    queue: asyncio.Queue[Event] = asyncio.Queue()
    groups = _groups(p, _emitter(asyncio.get_running_loop(), queue))
    try:
        engine.submit(groups)
    except QueueFull as e:
        raise APIError(503, str(e), type="server_error", code="server_busy") from None
    if p.stream:
        return StreamingResponse(
            _stream(engine, groups, reply, queue),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(engine, groups, reply, queue, request)


def _groups(p: Plan, emit: Callable[[Event], None]) -> list[Group]:
    """One engine group per prompt, each of `p.n` choices, numbered on from the previous prompt's."""
    return [
        Group(
            model=p.model,
            prompt=ids,
            n=p.n,
            first_choice=i * p.n,
            max_tokens=p.max_tokens,
            sampling=p.sampling,
            stop=p.stop,
            logprobs=p.logprobs,
            echo_logprobs=p.echo and p.logprobs is not None,
            emit=emit,
            end_ids=p.end_ids,
        )
        for i, ids in enumerate(p.prompts)
    ]


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """The engine's callback for one request: it hands each event to the request's handler on `loop`.
    Once the loop has closed (the server is shutting down) nobody is listening: the event is dropped
    and the error tells the engine to drop the request, instead of ending the engine thread."""

    def emit(ev: Event) -> None:  # on the engine thread
        if loop.is_closed():
            raise ClientGone("the server's event loop has closed")
        loop.call_soon_threadsafe(queue.put_nowait, ev)  # a loop closing meanwhile raises RuntimeError: alike

    return emit


class ClientGone(RuntimeError):
    """The request's handler is gone: its event loop has closed."""


async def _collect(
    engine: Engine, groups: list[Group], reply: Reply, queue: asyncio.Queue[Event], request: Request
) -> JSONResponse:
    """Wait for every choice to finish; a client that hangs up meanwhile frees its slots."""
    done, total = 0, sum(g.n for g in groups)
    try:
        while done < total:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            if ev.error is not None:
                raise APIError(500, ev.error, type="server_error")
            reply.chunks(ev)
            done += ev.finish_reason is not None
    finally:
        if done < total:
            engine.cancel(groups)
    return JSONResponse(reply.body())


async def _stream(engine: Engine, groups: list[Group], reply: Reply, queue: asyncio.Queue[Event]) -> AsyncIterator[str]:
    """Server-sent events: one `data: {chunk}` per chunk, then `data: [DONE]`. When the client goes
    away, Starlette cancels this generator and the `finally` frees the request's slots at once."""
    done, total = 0, sum(g.n for g in groups)
    try:
        while done < total:
            ev = await queue.get()
            if ev.error is not None:
                yield _sse({"error": APIError(500, ev.error, type="server_error").body()["error"]})
                break
            for chunk in reply.chunks(ev):
                yield _sse(chunk)
            done += ev.finish_reason is not None
        else:
            if reply.plan.include_usage:
                yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
    finally:
        if done < total:
            engine.cancel(groups)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
