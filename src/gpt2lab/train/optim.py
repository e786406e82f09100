"""AdamW with GPT-2's parameter groups, and the learning-rate schedule as a pure function of the step.

Weight decay applies to the matrices (attention, MLP, embeddings: every parameter with >= 2 dims) and
not to biases and LayerNorm gains, as in GPT-3's and build-nanogpt's recipe (Loshchilov & Hutter 2019
for decoupled decay). The schedule is linear warmup to `lr`, then cosine (or linear) decay to `min_lr`
at `max_steps` (GPT-3 paper, appendix B; build-nanogpt's `get_lr`); `Schedule` sets it on the optimizer
step by step.

The optimizer state is saved without pickle: every state tensor goes into a safetensors file under the
name `<parameter name>.<state key>` and the hyper-parameters into JSON (see `optimizer_state_tensors`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn as nn

from ..errors import GPT2LabError
from .config import OptimSection


def lr_at(step: int, optim: OptimSection, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of a run of `max_steps` steps.

    Warmup reaches `lr` at the end of step `warmup_steps - 1` ((step + 1) / warmup, so step 0 already
    moves); afterwards the rate decays from `lr` at step `warmup_steps` to `min_lr` at `max_steps`.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant" or max_steps <= optim.warmup_steps:
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / (max_steps - optim.warmup_steps))
    if optim.schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    else:  # linear
        coeff = 1.0 - progress
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: parameters with >= 2 dims decay, the others (biases, LayerNorms) do not.

    Tied parameters appear once (named_parameters skips duplicates), so the shared wte / lm_head
    matrix is decayed once. Each group also carries the names of its parameters, in order, which is
    how optimizer state is saved and matched on load.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim: OptimSection, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`, fused on CUDA and CPU.

    The fused implementation updates each parameter in one pass instead of about ten elementwise
    passes: one kernel for all parameters on CUDA (build-nanogpt), and on CPU 2-3x faster for the
    50304 x C embedding that dominates a small model's optimizer step (bench/train_cpu.py).
    """
    kwargs: dict[str, Any] = {}
    if device.type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        **kwargs,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Schedule:
    """`lr_at` over a run of `max_steps` steps, applied to `optimizer` one step at a time.

    Its state is the number of steps scheduled so far, as torch's LRScheduler keeps `last_epoch`:
    `apply()` sets the rate of that step before the optimizer steps, `advance()` moves on after it.
    The rates themselves come from the run's config, so a resumed run may change them with `--set`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimSection, max_steps: int) -> None:
        self.optimizer, self.optim, self.max_steps = optimizer, optim, max_steps
        self.step = 0

    def lr(self, step: int) -> float:
        """The rate of optimizer step `step` (0-based)."""
        return lr_at(step, self.optim, self.max_steps)

    def apply(self) -> float:
        """Set the rate of the next step on every parameter group; returns it."""
        lr = self.lr(self.step)
        set_lr(self.optimizer, lr)
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise GPT2LabError(f"schedule state: step must be an integer >= 0, got {step!r}")
        self.step = step


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The parameter groups' hyper-parameters and parameter names, JSON-ready (no tensors)."""
    return [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        for group in optimizer.param_groups
    ]


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of `optimizer` as (tensors by "<param name>.<key>", JSON-ready hyper-parameters).

    Parameters are identified by name (from the "names" list of each group), not by position, so a
    checkpoint can be checked against the model it is loaded into.
    """
    tensors: dict[str, torch.Tensor] = {}
    groups = optimizer_groups(optimizer)
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                tensors[f"{name}.{key}"] = value
    return tensors, {"param_groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str = ""
) -> None:
    """Restore the state tensors `optimizer_state_tensors` saved, bit for bit, onto an optimizer built
    for the same model. Hyper-parameters come from the run's config (the learning rate from the
    schedule), so a resumed run may change, e.g., the weight decay with `--set`. Errors begin with
    `source` (the checkpoint) when one is given."""
    where = f"{source}: " if source else ""
    saved_groups = meta.get("param_groups", [])
    if len(saved_groups) != len(optimizer.param_groups):
        raise GPT2LabError(
            f"{where}optimizer state has {len(saved_groups)} parameter groups, expected "
            f"{len(optimizer.param_groups)}; it belongs to another model"
        )
    for group, saved in zip(optimizer.param_groups, saved_groups):
        if saved.get("names") != group["names"]:
            raise GPT2LabError(
                f"{where}optimizer state names other parameters than this model's; it belongs to another model"
            )
        for name, p in zip(group["names"], group["params"]):
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if f"{name}.{key}" in tensors:
                    t = tensors[f"{name}.{key}"]
                    # AdamW keeps `step` as a float32 scalar on the CPU unless it is fused/capturable.
                    target = p.device if (key != "step" or group.get("fused") or group.get("capturable")) else "cpu"
                    state[key] = t.to(device=target, dtype=t.dtype if key == "step" else p.dtype)
            if state:
                optimizer.state[p] = state
