"""Token data: `gpt2lab prepare`'s pipeline, the llm.c shard format, and the training batch loader.

>>> from gpt2lab.data import PrepareOptions, ShardLoader, open_split_tokens
>>> from gpt2lab.data.prepare import prepare          # the function, in the module of the same name
>>> prepare(PrepareOptions(source="tinyshakespeare", out="data/shakespeare"))
>>> train = ShardLoader("data/shakespeare", "train", batch_size=8, seq_len=256, seed=1, shuffle=True)
>>> val_tokens = open_split_tokens("data/shakespeare", "val")   # flat, memmapped; val_tokens[a:b]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (PEP 562): preparing data and its
# worker processes never load the loader's torch.
_EXPORTS = {
    "ShardLoader": "loader",
    "PrepareOptions": "prepare",
    "PrepareResult": "prepare",
    **{
        name: "shards"
        for name in (
            "ShardInfo",
            "TokenSequence",
            "check_tokenizer",
            "data_tokenizer",
            "open_shard",
            "open_split_tokens",
            "read_header",
            "read_manifest",
            "read_shard",
            "split_shard_paths",
            "write_shard",
        )
    },
}

if TYPE_CHECKING:
    from .loader import ShardLoader
    from .prepare import PrepareOptions, PrepareResult
    from .shards import (
        ShardInfo,
        TokenSequence,
        check_tokenizer,
        data_tokenizer,
        open_shard,
        open_split_tokens,
        read_header,
        read_manifest,
        read_shard,
        split_shard_paths,
        write_shard,
    )

__all__ = [
    "PrepareOptions",
    "PrepareResult",
    "ShardInfo",
    "ShardLoader",
    "TokenSequence",
    "check_tokenizer",
    "data_tokenizer",
    "open_shard",
    "open_split_tokens",
    "read_header",
    "read_manifest",
    "read_shard",
    "split_shard_paths",
    "write_shard",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
