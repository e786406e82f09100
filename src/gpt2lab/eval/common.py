"""What every evaluation shares: the model/tokenizer check, eval mode, scoring only some positions,
and the few torch.distributed calls that let an evaluation run sharded under `torchrun`.

Sharding rule used by every evaluation here: the work is cut into units whose order is fixed by the
data alone (HellaSwag items, perplexity windows, val-loss windows); rank r takes units r, r + W,
r + 2W, ... of the W ranks; per-unit numbers are summed across ranks with an all-reduce. The result
therefore does not depend on the number of ranks (nor on the batch size, which only groups units).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import GPT2LabError
from ..model import KVCache
from ..runtime import resolve_device


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


# ----------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the ranks; rank 0 prints and writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE) and pick this rank's
    device; a plain `python` run is rank 0 of 1 and starts nothing.

    Backend: nccl for CUDA (each rank on cuda:LOCAL_RANK), gloo otherwise (CPU tests, laptops).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world_size <= 1:
        return DistInfo(), dev
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise GPT2LabError("WORLD_SIZE is set but RANK is not: launch multi-process runs with torchrun") from None
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank), dev


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Element-wise sum of `values` over the ranks (returned on values' device); identity for one rank."""
    if world_size <= 1:
        return values
    buf = values.to(_collective_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device)


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
