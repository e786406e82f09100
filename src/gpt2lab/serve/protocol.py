"""OpenAI's completions API: the request as the server accepts it, the checks, and the response shapes.

GPT-2 is a base model, so the API is the (legacy) completions one, `POST /v1/completions`. Field names,
defaults and the error shape follow OpenAI's API reference; `top_k` is an extension. Where the reference
leaves a choice to the server, the comment at the code says which was made.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..generate import SamplingParams
from ..tokenizer import Tokenizer
from .engine import Event, TokenInfo

MAX_LOGPROBS = 5  # OpenAI's limit for the completions API
MAX_STOP = 4


class APIError(Exception):
    """A request the server refuses: HTTP status, message, OpenAI error type, the offending parameter."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server allows one request: `max_tokens` per choice, `n`, prompts per request."""

    max_tokens: int | None = None  # None: the model's context
    max_n: int = 8
    max_prompts: int = 16


class DecodingRequest(BaseModel):
    """The fields completions and chat completions share. Types are strict: "5" is not an integer."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    temperature: StrictFloat | StrictInt | None = 1.0
    top_p: StrictFloat | StrictInt | None = 1.0
    top_k: StrictInt | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None
    # Accepted by OpenAI; here only at the values that leave sampling unchanged.
    frequency_penalty: StrictFloat | StrictInt | None = None
    presence_penalty: StrictFloat | StrictInt | None = None
    logit_bias: dict[str, Any] | None = None


class CompletionRequest(DecodingRequest):
    """The body of `POST /v1/completions`."""

    prompt: Any = None  # None: a new document, OpenAI's default "<|endoftext|>" as the separator token
    max_tokens: StrictInt | None = 16
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None  # accepted only as n
    suffix: StrictStr | None = None  # refused when given


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_body(raw: bytes, schema: type[RequestT]) -> RequestT:
    """The request from the raw body: malformed JSON, wrong types and unknown fields are 400s."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {param}", param) from None
        got = json.dumps(err.get("input"))[:60]
        raise APIError(400, f"{param}: {err['msg'].lower()}, got {got}", param) from None


@dataclass
class Plan:
    """A checked request: its prompts as token ids and texts, and how to decode each."""

    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    end_ids: frozenset[int] = frozenset()  # tokens that end a choice besides <|endoftext|>
    id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _prompts(prompt: Any, tok: Tokenizer) -> tuple[list[list[int]], list[str]]:
    """A string, a list of strings, a list of token ids or a list of lists of ids -> ids and texts."""

    def ids_ok(ids: Any) -> bool:
        return isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)

    if prompt is None:
        prompt = ""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    elif ids_ok(prompt) and prompt:
        return _checked_ids([list(prompt)], tok)
    elif isinstance(prompt, list) and prompt and all(ids_ok(p) and p for p in prompt):
        return _checked_ids([list(p) for p in prompt], tok)
    else:
        raise APIError(
            400,
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids "
            "(none of them empty)",
            "prompt",
        )
    # Encoded as `gpt2lab sample` encodes --prompt: a literal "<|endoftext|>" is those 13 characters
    # (tokenizer.py: text never injects a document separator). A new document starts with token id
    # 50256 or with the empty prompt, whose one token echoes as "<|endoftext|>".
    ids = [tok.encode(t) or [tok.eot_token] for t in texts]
    return ids, [t if t else tok.decode(i) for t, i in zip(texts, ids)]


def _checked_ids(prompts: list[list[int]], tok: Tokenizer) -> tuple[list[list[int]], list[str]]:
    for ids in prompts:
        bad = [t for t in ids if not 0 <= t < tok.n_vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0 .. {tok.n_vocab - 1})", "prompt")
    return prompts, [tok.decode(ids) for ids in prompts]


def model_name(requested: str | None, models: dict[str, Any]) -> str:
    """The served model a request names (the first one when it names none), or a 404."""
    name = requested if requested is not None else next(iter(models))
    if name not in models:
        raise APIError(
            404,
            f"the model {name!r} does not exist here; this server has: {', '.join(models)}",
            "model",
            code="model_not_found",
        )
    return name


def check_context(longest: int, max_tokens: int, context: int, prompt_param: str) -> None:
    """OpenAI refuses a prompt and completion longer than the context rather than cropping
    (`gpt2lab sample` slides its window instead)."""
    if longest + max_tokens > context:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens, however you requested "
            f"{longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the completion); "
            "shorten the prompt or lower max_tokens",
            "max_tokens" if longest < context else prompt_param,
            code="context_length_exceeded",
        )


def decoding(req: DecodingRequest, limits: Limits, tok: Tokenizer) -> dict[str, Any]:
    """The checked fields that completions and chat completions share, as Plan's keyword arguments:
    n, sampling, stop, stream, include_usage."""
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    if req.top_k is not None and req.top_k < 0:
        raise APIError(400, f"top_k must be >= 0 (0 = off), got {req.top_k}", "top_k")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n} on this server, got {n}", "n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences, got {len(stop)}", "stop")
    if req.seed is not None and not 0 <= req.seed < 2**62:
        raise APIError(400, f"seed must be between 0 and 2**62 - 1, got {req.seed}", "seed")
    _unsupported(req)
    options = req.stream_options or {}
    if options and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    sampling = SamplingParams(
        temperature=temperature, top_k=req.top_k or None, top_p=top_p, seed=req.seed, stop_token=tok.eot_token
    )
    return {
        "n": n,
        "sampling": sampling,
        "stop": stop,
        "stream": bool(req.stream),
        "include_usage": bool(options.get("include_usage", False)),
    }


def plan(req: CompletionRequest, models: dict[str, tuple[Tokenizer, int]], limits: Limits) -> Plan:
    """Check a request against the served models and the limits. `models`: name -> (tokenizer, context)."""
    name = model_name(req.model, models)
    tok, context = models[name]
    prompts, texts = _prompts(req.prompt, tok)
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", "prompt")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    cap = min(context, limits.max_tokens or context)
    # max_tokens 0 scores the prompt (with logprobs), as OpenAI's legacy completions did: finish_reason
    # is "length" and no token is generated. Without echo there would be nothing to return.
    if max_tokens == 0 and not req.echo:
        raise APIError(
            400, "max_tokens 0 is only allowed with echo: true (to score the prompt with logprobs)", "max_tokens"
        )
    lowest = 0 if req.echo else 1
    if not lowest <= max_tokens <= cap:
        raise APIError(
            400, f"max_tokens must be between {lowest} and {cap} on this server, got {max_tokens}", "max_tokens"
        )
    check_context(max(len(p) for p in prompts), max_tokens, context, "prompt")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", "logprobs")
    return Plan(
        model=name,
        prompts=prompts,
        prompt_texts=texts,
        max_tokens=max_tokens,
        logprobs=req.logprobs,
        echo=bool(req.echo),
        **decoding(req, limits, tok),
    )


def _unsupported(req: DecodingRequest) -> None:
    best_of = getattr(req, "best_of", None)  # completions only, as is suffix
    if best_of not in (None, 1) and best_of != req.n:
        raise APIError(400, "best_of is not supported; leave it out or set it to n", "best_of")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise APIError(400, f"{name} is not supported; leave it out or set it to 0", name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported; leave it out", "logit_bias")
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix is not supported: GPT-2 only continues text", "suffix")


class Choice:
    """One choice of a response as events arrive: its text and, when asked for, its logprobs."""

    def __init__(self, index: int, echo_text: str, with_logprobs: bool) -> None:
        self.index = index
        self.text = echo_text
        self.base = len(echo_text)  # completion offsets count from the start of the echoed prompt
        self.finish_reason: str | None = None
        self.with_logprobs = with_logprobs
        self.tokens: list[TokenInfo] = []
        self.offsets: list[int] = []
        self.completion_tokens = 0

    def add(self, ev: Event) -> dict[str, Any]:
        """Take an event; returns its part of a streamed chunk: {index, text, logprobs, finish_reason}."""
        self.text += ev.text
        self.finish_reason = ev.finish_reason or self.finish_reason
        self.completion_tokens = max(self.completion_tokens, ev.completion_tokens)
        tokens = [*ev.echo, *ev.tokens]
        offsets = [t.offset for t in ev.echo] + [self.base + t.offset for t in ev.tokens]
        self.tokens.extend(tokens)
        self.offsets.extend(offsets)
        return {
            "index": self.index,
            "text": ev.text,
            "logprobs": logprobs_json(tokens, offsets) if self.with_logprobs else None,
            "finish_reason": ev.finish_reason,
        }

    def json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text,
            "logprobs": logprobs_json(self.tokens, self.offsets) if self.with_logprobs else None,
            "finish_reason": self.finish_reason,
        }


def logprobs_json(tokens: list[TokenInfo], offsets: list[int]) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object for these tokens.

    text_offset[i] is where token i's text starts, in characters from the start of the returned `text`,
    echoed prompt included (OpenAI's legacy semantics), in streamed chunks as well. The engine lists only
    the tokens whose text is in `text`: those cut off with a stop string are left out (the one the cut
    falls in stays), and `<|endoftext|>` never appears.
    """
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.top is None else dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def usage(plan: Plan, choices: list[Choice]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in plan.prompts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def envelope(plan: Plan, choices: list[dict[str, Any]], object: str = "text_completion") -> dict[str, Any]:
    return {
        "id": plan.id,
        "object": object,
        "created": plan.created,
        "model": plan.model,
        "system_fingerprint": None,
        "choices": choices,
    }


class CompletionReply:
    """A completions response put together from the engine's events, streamed or whole. The chat
    endpoint's `ChatReply` (chat.py) has the same three methods; app.py drives either."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.choices = [
            Choice(i, plan.prompt_texts[i // plan.n] if plan.echo else "", plan.logprobs is not None)
            for i in range(len(plan.prompts) * plan.n)
        ]
        self.started = [False] * len(self.choices)

    def chunks(self, ev: Event) -> list[dict[str, Any]]:
        """Take an event; returns the streamed chunks it makes (none for a step whose text is all held back)."""
        part = self.choices[ev.choice].add(ev)
        if not self.started[ev.choice]:
            self.started[ev.choice] = True
            if self.plan.echo:
                part["text"] = self.plan.prompt_texts[ev.choice // self.plan.n] + part["text"]
        if part["text"] or part["finish_reason"] or (part["logprobs"] and part["logprobs"]["tokens"]):
            return [envelope(self.plan, [part])]
        return []

    def body(self) -> dict[str, Any]:
        """The whole response, once every choice has finished."""
        return {**envelope(self.plan, [c.json() for c in self.choices]), "usage": usage(self.plan, self.choices)}

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with `stream_options.include_usage`."""
        return {**envelope(self.plan, []), "usage": usage(self.plan, self.choices)}
