"""How much memory a run needs on each device, before it starts: `gpt2lab train CONFIG --plan`.

Per device, in bytes, for DDP and FSDP at the run's world size:

    parameters   float32 master weights; FSDP keeps rank 0's rows of each parameter (dim 0 cut into
                 ceil(rows / world) pieces, as FSDP2 cuts it), DDP all of them
    gradients    float32, the same split; under FSDP with gradient accumulation the micro-steps that
                 do not sync (set_requires_gradient_sync(False)) hold the *unsharded* gradients
    optimizer    AdamW's exp_avg and exp_avg_sq: 8 bytes per parameter held (the step counters are
                 scalars); with optim.name = "muon" the blocks' matrices keep 4 (one momentum buffer),
                 so the plan is an upper bound
    gathered     FSDP only: the all-gathered working copy of the largest group (the root: wte, wpe,
                 ln_f) plus one block prefetched, in the compute dtype
    activations  what the forward keeps for the backward at one micro-batch; measured on CPU float32
                 with saved-tensor hooks (tests/test_train_fsdp.py): per block 16 x B x T x C values
                 plus the attention's log-sum-exp and LayerNorm statistics, and for the fused loss the
                 embedding-sized float32 weight gradient and two (B, T, C) tensors. With activation
                 checkpointing a block keeps only its input, and one block's activations exist again
                 while it is recomputed.

Not counted: the CUDA context and allocator fragmentation (about 1 GB in practice; `fits` keeps
10% back), DDP's gradient buckets (up to one more copy of the gradients), dropout masks (dropout > 0).

Torch-free: it works from the GPTConfig's shapes alone, so `--plan` for gpt2-xl needs no memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import GPTConfig

HEADROOM = 0.9  # the share of a device's memory a plan may fill


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of GPT(config) by name, the tied lm_head once (the padded vocabulary included).
    Read off the model built on the meta device: no memory, and no second description of GPT-2."""
    return {name: tuple(p.shape) for name, p in _meta_model(config).named_parameters()}


def block_parameters(config: GPTConfig) -> int:
    """Parameters of one transformer block: what FSDP gathers at a time besides the root's."""
    blocks = _meta_model(config).transformer.h
    return sum(p.numel() for p in next(iter(blocks)).parameters())


def _meta_model(config: GPTConfig):
    import torch

    from ..model import GPT

    with torch.device("meta"):
        return GPT(config)


def shard_numel(shape: tuple[int, ...], world_size: int) -> int:
    """Elements rank 0 holds of a parameter FSDP2 shards on dim 0 (torch.chunk: ceil(rows / world) rows)."""
    rows = min(shape[0], math.ceil(shape[0] / world_size))
    return rows * math.prod(shape[1:])


@dataclass(frozen=True)
class DevicePlan:
    """Bytes per device of one way to run (see the module docstring)."""

    parallel: str
    world_size: int
    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int  # at the planned micro-batch, without activation checkpointing
    activations_ckpt: int  # the same, with it
    activations_per_seq: tuple[int, int]  # (plain, checkpointed) bytes per sequence of the micro-batch
    static_activations: tuple[int, int]  # bytes that do not grow with the micro-batch

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.gathered

    def total(self, checkpointing: bool) -> int:
        return self.states + (self.activations_ckpt if checkpointing else self.activations)

    def largest_batch(self, memory: float, checkpointing: bool) -> int:
        """The largest micro-batch (sequences) that fits in HEADROOM x `memory` bytes (0: none fits)."""
        i = 1 if checkpointing else 0
        free = HEADROOM * memory - self.states - self.static_activations[i]
        return max(0, int(free // self.activations_per_seq[i]))


def activation_bytes(config: GPTConfig, batch_size: int, seq_len: int, dtype_bytes: int) -> tuple[int, int]:
    """(plain, checkpointed) bytes the forward keeps for the backward at a (batch_size, seq_len) micro-batch."""
    B, T, C, L, nh = batch_size, seq_len, config.n_embd, config.n_layer, config.n_head
    block = 16 * B * T * C * dtype_bytes + 4 * B * T * (nh + 2)  # + log-sum-exp (B, nh, T), LN mean / rstd
    head = 4 * config.padded_vocab_size * C + 2 * B * T * C * 4  # fused loss: float32 weight and hidden grads
    plain = L * block + head
    checkpointed = L * B * T * C * dtype_bytes + block + head
    return plain, checkpointed


def plan(
    config: GPTConfig,
    parallel: str,
    world_size: int,
    batch_size: int,
    seq_len: int,
    grad_accum: int = 1,
    compute_bytes: int = 4,
) -> DevicePlan:
    """The memory of one device of a run of `config` under `parallel` ("ddp" or "fsdp")."""
    shapes = parameter_shapes(config)
    full = sum(math.prod(s) for s in shapes.values())
    if parallel == "fsdp":
        held = sum(shard_numel(s, world_size) for s in shapes.values())
        grads = 4 * (full if grad_accum > 1 else held)
        block = block_parameters(config)
        root = full - config.n_layer * block
        gathered = 0 if world_size == 1 else compute_bytes * (root + block)
    else:
        held, grads, gathered = full, 4 * full, 0
    plain, ckpt = activation_bytes(config, batch_size, seq_len, compute_bytes)
    plain1, ckpt1 = activation_bytes(config, 1, seq_len, compute_bytes)
    plain0, ckpt0 = activation_bytes(config, 0, seq_len, compute_bytes)
    return DevicePlan(
        parallel=parallel,
        world_size=world_size,
        parameters=4 * held,
        gradients=grads,
        optimizer=8 * held,
        gathered=gathered,
        activations=plain,
        activations_ckpt=ckpt,
        activations_per_seq=(plain1 - plain0, ckpt1 - ckpt0),
        static_activations=(plain0, ckpt0),
    )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plans: list[DevicePlan], batch_size: int, memory: float | None) -> str:
    """The table `--plan` prints: one column per way to run, rows in GiB, then the largest micro-batch."""
    header = ["per device"] + [f"{p.parallel} x{p.world_size}" for p in plans]
    rows = [
        ["parameters"] + [gib(p.parameters) for p in plans],
        ["gradients"] + [gib(p.gradients) for p in plans],
        ["optimizer (AdamW)"] + [gib(p.optimizer) for p in plans],
        ["gathered (FSDP)"] + [gib(p.gathered) for p in plans],
        [f"activations, B={batch_size}"] + [gib(p.activations) for p in plans],
        [f"  checkpointed, B={batch_size}"] + [gib(p.activations_ckpt) for p in plans],
        ["total"] + [gib(p.total(False)) for p in plans],
        ["  checkpointed"] + [gib(p.total(True)) for p in plans],
    ]
    if memory:
        rows.append([f"largest B in {memory / 1e9:g} GB"] + [str(p.largest_batch(memory, False)) for p in plans])
        rows.append(["  checkpointed"] + [str(p.largest_batch(memory, True)) for p in plans])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    return "\n".join(lines) + "\n"
