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
from ..model import KVCache, unwrap


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
    """Final hidden states (after ln_f) of a forward pass over `idx`, without the output projection.

    idx: (B, T) token ids; rows, cols: (N,) long tensors on idx's device selecting the positions
    (rows[i], cols[i]), shape (N, C); without them every position, in row-major order, (B * T, C).
    cache: as in GPT.forward (the T tokens follow the cached ones).

    A forward hook on the final LayerNorm keeps the hidden states and hands `lm_head` an empty
    (B, 0, C) batch, so `GPT.forward` runs unchanged and no logits are made. The model runs eagerly:
    a hook cannot reach into a torch.compile graph.
    """
    gpt = unwrap(model)
    kept: list[torch.Tensor] = []

    def keep_hidden(module: nn.Module, args: tuple, hidden: torch.Tensor) -> torch.Tensor:
        kept.append(hidden.reshape(-1, hidden.size(-1)) if rows is None else hidden[rows, cols])  # (N, C)
        return hidden[:, :0]  # (B, 0, C): nothing left for lm_head to project

    handle = gpt.transformer.ln_f.register_forward_hook(keep_hidden)
    try:
        gpt(idx, cache=cache)
    finally:
        handle.remove()
    assert len(kept) == 1, len(kept)
    return kept[0]


def logits_at(
    model: nn.Module, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cache: KVCache | None = None
) -> torch.Tensor:
    """Logits at the positions (rows[i], cols[i]) of a forward pass over `idx` only, shape (N, V).

    idx: (B, T) token ids; rows, cols: (N,) long tensors on idx's device; cache: as in GPT.forward
    (the T tokens follow the cached ones).

    Evaluations score a subset of positions (the HellaSwag endings). The output projection is the
    single largest matmul of GPT-2 124M (768 x 50257, about a third of its forward FLOPs) and a
    (B, T, V) float32 logits tensor is the largest allocation, so they are computed for the scored
    positions only (see hidden_at).
    """
    gpt = unwrap(model)
    return gpt.lm_head(hidden_at(gpt, idx, rows, cols, cache))[:, : gpt.config.vocab_size]  # (N, V)


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
    vocab = gpt.config.vocab_size
    out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)  # (N,)
    for start in range(0, hidden.size(0), chunk):
        end = min(start + chunk, hidden.size(0))
        logits = gpt.lm_head(hidden[start:end])[:, :vocab]  # (c, V): padding rows never enter a softmax
        out[start:end] = token_losses(logits, targets[start:end])
    return out


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (N, V) against `targets` (N,), in float32: (N,)."""
    return nn.functional.cross_entropy(logits.float(), targets, reduction="none")
