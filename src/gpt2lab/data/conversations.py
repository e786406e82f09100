"""Chat data for `gpt2lab prepare`: records with a `messages` list become conversations, rendered by the
chat template into tokens and a loss mask.

A source in chat mode hands each good record on as one piece whose text is the checked messages as
JSON (a conversation is never cut), so the task grouping, the worker pool and resuming work as they do
for text. A bad record (no assistant reply, an unknown role, no messages, not a list) is skipped and
counted, the first few kept with where they are and why. The workers render each conversation with
`ChatTemplate.render`: `<|endoftext|>` starts it, and the mask is 1 on the assistant's replies and their
`<|end|>`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..chat import ChatFormatError, ChatTemplate, check_messages
from ..errors import GPT2LabError
from . import shards as fmt

MESSAGES_FIELD = "messages"
FORMATS = ("auto", "text", "chat")
EXAMPLE_SKIPPED = 5  # bad records named in the manifest and on the terminal


@dataclass
class SkippedRecords:
    """Records that are not conversations gpt2lab can train on: how many, and the first few."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLE_SKIPPED:
            self.examples.append(f"{where}: {reason}")

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "examples": list(self.examples)}

    def restore(self, record: dict[str, Any]) -> None:
        self.count, self.examples = int(record["count"]), list(record["examples"])


def conversation_pieces(record: Any, where: str, skipped: SkippedRecords) -> Iterator[tuple[str, bool]]:
    """The record's conversation as one piece (its checked messages as JSON, starting a document), or
    nothing when the record is bad (counted in `skipped`)."""
    if not isinstance(record, dict) or MESSAGES_FIELD not in record:
        if isinstance(record, dict):
            what = f"fields: {', '.join(map(str, list(record)[:10])) or 'none'}"
        else:
            what = f"a JSON {type(record).__name__}, not an object"
        skipped.add(where, f"no {MESSAGES_FIELD!r} field ({what})")
        return
    try:
        messages = check_messages(record[MESSAGES_FIELD], need_assistant=True)
    except ChatFormatError as e:
        skipped.add(where, str(e))
        return
    yield json.dumps(messages, ensure_ascii=False), True


def render_pieces(
    encoding: Any, template: ChatTemplate, pieces: list[tuple[str, bool]]
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (uint16, shape (n,)) and loss mask (uint8, shape (n,)) of conversation pieces, back to back.

    `encoding` is the text tokenizer's tiktoken Encoding: chat tokens come only from the template, so
    no message text can produce one.
    """
    ids: list[int] = []
    mask: list[int] = []
    for text, _starts in pieces:
        if text:
            conversation_ids, conversation_mask = template.render(json.loads(text), encoding)
            ids += conversation_ids
            mask += conversation_mask
    return np.array(ids, dtype=fmt.TOKEN_DTYPE), np.array(mask, dtype=fmt.MASK_DTYPE)


def is_chat(data_format: str, text_field: str | None, fields: list[str] | None, spec: str) -> bool:
    """Whether to prepare chat data: --format chat, or auto with records that have a 'messages' field
    (`fields`: the first record's fields; None for plain text files) and no --text-field given."""
    if data_format not in FORMATS:
        raise GPT2LabError(f"--format must be one of {', '.join(FORMATS)}, got {data_format!r}")
    if data_format == "chat":
        if fields is None:
            raise GPT2LabError(
                f"{spec}: chat data must be JSONL, Parquet or hf: records with a {MESSAGES_FIELD!r} field, "
                "not plain text files"
            )
        return True
    return data_format == "auto" and text_field is None and fields is not None and MESSAGES_FIELD in fields


def add_chat_keys(manifest: dict[str, Any], template: ChatTemplate, skipped: dict[str, Any]) -> None:
    """Add the keys of a chat data directory to `manifest` (docs/formats.md): the template, the mask
    file's layout, the counts of conversations, learned tokens (in all and per split) and skipped records."""
    for split, counts in manifest["splits"].items():
        counts["learned_tokens"] = sum(s["learned_tokens"] for s in manifest["shards"] if s["split"] == split)
    manifest.update(
        chat_template=template.to_record(),
        mask_format={
            "magic": fmt.MASK_MAGIC,
            "version": fmt.VERSION,
            "header_bytes": fmt.HEADER_BYTES,
            "dtype": "uint8",
        },
        conversations=manifest["documents"],
        learned_tokens=sum(s["learned_tokens"] for s in manifest["shards"]),
        skipped_conversations=skipped["count"],
        example_skipped_conversations=skipped["examples"],
    )
