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
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..distributed import all_reduce_sum
from ..errors import GPT2LabError
from ..model import unwrap
from ..runtime import autocast
from .common import evaluating, hidden_at, token_nll

# build-nanogpt's validation budget: val_loss_steps 20 x B 64 x T 1024 on 8 ranks.
DEFAULT_MAX_TOKENS = 20 * 64 * 1024 * 8


def open_val_tokens(data_dir: str | os.PathLike, tokenizer=None, split: str = "val") -> Any:
    """The `split` of a prepared directory as a flat token sequence (len(), slicing), checked against
    `tokenizer` when the directory has a manifest."""
    from ..data import open_split_tokens

    return open_split_tokens(data_dir, split, tokenizer)


def val_loss(
    model: nn.Module,
    data: str | os.PathLike | Any,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    tokenizer=None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean next-token loss of `model` over the first floor(max_tokens / seq_len) windows of the data.

    data: a prepared directory (its "val" split is read), or an already opened token sequence
    (anything with len() and [a:b] slicing, e.g. `open_val_tokens(dir)` opened once by a training
    loop, or a 1-D numpy array). seq_len defaults to the model's block_size. `batch_size` windows
    go through the model per forward pass. Call it on every rank with the same arguments: each rank
    returns the same dict.

    Returns {"loss": mean nats per token, "perplexity", "tokens": target tokens scored, "windows",
    "seq_len"}.
    """
    # The plain model, eagerly: evaluation needs no DDP gradient sync (and ranks run different numbers
    # of batches), and the loss is taken from the final hidden states, which a compiled graph hides.
    gpt = unwrap(model)
    seq_len = gpt.config.block_size if seq_len is None else seq_len
    if not 1 <= seq_len <= gpt.config.block_size:
        raise GPT2LabError(f"sequence length must be between 1 and the model's block size {gpt.config.block_size}")
    if batch_size < 1:
        raise GPT2LabError(f"batch size must be at least 1, got {batch_size}")
    if max_tokens < seq_len:
        raise GPT2LabError(f"the token budget ({max_tokens}) is smaller than one window of {seq_len} tokens")
    tokens = open_val_tokens(data, tokenizer) if isinstance(data, (str, os.PathLike)) else data
    n_windows = min(max_tokens, len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise GPT2LabError(
            f"the validation split has {len(tokens)} tokens, fewer than one window of {seq_len} + 1; "
            "use a shorter --seq-len or prepare more validation data"
        )
    device = torch.device(device) if device is not None else gpt.device
    vocab = gpt.config.vocab_size
    per_window = torch.zeros(n_windows, dtype=torch.float64, device=device)  # (W,) summed NLL per window
    mine = list(range(rank, n_windows, world_size))
    from tqdm.auto import tqdm

    show = progress and rank == 0
    with (
        evaluating(gpt),
        tqdm(total=len(mine), desc="val loss", unit="window", disable=not show, leave=False) as bar,
    ):
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
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
            with autocast(device, autocast_dtype):
                losses = token_nll(gpt, hidden_at(gpt, x), y.reshape(-1))  # (b * T,)
            sums = losses.double().view(len(batch), seq_len).sum(dim=1)  # (b,) summed NLL per window
            per_window[batch[0] : batch[-1] + 1 : world_size] = sums  # windows r, r + W, ... of this rank
            bar.update(len(batch))
    per_window = all_reduce_sum(per_window)
    n_tokens = n_windows * seq_len
    loss = float(per_window.cpu().sum()) / n_tokens  # summed in window order on every rank
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": n_tokens,
        "windows": n_windows,
        "seq_len": seq_len,
    }
