"""The chat training loader: rows that start at a conversation's start, targets only where the loss learns.

Chat data (`gpt2lab prepare` from records with a 'messages' field) is rendered conversations back to
back, each starting with `<|endoftext|>` (the template's `bos_id`, found nowhere else), with a loss
mask beside the tokens (1 where token i is a target the model learns: the assistant's replies and
their `<|end|>`). A row holds `seq_len + 1` tokens, x = row[:-1] and y = row[1:], built so that:

- every row starts at a conversation's start, so no reply is learned without its question;
- a conversation longer than a row is cut to the row (its tail is not trained on);
- shorter ones are packed best-fit (nanochat's loader): from a buffer of the next conversations in the
  epoch's order, the longest that fits the space left in the row goes in, until none fits; the rest
  of the row is padding;
- y is -1 (ignored by the loss, as `F.cross_entropy(ignore_index=-1)` and `accel.linear_cross_entropy`
  treat it) wherever the mask is 0 and on the padding.

An epoch's rows are a pure function of (seed, epoch): the conversations in file order or shuffled by
a generator seeded with both, then packed. A step takes the next `batch_size * world_size` rows, rank
r the r-th run of `batch_size`, so ranks never share a row, and the position is (epoch, rows handed
out): `state_dict` / `load_state_dict` resume exactly, as `ShardLoader`'s do.
"""

from __future__ import annotations

import bisect
import os
from typing import Any

import numpy as np
import torch

from ..errors import GPT2LabError
from .loader import LoaderPosition, check_geometry
from .shards import TokenSequence, open_split_tokens

KIND = "chat"
# Conversations the best-fit packer chooses from: enough that most rows fill up, few enough that
# the packer's work per conversation stays small and the epoch's order is kept roughly.
BUFFER_CONVERSATIONS = 1000
IGNORE = -1  # the target of a position the loss skips


def conversation_starts(tokens: TokenSequence, bos_id: int) -> np.ndarray:
    """Positions of `bos_id` in the stream, int64 (n,): where conversations start. Tokens before the
    first `bos_id`, if any, count as a conversation of their own (starting at 0)."""
    found = [np.flatnonzero(np.asarray(s) == bos_id) + int(off) for s, off in zip(tokens.shards, tokens.offsets)]
    starts = np.concatenate([np.zeros(0, dtype=np.int64), *[f.astype(np.int64) for f in found]])
    if len(tokens) and (len(starts) == 0 or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    return starts


def pack_best_fit(lengths: np.ndarray, row_len: int, buffer: int = BUFFER_CONVERSATIONS) -> list[list[int]]:
    """Rows of conversation indices: `lengths` (n,) in the epoch's order, each at most `row_len`.

    The buffer holds the next `buffer` conversations; each row takes the longest that fits in the space
    left (the earliest among equals) until none does, refilling the buffer as it goes.
    """
    pending = iter(range(len(lengths)))
    held: list[tuple[int, int]] = []  # (length, index), sorted

    def refill() -> None:
        while len(held) < buffer:
            i = next(pending, None)
            if i is None:
                return
            bisect.insort(held, (int(lengths[i]), i))

    refill()
    rows: list[list[int]] = []
    while held:
        space, row = row_len, []
        while True:
            last = bisect.bisect_right(held, (space, len(lengths))) - 1
            if last < 0:
                break
            pick = bisect.bisect_left(held, (held[last][0], -1))  # the earliest of that length
            length, i = held.pop(pick)
            row.append(i)
            space -= length
            refill()
        rows.append(row)
    return rows


def masked_targets(next_tokens: np.ndarray, learn: np.ndarray) -> np.ndarray:
    """The targets the loss sees: `next_tokens` (T,) where `learn` (T,) is true, IGNORE (-1) elsewhere; int64."""
    return np.where(learn, next_tokens, IGNORE).astype(np.int64)


class ChatLoader(LoaderPosition):
    """Batches of (x, y), int64 of shape (batch_size, seq_len), of conversations, for one rank.

    >>> loader = open_chat_loader("data/chat", "train", batch_size=8, seq_len=1024, seed=1, shuffle=True)
    >>> x, y = loader.next_batch()          # y is -1 where the loss does not learn
    >>> loader.load_state_dict(loader.state_dict())

    tokens, masks: the split's tokens and loss mask (same length; mask 1 = learned as a target);
    bos_id: the token each conversation starts with.
    """

    def __init__(
        self,
        tokens: TokenSequence,
        masks: TokenSequence,
        bos_id: int,
        *,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = False,
        buffer: int = BUFFER_CONVERSATIONS,
        where: str = "the data",
    ) -> None:
        check_geometry(batch_size, seq_len, rank, world_size, seed)
        if buffer < 1:
            raise GPT2LabError(f"buffer must be at least 1, got {buffer}")
        if len(masks) != len(tokens):
            raise GPT2LabError(
                f"the '{split}' split of {where} has {len(tokens):,} tokens but {len(masks):,} loss mask values; "
                "prepare the data again"
            )
        self.tokens, self.masks, self.bos_id = tokens, masks, bos_id
        self.split, self.where = split, where
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.buffer = seed, shuffle, buffer
        self.starts = conversation_starts(tokens, bos_id)  # (n,)
        ends = np.concatenate([self.starts[1:], [len(tokens)]])
        self.lengths = np.minimum(ends - self.starts, seq_len + 1)  # (n,) each cut to a row
        self.epoch, self.cursor = 0, 0  # rows of this epoch handed out, over all ranks
        self._start_epoch()

    @property
    def steps_per_epoch(self) -> int:
        return self.rows_in_epoch // self.windows_per_step

    @property
    def rows_in_epoch(self) -> int:
        return len(self._rows)

    def _start_epoch(self) -> None:
        """The epoch's rows: the conversations in file order, or permuted by (seed, epoch), packed."""
        n = len(self.starts)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        packed = pack_best_fit(self.lengths[order], self.seq_len + 1, self.buffer)
        self._rows = [order[row] for row in packed]
        if len(self._rows) < self.windows_per_step:
            raise GPT2LabError(
                f"the '{self.split}' split of {self.where} has {n:,} conversations, which pack into "
                f"{len(self._rows):,} rows of {self.seq_len + 1} tokens: too few for one batch of {self.batch_size} "
                f"rows on {self.world_size} rank(s); use a smaller batch_size or seq_len, or more data"
            )

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row k of the current epoch: (x, y), int64 (seq_len,) each; y = -1 where not learned."""
        T = self.seq_len
        tokens = np.full(T + 1, self.bos_id, dtype=np.int64)  # (T + 1,) padded with bos_id
        learn = np.zeros(T + 1, dtype=bool)  # (T + 1,)
        at = 0
        for c in self._rows[k]:
            start, n = int(self.starts[c]), int(self.lengths[c])
            tokens[at : at + n] = self.tokens.read(start, n)
            learn[at : at + n] = self.masks.read(start, n) != 0
            at += n
        return tokens[:-1], masked_targets(tokens[1:], learn[1:])

    def rows(self, ks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `ks` of the current epoch as (x, y), int64 tensors of shape (len(ks), seq_len)."""
        pairs = [self.row(k) for k in ks]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))  # (b, T)
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))  # (b, T)
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), int64 (batch_size, seq_len); an epoch ends when fewer rows than a
        step's remain, at the same step on every rank."""
        if self.cursor + self.windows_per_step > self.rows_in_epoch:
            self.epoch += 1
            self.cursor = 0
            self._start_epoch()
        first = self.cursor + self.rank * self.batch_size
        self.cursor += self.windows_per_step
        return self.rows(list(range(first, first + self.batch_size)))

    def _identity(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "buffer": self.buffer,
            "shards": [[name, len(s)] for name, s in zip(self.tokens.names, self.tokens.shards)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; GPT2LabError if it belongs to other data or settings."""
        if state.get("kind") != KIND:
            raise GPT2LabError(
                "the saved data loader position is that of text training (train.loss = 'all'); resume with the "
                "loss the run was started with"
            )
        super().load_state_dict(state)


def open_chat_loader(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    tokenizer: Any = None,
    bos_id: int | None = None,
    **kwargs: Any,
) -> ChatLoader:
    """A ChatLoader over the `split` of a chat data directory (tokens and their loss masks).

    tokenizer: checked against the manifest when given; bos_id: the conversations' first token, by
    default the chat template's (the manifest's "chat_template"). Other arguments as ChatLoader's.
    """
    from ..chat import template_of
    from .shards import data_tokenizer, open_split_masks

    if bos_id is None:
        template = template_of(data_tokenizer(data_dir))
        if template is None:
            raise GPT2LabError(
                f"{data_dir} has no loss masks: it was not prepared from chat data (prepare it from records "
                "with a 'messages' field)"
            )
        bos_id = template.bos_id
    tokens = open_split_tokens(data_dir, split, tokenizer)
    masks = open_split_masks(data_dir, split)
    return ChatLoader(tokens, masks, bos_id, split=split, where=str(data_dir), **kwargs)
