"""Validation loss on prepared token shards, over a fixed token budget.

The val split of a directory made by `gpt2lab prepare` (or llm.c) is read as one flat token sequence
(gpt2lab.data.open_split_tokens) and cut, from its start, into windows of `seq_len + 1` tokens that
overlap by one: window w holds tokens [w * seq_len, (w + 1) * seq_len], its first `seq_len` tokens are
the input and its last `seq_len` the targets, so every target token is scored once. The budget
`max_tokens` fixes the number of windows, floor(max_tokens / seq_len), whatever the batch size or
the number of ranks; with seq_len 1024 these are exactly the rows build-nanogpt's validation loader
reads (x = buf[:-1], y = buf[1:] over consecutive 1024-token rows from the start of the val shard),
and its default budget of 10,485,760 tokens (20 steps x 64 x 1024 x 8 GPUs) is the default here.

Rank r evaluates windows r, r + W, ...; each window's summed loss lands in its own slot of a vector
that is all-reduced and then added in window order, so one process and eight give the same number
(up to the floating-point rounding of the forward pass itself).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import GPT2LabError
from ..model import unwrap
from ..runtime import autocast
from .common import EvalContext, EvalResult, hidden_at, token_nll, windowed_sum

# build-nanogpt's validation budget: val_loss_steps 20 x B 64 x T 1024 on 8 ranks.
DEFAULT_MAX_TOKENS = 20 * 64 * 1024 * 8


@dataclass(frozen=True)
class ValLossResult(EvalResult):
    loss: float  # mean nats per target token
    tokens: int  # target tokens scored
    windows: int
    seq_len: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def metrics(self) -> dict[str, float | int]:
        return {"val_loss": self.loss, "val_tokens": self.tokens}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"loss": d.pop("loss"), "perplexity": self.perplexity, **d}


def open_val_tokens(data_dir: str | os.PathLike, tokenizer=None, split: str = "val") -> Any:
    """The `split` of a prepared directory as a flat token sequence (len(), slicing), checked against
    `tokenizer` when the directory has a manifest."""
    from ..data import open_split_tokens

    return open_split_tokens(data_dir, split, tokenizer)


def val_loss(
    model: nn.Module,
    data: str | os.PathLike | Any,
    ctx: EvalContext | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int | None = None,
    tokenizer=None,
) -> ValLossResult:
    """Mean next-token loss of `model` over the first floor(max_tokens / seq_len) windows of the data.

    data: a prepared directory (its "val" split is read, checked against `tokenizer` when given), or
    an already opened token sequence (anything with len() and [a:b] slicing, e.g. `open_val_tokens(dir)`
    opened once by a training loop, or a 1-D numpy array). seq_len defaults to the model's block_size.
    `ctx.batch_size` windows go through the model per forward pass. Call it on every rank with the
    same arguments (and each rank's ctx): each rank returns the same result.
    """
    ctx = ctx or EvalContext()
    # The plain model, eagerly: evaluation needs no DDP gradient sync (and ranks run different numbers
    # of batches), and the loss is taken from the final hidden states, which a compiled graph hides.
    gpt = unwrap(model)
    seq_len = gpt.config.block_size if seq_len is None else seq_len
    if not 1 <= seq_len <= gpt.config.block_size:
        raise GPT2LabError(f"sequence length must be between 1 and the model's block size {gpt.config.block_size}")
    if max_tokens < seq_len:
        raise GPT2LabError(f"the token budget ({max_tokens}) is smaller than one window of {seq_len} tokens")
    tokens = open_val_tokens(data, tokenizer) if isinstance(data, (str, os.PathLike)) else data
    n_windows = min(max_tokens, len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise GPT2LabError(
            f"the validation split has {len(tokens)} tokens, fewer than one window of {seq_len} + 1; "
            "use a shorter --seq-len or prepare more validation data"
        )
    device = ctx.device_for(gpt)
    vocab = gpt.config.vocab_size

    def score(batch: list[int]) -> torch.Tensor:
        buf = np.stack([np.asarray(tokens[w * seq_len : (w + 1) * seq_len + 1]) for w in batch])  # (b, T + 1)
        if int(buf.max()) >= vocab:
            raise GPT2LabError(
                f"the validation data holds token id {int(buf.max())}, outside the model's vocabulary of "
                f"{vocab}: it was prepared with another tokenizer"
            )
        buf = torch.from_numpy(buf.astype(np.int64)).to(device)
        x, y = buf[:, :-1], buf[:, 1:]  # (b, T) inputs and next-token targets
        # No (b, T, V) logits: at 64 x 1024 tokens they would take 6.6 GB in bf16 and twice that
        # in float32; the losses are made from the hidden states a chunk of positions at a time.
        with autocast(device, ctx.autocast_dtype):
            losses = token_nll(gpt, hidden_at(gpt, x), y.reshape(-1))  # (b * T,)
        return losses.double().view(len(batch), seq_len).sum(dim=1)  # (b,) summed NLL per window

    per_window = windowed_sum(gpt, n_windows, ctx, score, "val loss")
    n_tokens = n_windows * seq_len
    loss = float(per_window.cpu().sum()) / n_tokens  # summed in window order on every rank
    return ValLossResult(loss, n_tokens, n_windows, seq_len)


def chat_val_loss(
    model: nn.Module, rows: Any, ctx: EvalContext | None = None, *, max_tokens: int = DEFAULT_MAX_TOKENS
) -> ValLossResult:
    """Mean loss over the learned targets (the assistant's replies and their end) of a chat split.

    rows: a `data.chat_loader.ChatLoader` over the split, unshuffled: its epoch's first
    floor(max_tokens / seq_len) rows are scored, each (x, y) of shape (seq_len,) with y = -1 where the
    loss does not learn. The result's `tokens` counts the learned targets. Call it on every rank with
    the same arguments (windows are sharded as `val_loss`'s): each rank returns the same result.
    """
    ctx = ctx or EvalContext()
    gpt = unwrap(model)
    seq_len = rows.seq_len
    n_windows = min(max_tokens // seq_len, rows.rows_in_epoch)
    if n_windows < 1:
        raise GPT2LabError(f"the token budget ({max_tokens}) is smaller than one row of {seq_len} tokens")
    device = ctx.device_for(gpt)
    learned = sum(int((rows.row(k)[1] != -1).sum()) for k in range(n_windows))

    def score(batch: list[int]) -> torch.Tensor:
        x, y = (t.to(device) for t in rows.rows(batch))  # (b, T) each; y = -1 where not learned
        targets = y.reshape(-1)  # (b * T,)
        with autocast(device, ctx.autocast_dtype):
            losses = token_nll(gpt, hidden_at(gpt, x), targets.clamp(min=0))  # (b * T,)
        losses = torch.where(targets != -1, losses.double(), 0.0)
        return losses.view(len(batch), seq_len).sum(dim=1)  # (b,) summed NLL of each row's learned targets

    per_window = windowed_sum(gpt, n_windows, ctx, score, "val loss")
    loss = float(per_window.cpu().sum()) / max(learned, 1)
    return ValLossResult(loss, learned, n_windows, seq_len)
