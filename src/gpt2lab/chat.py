"""The chat template: how a conversation becomes tokens, and which of them the model learns from.

A conversation is OpenAI's list of messages, `[{"role": "system" | "user" | "assistant", "content": str}]`.
It is rendered as

    <|endoftext|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

where `<|endoftext|>` starts the document as GPT-2 saw every document start, and the four chat
tokens are real special tokens: they take the ids just past the text vocabulary (50257-50260 for
GPT-2, inside its rows padded to 50304), and `encode_ordinary` never produces them, so no text a
user writes can open or close a turn. Each message's text is encoded on its own, which is also what
Hugging Face's tokenizers do around added tokens, so `apply_chat_template` with `hf_chat_template()`
gives the same ids.

The loss mask is 1 exactly on the assistant's reply tokens and the `<|end|>` that closes each reply:
the model learns to answer and to stop, never to write the user's side. A reply is generated from
`prompt_ids(messages)` (the conversation so far plus `<|assistant|>`) until `<|end|>`.

This module imports no torch: data preparation uses it in its worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import GPT2LabError
from .tokenizer import Tokenizer

TEMPLATE_NAME = "gpt2lab-chat"
TEMPLATE_VERSION = 1
ROLES = ("system", "user", "assistant")
END_TEXT = "<|end|>"
# The special tokens in id order: a start for each role's turn, then the end of a turn.
TOKEN_TEXTS = ("<|system|>", "<|user|>", "<|assistant|>", END_TEXT)


class ChatFormatError(GPT2LabError):
    """A conversation that cannot be rendered (the message says why)."""


def check_messages(messages: Any, *, need_assistant: bool = False) -> list[dict[str, str]]:
    """The messages as a list of {"role", "content"} dicts, or ChatFormatError saying what is wrong.

    `need_assistant` is for training data: a conversation without a reply teaches nothing.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} is not an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; the roles are system, user and assistant")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}) has no text 'content'")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise ChatFormatError("the conversation has no assistant reply with text")
    if all(not m["content"].strip() for m in out):
        raise ChatFormatError("every message is empty")
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """The chat tokens' ids for one text tokenizer, and rendering with them.

    `first_id` is the text vocabulary's size: the four tokens take `first_id` .. `first_id + 3`.
    """

    first_id: int
    bos_id: int  # the text tokenizer's <|endoftext|>

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        base = tokenizer.base
        return cls(first_id=base.n_vocab, bos_id=base.eot_token)

    @property
    def token_ids(self) -> dict[str, int]:
        return {text: self.first_id + i for i, text in enumerate(TOKEN_TEXTS)}

    @property
    def role_ids(self) -> dict[str, int]:
        return {role: self.first_id + i for i, role in enumerate(ROLES)}

    @property
    def end_id(self) -> int:
        return self.first_id + len(ROLES)

    @property
    def n_vocab(self) -> int:
        """The vocabulary a chat model needs: the text tokens plus the four chat tokens."""
        return self.first_id + len(TOKEN_TEXTS)

    def tokenizer(self, base: Tokenizer) -> Tokenizer:
        """`base` with the chat tokens added, so that they decode (to their text) and count in n_vocab."""
        base = base.base
        if base.n_vocab != self.first_id:
            raise GPT2LabError(
                f"the chat template's tokens start at id {self.first_id}, but tokenizer {base.name!r} has "
                f"{base.n_vocab} tokens; the model and its tokenizer do not belong together"
            )
        return base.with_special_tokens(self.token_ids)

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[dict[str, str]], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and its loss mask (1 on assistant replies and their end)."""
        ids, mask = [self.bos_id], [0]
        for m in messages:
            text = tokenizer.encode_ordinary(m["content"])
            learn = 1 if m["role"] == "assistant" else 0
            ids += [self.role_ids[m["role"]], *text, self.end_id]
            mask += [0, *[learn] * len(text), learn]
        return ids, mask

    def prompt_ids(self, messages: Sequence[dict[str, str]], tokenizer: Tokenizer) -> list[int]:
        """The ids a reply is generated after: the conversation, then the assistant's start token."""
        return self.render(messages, tokenizer)[0] + [self.role_ids["assistant"]]

    def hf_chat_template(self) -> str:
        """The same rendering as a Jinja template for Hugging Face's `tokenizer_config.json`."""
        return (
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_TEXT + "' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
        )

    # ------------------------------------------------------------------ records
    def to_record(self) -> dict[str, Any]:
        """What manifests and checkpoints store under "chat_template"."""
        return {"name": TEMPLATE_NAME, "version": TEMPLATE_VERSION, "tokens": self.token_ids, "bos_id": self.bos_id}

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str) -> ChatTemplate:
        try:
            ok = record["name"] == TEMPLATE_NAME and record["version"] == TEMPLATE_VERSION
            ids = [int(record["tokens"][t]) for t in TOKEN_TEXTS]
            template = cls(first_id=ids[0], bos_id=int(record["bos_id"]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or list(template.token_ids.values()) != ids:
            raise GPT2LabError(
                f"{where} records a chat template this version of gpt2lab does not know ({record!r}); "
                "update gpt2lab or prepare the data again"
            )
        return template


def chat_tokenizer(record: dict[str, Any] | None, base: Tokenizer, where: str) -> Tokenizer:
    """`base` with the chat tokens of the template `record` (a manifest's or checkpoint's
    "chat_template"), or `base` itself when there is no record."""
    if not record:
        return base
    return ChatTemplate.from_record(record, where).tokenizer(base)


def template_of(tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template whose tokens `tokenizer` has, or None for a text-only tokenizer."""
    if tokenizer.base is tokenizer:
        return None
    template = ChatTemplate.for_tokenizer(tokenizer)
    have = {t: tokenizer.special_tokens.get(t) for t in TOKEN_TEXTS}
    return template if have == template.token_ids else None
