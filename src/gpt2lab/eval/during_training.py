"""The evaluation a training loop runs every few steps, as one flat dict for metrics.jsonl.

    from gpt2lab.eval import during_training, hellaswag

    # once, at start-up, on every rank (rank 0 downloads the file, the others wait for it):
    val_tokens = during_training.open_val_tokens(cfg.data_dir, tokenizer)
    items = hellaswag.load_validation(rank=rank, world_size=world_size)

    # at an eval step, on every rank (each returns the same dict; rank 0 logs it):
    metrics = during_training.eval_metrics(
        model, device=device, rank=rank, world_size=world_size, autocast_dtype=torch.bfloat16,
        val_data=val_tokens, val_max_tokens=..., val_batch_size=B, val_seq_len=T,
        hellaswag_items=items if step % hellaswag_every == 0 else None, tokenizer=tokenizer,
    )
    # {"val_loss": 3.29, "val_tokens": 10485760, "hellaswag_acc_norm": 0.2955, "hellaswag_acc": 0.2859,
    #  "hellaswag_items": 10042}

The model may be the DDP- and/or torch.compile-wrapped training model; its train/eval mode is restored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from . import hellaswag
from .val_loss import DEFAULT_MAX_TOKENS, open_val_tokens, val_loss

__all__ = ["eval_metrics", "open_val_tokens"]


def eval_metrics(
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    val_data: str | os.PathLike | Any | None = None,
    val_max_tokens: int = DEFAULT_MAX_TOKENS,
    val_batch_size: int = 8,
    val_seq_len: int | None = None,
    hellaswag_items: Sequence[hellaswag.Item] | None = None,
    hellaswag_batch_size: int = 8,
    hellaswag_limit: int | None = None,
    tokenizer=None,
) -> dict[str, float]:
    """Validation loss (when `val_data` is given) and HellaSwag (when `hellaswag_items` are given).

    Keys: val_loss, val_tokens; hellaswag_acc_norm, hellaswag_acc, hellaswag_items. `tokenizer` is
    needed for HellaSwag (the one the model is trained with).
    """
    metrics: dict[str, float] = {}
    if val_data is not None:
        result = val_loss(
            model,
            val_data,
            max_tokens=val_max_tokens,
            batch_size=val_batch_size,
            seq_len=val_seq_len,
            device=device,
            rank=rank,
            world_size=world_size,
            autocast_dtype=autocast_dtype,
            tokenizer=tokenizer,
        )
        metrics["val_loss"] = result["loss"]
        metrics["val_tokens"] = result["tokens"]
    if hellaswag_items is not None:
        if tokenizer is None:
            raise ValueError("eval_metrics needs the tokenizer to score HellaSwag")
        result = hellaswag.evaluate(
            model,
            tokenizer,
            hellaswag_items,
            batch_size=hellaswag_batch_size,
            device=device,
            rank=rank,
            world_size=world_size,
            limit=hellaswag_limit,
            autocast_dtype=autocast_dtype,
        )
        metrics.update(result.metrics())
    return metrics
