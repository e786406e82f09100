"""Token data: `gpt2lab prepare`'s pipeline, the llm.c shard format, and the training batch loader.

>>> from gpt2lab.data import ShardLoader, open_split_tokens, read_manifest, check_tokenizer
>>> check_tokenizer(read_manifest("data/shakespeare"), get_tokenizer(), "data/shakespeare")
>>> train = ShardLoader("data/shakespeare", "train", batch_size=8, seq_len=256, rank=0, world_size=1,
...                     seed=1, shuffle=True)
>>> val_tokens = open_split_tokens("data/shakespeare", "val")   # flat, memmapped; val_tokens[a:b]

The pipeline itself is `gpt2lab.data.prepare.prepare(PrepareOptions(...))` (the module keeps its name).
"""

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
