"""OpenAI's chat completions API, `POST /v1/chat/completions`, for models trained on conversations.

The messages are rendered with the model's chat template (gpt2lab.chat) up to the assistant's start
token, and the reply is decoded by the same engine, batch and queue as a completion; it ends at the
template's `<|end|>` (or `<|endoftext|>`), neither of which is in the reply or its logprobs. A model
whose tokenizer has no chat template (one that was never fine-tuned on conversations) is refused.
Field names, defaults and shapes follow OpenAI's API reference; `top_k` is an extension, as for
completions.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import StrictBool, StrictInt

from ..chat import ChatFormatError, check_messages, template_of
from ..tokenizer import Tokenizer
from .engine import Event, TokenInfo
from .protocol import (
    APIError,
    Choice,
    DecodingRequest,
    Limits,
    Plan,
    check_context,
    decoding,
    envelope,
    model_name,
    usage,
)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions


class ChatRequest(DecodingRequest):
    """The body of `POST /v1/chat/completions`."""

    messages: Any = None  # checked by chat.check_messages, whose reason is the error's message
    max_tokens: StrictInt | None = None  # None: whatever the context leaves after the conversation
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None


def _plain_messages(messages: Any) -> Any:
    """OpenAI's message forms that mean plain text, as the template takes it: content given as a list of
    text parts is joined, and the "developer" role is the system prompt by its newer name. Anything else
    is left for check_messages to refuse."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict):
            m = dict(m)
            if m.get("role") == "developer":
                m["role"] = "system"
            parts = m.get("content")
            if isinstance(parts, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts
            ):
                m["content"] = "".join(p["text"] for p in parts)
        out.append(m)
    return out


def plan_chat(req: ChatRequest, models: dict[str, tuple[Tokenizer, int]], limits: Limits) -> Plan:
    """Check a chat request against the served models and the limits. `models`: name -> (tokenizer, context)."""
    name = model_name(req.model, models)
    tok, context = models[name]
    template = template_of(tok)
    if template is None:
        raise APIError(
            400,
            f"the model {name!r} has no chat template: it was never fine-tuned on conversations; fine-tune it "
            "first (docs/training.md) or use /v1/completions",
            "model",
            code="model_not_chat",
        )
    try:
        messages = check_messages(_plain_messages(req.messages))
    except ChatFormatError as e:
        raise APIError(400, str(e), "messages") from None
    prompt = template.prompt_ids(messages, tok)
    cap = min(context, limits.max_tokens or context)
    given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = given if given is not None else max(1, min(cap, context - len(prompt)))
    if not 1 <= max_tokens <= cap:
        raise APIError(400, f"{param} must be between 1 and {cap} on this server, got {max_tokens}", param)
    check_context(len(prompt), max_tokens, context, "messages")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(
                400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}", "top_logprobs"
            )
    return Plan(
        model=name,
        prompts=[prompt],
        prompt_texts=[""],
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        echo=False,
        end_ids=frozenset({template.end_id}),
        id="chatcmpl-" + uuid.uuid4().hex[:24],
        **decoding(req, limits, tok),
    )


def token_logprobs(tokens: list[TokenInfo], tok: Tokenizer) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: each token's text, log-probability, UTF-8 bytes and top alternatives.
    Like the completions' logprobs, it lists exactly the tokens whose text is in the reply."""

    def entry(token: int, text: str, logprob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(tok.decode_bytes([token]))}

    out = []
    for t in tokens:
        top = [entry(i, text, lp) for i, (text, lp) in zip(t.top_ids or [], t.top or [])]
        out.append({**entry(t.token, t.text, t.logprob), "top_logprobs": top})
    return out


class ChatReply:
    """A chat completion put together from the engine's events, streamed or whole (see CompletionReply).

    A stream sends, per choice, a first chunk with `delta: {"role": "assistant", "content": ""}`, then a
    chunk for each piece of text (with its tokens' logprobs when asked), then one with an empty delta and
    the finish reason.
    """

    def __init__(self, plan: Plan, tokenizer: Tokenizer) -> None:
        self.plan = plan
        self.tokenizer = tokenizer
        self.choices = [Choice(i, "", plan.logprobs is not None) for i in range(plan.n)]
        self.started = [False] * plan.n

    def _logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any] | None:
        if self.plan.logprobs is None:
            return None
        return {"content": token_logprobs(tokens, self.tokenizer), "refusal": None}

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict:
        part = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return envelope(self.plan, [part], "chat.completion.chunk")

    def chunks(self, ev: Event) -> list[dict[str, Any]]:
        """Take an event; returns the streamed chunks it makes."""
        self.choices[ev.choice].add(ev)
        out = []
        if not self.started[ev.choice]:
            self.started[ev.choice] = True
            out.append(self._chunk(ev.choice, {"role": "assistant", "content": ""}))
        if ev.text or ev.tokens:
            out.append(self._chunk(ev.choice, {"content": ev.text}, self._logprobs(ev.tokens)))
        if ev.finish_reason is not None:
            out.append(self._chunk(ev.choice, {}, finish=ev.finish_reason))
        return out

    def body(self) -> dict[str, Any]:
        """The whole response, once every choice has finished."""
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": self._logprobs(c.tokens),
                "finish_reason": c.finish_reason,
            }
            for c in self.choices
        ]
        return {**envelope(self.plan, choices, "chat.completion"), "usage": usage(self.plan, self.choices)}

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with `stream_options.include_usage`."""
        return {**envelope(self.plan, [], "chat.completion.chunk"), "usage": usage(self.plan, self.choices)}
