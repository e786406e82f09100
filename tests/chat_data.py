"""Chat data directories for the chat training tests: synthetic conversations (sums to answer) rendered with
the chat template into shards, loss masks and a manifest, in the format `gpt2lab prepare` writes for
records with a 'messages' field (docs/formats.md)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from gpt2lab.chat import ChatTemplate
from gpt2lab.data import shards
from gpt2lab.fileio import atomic_write_text
from gpt2lab.tokenizer import Tokenizer, get_tokenizer


def sum_conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    """`n` conversations asking for a sum, some with a system prompt, some two exchanges long."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You add numbers."}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2))):
            a, b = rng.randrange(100), rng.randrange(100)
            messages += [{"role": "user", "content": f"add: {a} + {b}"}, {"role": "assistant", "content": str(a + b)}]
        out.append(messages)
    return out


def write_chat_data(
    root: Path, train: list[list[dict[str, str]]], val: list[list[dict[str, str]]], tok: Tokenizer | None = None
) -> Path:
    """A chat data directory at `root` (one shard and mask per split); returns `root`."""
    tok = tok or get_tokenizer()
    template = ChatTemplate.for_tokenizer(tok)
    root.mkdir(parents=True, exist_ok=True)
    entries, splits = [], {}
    for split, conversations in (("train", train), ("val", val)):
        ids: list[int] = []
        mask: list[int] = []
        for messages in conversations:
            i, m = template.render(messages, tok)
            ids, mask = ids + i, mask + m
        info = shards.write_shard(root / f"chat_{split}_000000.bin", np.array(ids), split)
        name, sha = shards.write_mask(root / f"chat_{split}_000000.mask", np.array(mask))
        entries.append({**info.to_json(), "mask": name, "mask_sha256": sha})
        splits[split] = {"tokens": len(ids), "shards": 1}
    manifest = {
        "format": shards.MANIFEST_FORMAT,
        "format_version": shards.MANIFEST_VERSION,
        "tokenizer": {"name": tok.name, "vocab_hash": tok.vocab_hash},
        "shards": entries,
        "splits": splits,
        "chat_template": template.to_record(),
    }
    atomic_write_text(root / shards.MANIFEST_NAME, json.dumps(manifest, indent=1))
    return root
