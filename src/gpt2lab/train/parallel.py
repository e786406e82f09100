"""Data parallelism beyond one device's memory: FSDP2 sharding, activation checkpointing, and the
two places where a sharded model needs care (the global gradient norm, evaluation).

`train.parallel = "ddp"` (the default) keeps a full replica of weights, gradients and AdamW state on
every rank (torch DDP, in loop.py). `"fsdp"` shards all three across the ranks with PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`, as torchtitan applies it): one FSDP group per transformer block,
all-gathered just before the block runs and freed after it, and the root group for what is left
(wte = lm_head, wpe, ln_f). The tied embedding lives in the root group only, so it is one sharded
parameter that both of its uses see (torchtitan shards tied embeddings the same way). Every parameter
becomes a DTensor sharded on dim 0; AdamW then updates only this rank's rows.

On CUDA with bf16, a MixedPrecisionPolicy all-gathers bf16 copies for compute and reduce-scatters
gradients in float32 (torchtitan's default); the float32 shards stay the master weights.

Activation checkpointing (`train.activation_checkpointing`) keeps only each block's input in the
forward pass and recomputes the block in the backward (torch.utils.checkpoint, non-reentrant, with
the RNG state preserved so dropout draws the same masks: the losses are bit for bit the same).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..errors import GPT2LabError
from ..model import GPT


def check_fsdp_supported(distributed: bool, amp_dtype: torch.dtype | None) -> None:
    """Refuse FSDP where it cannot run: outside torchrun, and with float16 loss scaling."""
    if not distributed:
        raise GPT2LabError(
            "train.parallel 'fsdp' shards the model across the ranks of a torchrun job, but this process was not "
            "started by torchrun; run torchrun --standalone --nproc_per_node=N -m gpt2lab train ..., or set "
            "train.parallel = 'ddp' for one process"
        )
    if amp_dtype == torch.float16:
        raise GPT2LabError(
            "train.precision 'fp16' with train.parallel 'fsdp' is not supported (its loss scaler is DDP's); "
            "use train.precision = 'bf16' or 'fp32'"
        )


def enable_activation_checkpointing(model: GPT) -> None:
    """Recompute every transformer block in the backward pass instead of keeping its activations.

    The block's forward is replaced on the instance only, so parameter names (and with them
    checkpoints and optimizer state) stay the model's own. Decoding with a KV cache and no-grad
    evaluation run the plain forward: there is no backward to save memory for.
    """
    for block in model.transformer.h:
        plain = type(block).forward.__get__(block)

        def forward(x: torch.Tensor, cache=None, layer: int = 0, _plain=plain) -> torch.Tensor:
            if cache is not None or not torch.is_grad_enabled():
                return _plain(x, cache, layer)
            # preserve_rng_state (the default): the recomputation draws the forward's dropout masks.
            return checkpoint(_plain, x, cache, layer, use_reentrant=False)

        block.forward = forward


def shard_model(model: GPT, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """Apply FSDP2 in place: each block, then the root (which keeps the tied wte / lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if device.type == "cuda" and amp_dtype == torch.bfloat16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=True, **kwargs)
    # The root's parameters are needed again at once by the backward: FSDP2 keeps them gathered.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a global L2 norm of at most `max_norm` (inf: no clipping); returns the
    norm before clipping, as a plain tensor on this rank's device.

    Under FSDP each gradient is a DTensor holding this rank's rows; the norm of the DTensors is a
    partial value, and full_tensor() all-reduces it into the norm of the whole gradient, the same
    number DDP and one process compute (torchtitan's clip_grad_norm_ does the same).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


@contextlib.contextmanager
def gathered_for_eval(model: nn.Module) -> Iterator[None]:
    """Keep a sharded model's parameters gathered meanwhile (a no-op for a plain model).

    Evaluation scores a different number of batches on each rank, and rank 0 alone samples text; a
    sharded forward would all-gather on some ranks only and hang. Gathering once up front (the same
    collectives on every rank) and not resharding after each forward makes every forward local, at the
    cost of the whole model's weights on each rank while evaluating (FSDP2's set_reshard_after_forward
    docs suggest exactly this for evals).
    """
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
        for m in groups:
            m.set_reshard_after_forward(m is not model, recurse=False)  # as shard_model set them
