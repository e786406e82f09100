"""What every evaluation shares: where it runs (EvalContext), what it returns (EvalResult), the
model/tokenizer check, eval mode, scoring only some positions, and the distributed windowed sum.

Sharding rule used by every evaluation here: the work is cut into units whose order is fixed by the
data alone (HellaSwag items, perplexity windows, val-loss windows); rank r takes units r, r + W,
r + 2W, ... of the W ranks; per-unit numbers are summed across ranks with an all-reduce. The result
therefore does not depend on the number of ranks (nor on the batch size, which only groups units).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..distributed import all_reduce_sum
from ..errors import GPT2LabError
from ..model import KVCache, unwrap
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class EvalContext:
    """Where and how an evaluation runs; the same for val loss, perplexity, HellaSwag and the tasks a
    training run adds.

    device: where the batches go (None: the model's device); rank, world_size: this process's place
    under torchrun (every rank passes its own and gets the same result); autocast_dtype: None for the
    model's own dtype; batch_size: units (windows, items) per forward pass; progress: a bar on rank 0.
    During training the loop also fills in `step`, and the run's `tokenizer` and `seq_len`, for the
    tasks it runs (see gpt2lab.train.evaluate); the evaluations here take theirs as arguments.
    """

    device: torch.device | None = None
    rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None
    batch_size: int = 8
    progress: bool = False
    step: int | None = None
    tokenizer: Tokenizer | None = None
    seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise GPT2LabError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of the {self.world_size} ranks")

    def device_for(self, model: nn.Module) -> torch.device:
        """`device`, or the model's when none was given."""
        return torch.device(self.device) if self.device is not None else unwrap(model).device

    def mine(self, units: int) -> list[int]:
        """The units of `units` this rank evaluates: rank, rank + world_size, ..."""
        return list(range(self.rank, units, self.world_size))

    @property
    def show_progress(self) -> bool:
        return self.progress and self.rank == 0


class EvalResult(abc.ABC):
    """What every evaluation returns (a frozen dataclass per task, with that task's numbers).

    metrics(): the headline numbers, flat, under the names metrics.jsonl uses (`val_loss`,
    `hellaswag_acc_norm`, ...), unique across tasks so that one record can hold several;
    to_dict(): every number of the result, flat, for `gpt2lab eval --json`.
    """

    @abc.abstractmethod
    def metrics(self) -> dict[str, float | int]:
        """The headline numbers under their metrics.jsonl names."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Every number of the result, for JSON."""


def windowed_sum(
    model: nn.Module,
    n_windows: int,
    ctx: EvalContext,
    score: Callable[[list[int]], torch.Tensor],
    desc: str,
    batches: Callable[[list[int]], Sequence[list[int]]] | None = None,
) -> torch.Tensor:
    """The distributed skeleton of val loss and perplexity: per-window sums of `score`, (n_windows,)
    float64 on every rank.

    Rank r scores windows r, r + W, ..., cut into batches by `batches` (default: runs of
    ctx.batch_size); `score(batch)` returns the (len(batch),) summed losses of those windows. Each
    sum lands in its window's slot, the vector is all-reduced, and the caller adds it up in window
    order: one process and eight give the same number. The model is in eval mode meanwhile.
    """
    device = ctx.device_for(model)
    per_window = torch.zeros(n_windows, dtype=torch.float64, device=device)  # (W,)
    mine = ctx.mine(n_windows)
    if batches is None:
        groups: Sequence[list[int]] = [mine[i : i + ctx.batch_size] for i in range(0, len(mine), ctx.batch_size)]
    else:
        groups = batches(mine)
    from tqdm.auto import tqdm

    with (
        evaluating(model),
        tqdm(total=len(mine), desc=desc, unit="window", disable=not ctx.show_progress, leave=False) as bar,
    ):
        for batch in groups:
            per_window[torch.tensor(batch, device=device)] = score(batch).to(torch.float64)
            bar.update(len(batch))
    return all_reduce_sum(per_window)


def check_vocab(model: nn.Module, tokenizer, source: str = "the model") -> None:
    """Refuse a model whose vocabulary is not the tokenizer's: its scores would be meaningless."""
    vocab = unwrap(model).config.vocab_size
    if vocab != tokenizer.n_vocab:
        raise GPT2LabError(
            f"{source} has a vocabulary of {vocab} tokens but the {tokenizer.name!r} tokenizer has "
            f"{tokenizer.n_vocab}; it was trained with another tokenizer and cannot be evaluated with this one"
        )


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the model's previous mode is restored,
    so the training loop can call an evaluation in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def hidden_at(
    model: nn.Module,
    idx: torch.Tensor,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """Final hidden states of a forward pass over `idx` (GPT.hidden_states): at the positions
    (rows[i], cols[i]), (N, C), or without rows and cols at every position in row-major order, (B * T, C).
    idx: (B, T) token ids; rows, cols: (N,) long tensors on idx's device; cache: as in GPT.forward."""
    hidden = unwrap(model).hidden_states(idx, cache)  # (B, T, C)
    return hidden.reshape(-1, hidden.size(-1)) if rows is None else hidden[rows, cols]


def logits_at(
    model: nn.Module, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cache: KVCache | None = None
) -> torch.Tensor:
    """Logits at the positions (rows[i], cols[i]) of a forward pass over `idx` only, (N, V): the output
    projection, GPT-2's largest matmul, runs for the scored positions alone. Arguments as in hidden_at."""
    gpt = unwrap(model)
    return gpt.head(hidden_at(gpt, idx, rows, cols, cache))  # (N, V)


def nll_chunk_rows(device: torch.device) -> int:
    """Positions whose logits `token_nll` holds at once: a float32 (128, 50304) block (26 MB) stays in a
    CPU's last-level cache; on a GPU (1024, 50304) is a large enough matmul and, with its float32
    copy and log-softmax, about 0.5 GB, where a batch of 64 x 1024 full logits would be 13 GB."""
    return 128 if device.type == "cpu" else 1024


def token_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Next-token loss at each position, from final hidden states, in float32: (N,).

    hidden: (N, C) from `hidden_at`; targets: (N,) token ids. The logits are made `chunk` positions
    at a time (default `nll_chunk_rows`), in the autocast dtype when autocast is on, as `GPT.forward`
    would make them, and the loss of each row is that of F.cross_entropy on them in float32.
    """
    gpt = unwrap(model)
    chunk = chunk or nll_chunk_rows(hidden.device)
    out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)  # (N,)
    for start in range(0, hidden.size(0), chunk):
        end = min(start + chunk, hidden.size(0))
        out[start:end] = token_losses(gpt.head(hidden[start:end]), targets[start:end])  # logits (c, V)
    return out


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (N, V) against `targets` (N,), in float32: (N,)."""
    return nn.functional.cross_entropy(logits.float(), targets, reduction="none")
