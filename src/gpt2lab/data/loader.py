"""The training batch loader: (x, y) windows from token shards, rank-disjoint, shuffled, resumable.

A split is read as one token stream, its shards concatenated, and cut into windows of `seq_len + 1`
tokens every `seq_len` tokens. Windows span shard boundaries, so no token is lost there
(build-nanogpt's DataLoaderLite drops each shard's tail, its issue #105).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import GPT2LabError
from .shards import TokenSequence, open_split_tokens

STATE_VERSION = 1
# Windows shuffled together. Large enough to mix a small corpus completely, small enough that the
# permutation (8 bytes a window) stays at 512 KiB however large the corpus is.
BLOCK_WINDOWS = 1 << 16


class LoaderPosition(abc.ABC):
    """The saved position of a loader whose epochs are a pure function of (seed, epoch): the epoch and
    the number of windows (rows) consumed in it over all ranks, plus what must match on restore
    (`_identity()`: split, seq_len, seed, shuffle, shard names and sizes, ...). batch_size and
    world_size are recorded for reference: restoring with other values continues from the same global
    position."""

    epoch: int
    cursor: int
    batch_size: int
    world_size: int

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.world_size

    @abc.abstractmethod
    def _identity(self) -> dict[str, Any]:
        """What a saved position must match to be restored (split, seq_len, seed, the data, ...)."""

    @abc.abstractmethod
    def _start_epoch(self) -> None:
        """Lay out the current epoch's order of windows (rows) from (seed, epoch)."""

    @abc.abstractmethod
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each int64 of shape (batch_size, seq_len)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def reset(self) -> None:
        """Back to the first batch of epoch 0 (e.g. to evaluate on the same val batches every time)."""
        self.epoch, self.cursor = 0, 0
        self._start_epoch()

    def state_dict(self) -> dict[str, Any]:
        """The exact position, JSON-serializable, identical on every rank."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict()`); raises GPT2LabError if it belongs to other data."""
        if state.get("version") != STATE_VERSION:
            raise GPT2LabError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        check_same_identity(state, self._identity())
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._start_epoch()


class ShardLoader(LoaderPosition):
    """Batches of (x, y), each int64 of shape (batch_size, seq_len), for one rank of `world_size`.

    >>> loader = ShardLoader("data/shakespeare", "train", batch_size=8, seq_len=256, seed=1, shuffle=True)
    >>> x, y = loader.next_batch()          # or: for x, y in loader: ...  (endless, epoch after epoch)
    >>> state = loader.state_dict()         # JSON-serializable; save it with the checkpoint
    >>> loader.load_state_dict(state)       # the next batch is the one an uninterrupted loader gives

    Shards are checked (header, size, manifest token counts) when the loader is made, and the manifest's
    tokenizer against `tokenizer` if given; llm.c's directories (no manifest) are read by file name.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = False,
        *,
        tokenizer: Any = None,
        block_windows: int = BLOCK_WINDOWS,
    ) -> None:
        check_geometry(batch_size, seq_len, rank, world_size, seed)
        if block_windows < 1:
            raise GPT2LabError(f"block_windows must be at least 1, got {block_windows}")
        self.data_dir, self.split = data_dir, split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.block_windows = seed, shuffle, block_windows
        self.tokens: TokenSequence = open_split_tokens(data_dir, split, tokenizer)
        # Worst case over epochs: a shuffled epoch's offset can be seq_len - 1.
        fewest_windows = (len(self.tokens) - 1 - (seq_len - 1 if shuffle else 0)) // seq_len
        if fewest_windows < self.windows_per_step:
            raise GPT2LabError(
                f"the '{split}' split of {data_dir} has {len(self.tokens):,} tokens, too few for one batch of "
                f"{batch_size} x {seq_len} tokens on {world_size} rank(s) (needs at least "
                f"{self.windows_per_step * seq_len + seq_len:,}); use a smaller batch_size or seq_len"
            )
        self.epoch = 0
        self.cursor = 0  # windows of this epoch already handed out, over all ranks
        self._start_epoch()

    @property
    def steps_per_epoch(self) -> int:
        """Steps in the current epoch (shuffled epochs can differ by one window's worth)."""
        return self._windows // self.windows_per_step

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *key])

    def _start_epoch(self) -> None:
        """The epoch's shard order and window offset o: file order and 0, or drawn from (seed, epoch) with
        o in [0, seq_len) when shuffling, so nothing random needs saving."""
        n_shards = len(self.tokens.shards)
        if self.shuffle:
            rng = self._rng(0)
            order = rng.permutation(n_shards)
            self._offset = int(rng.integers(0, self.seq_len))
        else:
            order = np.arange(n_shards)
            self._offset = 0
        self._stream = self.tokens.permuted(order.tolist())
        self._windows = (len(self._stream) - 1 - self._offset) // self.seq_len
        self._block = -1
        self._block_perm = np.zeros(0, dtype=np.int64)

    def _window_start(self, k: int) -> int:
        """Stream position of the epoch's k-th window, o + k * seq_len; shuffled, k is first permuted
        within its block of `block_windows` windows."""
        if self.shuffle:
            block, first = divmod(k, self.block_windows)
            if block != self._block:
                base = block * self.block_windows
                size = min(self.block_windows, self._windows - base)
                self._block, self._block_perm = block, self._rng(1 + block).permutation(size)
            k = block * self.block_windows + int(self._block_perm[first])
        return self._offset + k * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank: int64 tensors of shape (batch_size, seq_len), y = x shifted by one.

        A step takes the epoch's next `batch_size * world_size` windows and rank r the r-th run of
        `batch_size` of them, so ranks never share a window. The epoch ends when fewer remain, on every
        rank at the same step; unshuffled, each token is an input once per epoch except the split's last
        (at most `batch_size * world_size * seq_len + seq_len`) tokens.
        """
        if self.cursor + self.windows_per_step > self._windows:
            self.epoch += 1
            self.cursor = 0
            self._start_epoch()
        first = self.cursor + self.rank * self.batch_size
        T = self.seq_len
        buf = np.empty((self.batch_size, T + 1), dtype=np.int64)  # (B, T+1)
        for i in range(self.batch_size):
            buf[i] = self._stream.read(self._window_start(first + i), T + 1)
        self.cursor += self.windows_per_step
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))  # (B, T)
        return x, y

    def _identity(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "block_windows": self.block_windows,
            "shards": [[name, len(s)] for name, s in zip(self.tokens.names, self.tokens.shards)],
        }


def check_geometry(batch_size: int, seq_len: int, rank: int, world_size: int, seed: int) -> None:
    """GPT2LabError unless the loader's arguments are in range."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if value < 1:
            raise GPT2LabError(f"{name} must be at least 1, got {value}")
    if not 0 <= rank < world_size:
        raise GPT2LabError(f"rank must be in [0, {world_size}), got {rank}")
    if seed < 0:
        raise GPT2LabError(f"seed must be >= 0, got {seed}")


def check_same_identity(state: dict[str, Any], mine: dict[str, Any]) -> None:
    """Raise GPT2LabError unless a saved loader `state` holds the values of `mine` (what a loader's
    position is only valid with: split, seq_len, seed, shard names and sizes, ...)."""
    for key, value in mine.items():
        theirs = state.get(key)
        if key == "shards":
            theirs = [list(s) for s in theirs or []]
        if theirs != value:
            saved, here = ("other shards", "these") if key == "shards" else (f"{key}={theirs!r}", f"{value!r}")
            raise GPT2LabError(
                f"the saved data loader position is for {saved}, but this loader has {here}; "
                "resume with the same data and settings"
            )
