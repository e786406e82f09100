"""What every evaluation shares: the model/tokenizer check, eval mode, scoring only some positions,
and the few torch.distributed calls that let an evaluation run sharded under `torchrun`.

Sharding rule used by every evaluation here: the work is cut into units whose order is fixed by the
data alone (HellaSwag items, perplexity windows, val-loss windows); rank r takes units r, r + W,
r + 2W, ... of the W ranks; per-unit numbers are summed across ranks with an all-reduce. The result
therefore does not depend on the number of ranks (nor on the batch size, which only groups units).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from ..errors import GPT2LabError
from ..model import KVCache


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside a DistributedDataParallel and/or torch.compile wrapper."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


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


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device`, or a no-op when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def logits_at(
    model: nn.Module, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cache: KVCache | None = None
) -> torch.Tensor:
    """Logits at the positions (rows[i], cols[i]) of a forward pass over `idx` only, shape (N, V).

    idx: (B, T) token ids; rows, cols: (N,) long tensors on idx's device; cache: as in GPT.forward
    (the T tokens follow the cached ones).

    Evaluations score a subset of positions (the HellaSwag endings, the new tokens of a perplexity
    window). The output projection is the single largest matmul of GPT-2 124M (768 x 50257, about a
    third of its forward FLOPs) and a (B, T, V) float32 logits tensor is the largest allocation, so
    they are computed for the scored positions only: a forward hook on the final LayerNorm hands
    `lm_head` just those N hidden states, as a (1, N, C) batch. `GPT.forward` itself is unchanged.
    """
    gpt = unwrap(model)

    def keep_scored(module: nn.Module, args: tuple, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[rows, cols].unsqueeze(0)  # (B, T, C) -> (1, N, C)

    handle = gpt.transformer.ln_f.register_forward_hook(keep_scored)
    try:
        logits, _ = gpt(idx, cache=cache)  # (1, N, V)
    finally:
        handle.remove()
    assert logits.shape[:2] == (1, rows.numel()), logits.shape
    return logits[0]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (N, V) against `targets` (N,), in float32: (N,)."""
    return nn.functional.cross_entropy(logits.float(), targets, reduction="none")
